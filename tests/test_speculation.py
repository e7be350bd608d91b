"""Speculative decoding with prompt-lookup drafts: the drafting rules, and exactness on a model.

Exactness is the property that matters: the engine with speculation must choose the same tokens
and report the same logprobs as without it (greedy and seeded sampling, penalties, logit_bias,
constraints, stop strings, n choices), while taking fewer model calls when drafts are accepted.
The tiny random model falls into repeating loops under greedy decoding, which gives the drafts
something to match; the tests check that drafts were in fact accepted and rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phi3edge import ChatCompletionsClient, engine, runtime
from phi3edge.guidance import Grammar
from phi3edge.prompt import Prompt
from phi3edge.schema import SamplingConfig
from phi3edge.speculation import DraftLength, PromptLookup, SpeculationStats

NO_END = {32000: -100.0, 32001: -100.0, 32007: -100.0}

# ----------------------------------------------------------------------------- drafting rules


def test_lookup_drafts_what_followed_the_latest_earlier_occurrence() -> None:
    lookup = PromptLookup([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6])
    # the suffix (5, 6) occurred at 0 and 5; the latest earlier one is followed by 7, 1, 2, ...
    assert lookup.draft(3) == [7, 1, 2]
    assert lookup.draft(0) == []


def test_lookup_prefers_the_longest_suffix_ngram() -> None:
    # the 2-gram (3, 4) last occurred before 1; the 3-gram (2, 3, 4) before 7
    lookup = PromptLookup([2, 3, 4, 7, 7, 3, 4, 1, 2, 3, 4])
    assert lookup.draft(2) == [7, 7]


def test_a_single_repeated_token_drafts_nothing() -> None:
    assert PromptLookup([5, 8, 9, 5]).draft(3) == []


def test_lookup_never_matches_the_suffix_itself_and_follows_appends() -> None:
    lookup = PromptLookup([1, 2, 3, 4])
    assert lookup.draft(4) == []
    lookup.append(1)
    lookup.append(2)
    assert lookup.draft(4) == [3, 4, 1, 2]  # runs into the suffix: still what followed
    lookup.append(9)
    assert lookup.draft(4) == []


def test_draft_length_grows_shrinks_and_pauses_after_misses() -> None:
    length = DraftLength(start=4, most=8)
    length.update(4, 4)
    assert length.next() == 8
    length.update(8, 8)
    assert length.next() == 8  # capped
    length.update(8, 3)
    assert length.next() == 4  # what was accepted plus one
    length.update(4, 0)
    assert length.next() == 2  # one miss halves it
    length.update(2, 0)  # a second miss in a row pauses drafting for 2 rounds
    assert [length.next() for _ in range(3)] == [0, 0, 1]
    length.update(1, 0)
    assert [length.next() for _ in range(5)] == [0, 0, 0, 0, 1]
    length.update(1, 1)  # a success ends the streak
    assert length.next() == 2


def test_draft_length_ignores_rounds_without_drafts() -> None:
    length = DraftLength(start=4)
    length.update(0, 0)
    assert length.next() == 4


# ----------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def model(tiny_fp32: Path) -> runtime.LoadedModel:
    return runtime.load(tiny_fp32, threads=1)


def _prompt() -> list[int]:
    rng = np.random.default_rng(0)
    passage = [int(t) for t in rng.integers(100, 30000, size=48)]
    return passage + passage[:24]  # the passage, then its beginning again


def _run(
    model: runtime.LoadedModel, cfg: SamplingConfig, speculative: bool, new_tokens: int = 80
) -> tuple[list[tuple[int, str, Any]], SpeculationStats]:
    stats = SpeculationStats()
    out = []
    for steps in engine.generate(
        model, Prompt(_prompt(), new_tokens), cfg, speculative=speculative, stats=stats
    ):
        for step in steps:
            logprobs = [(t.token_id, t.logprob, t.top) for t in step.tokens]
            out.append((step.index, step.text, step.finish_reason, logprobs))
    return out, stats


def _assert_same(plain: list[Any], fast: list[Any]) -> None:
    """The same steps (choice, text, finish, tokens); logprobs equal to float rounding."""
    assert [s[:3] for s in plain] == [s[:3] for s in fast]
    for a, b in zip(plain, fast, strict=True):
        assert [t[0] for t in a[3]] == [t[0] for t in b[3]]
        for (_, lp_a, top_a), (_, lp_b, top_b) in zip(a[3], b[3], strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-5)
            assert [i for i, _ in top_a] == [i for i, _ in top_b]
            np.testing.assert_allclose([v for _, v in top_a], [v for _, v in top_b], atol=1e-5)


CASES = {
    "greedy": SamplingConfig(temperature=0.0, logit_bias=NO_END, logprobs=True, top_logprobs=3),
    "seeded": SamplingConfig(temperature=1.0, seed=7, logit_bias=NO_END, logprobs=True),
    "penalties-bias-top-p": SamplingConfig(
        temperature=0.8,
        top_p=0.9,
        seed=3,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        logit_bias={**NO_END, 1000: 4.0},
        logprobs=True,
        top_logprobs=2,
    ),
    "n-choices": SamplingConfig(temperature=1.0, seed=11, n=3, logit_bias=NO_END, logprobs=True),
    "stop-string": SamplingConfig(temperature=0.0, logit_bias=NO_END, stop=("ab", "e")),
    "eos-allowed": SamplingConfig(temperature=1.0, seed=5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_speculation_changes_no_token_and_no_logprob(model: runtime.LoadedModel, name: str) -> None:
    plain, _ = _run(model, CASES[name], speculative=False)
    fast, stats = _run(model, CASES[name], speculative=True)
    _assert_same(plain, fast)
    assert stats.tokens > 0  # the speculative loop chose them


def test_greedy_drafts_are_accepted_and_rejected_and_save_model_calls(
    model: runtime.LoadedModel,
) -> None:
    plain, _ = _run(model, CASES["greedy"], speculative=False, new_tokens=200)
    fast, stats = _run(model, CASES["greedy"], speculative=True, new_tokens=200)
    _assert_same(plain, fast)
    assert stats.tokens == 200
    assert stats.accepted > 0 and stats.accepted < stats.drafted  # both paths ran
    assert stats.model_calls < 199  # one call per token without speculation (after prefill)
    assert stats.tokens_per_call > 1.0


def test_a_constraint_follows_the_accepted_tokens(model: runtime.LoadedModel) -> None:
    grammar = Grammar.from_regex(r"(ab|cd|[0-9]){5,60}", "guided_regex")
    cfg = SamplingConfig(temperature=0.0, grammar=grammar, logprobs=True)
    plain, _ = _run(model, cfg, speculative=False)
    fast, _ = _run(model, cfg, speculative=True)
    _assert_same(plain, fast)


# ------------------------------------------------------- plain greedy: the generator's own search

PLAIN = SamplingConfig(temperature=0.0)  # nothing for our kernel to do: the search picks
BY_KERNEL = SamplingConfig(temperature=0.0, logprobs=True)  # the same choices, through our kernel


class _Counted:
    """A generator whose onnxruntime-genai calls are counted by name."""

    def __init__(self, generator: Any, calls: dict[str, int]) -> None:
        self._generator, self._calls = generator, calls

    def __getattr__(self, name: str) -> Any:
        self._calls[name] = self._calls.get(name, 0) + 1
        return getattr(self._generator, name)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counted: dict[str, int] = {}
    make = engine._new_generator
    monkeypatch.setattr(engine, "_new_generator", lambda *a, **k: _Counted(make(*a, **k), counted))
    return counted


def _texts(steps: Iterator[list[engine.ChoiceStep]]) -> list[tuple[str, str | None]]:
    return [(step.text, step.finish_reason) for s in steps for step in s]


@pytest.mark.parametrize("speculative", [False, True])
def test_the_search_picks_the_tokens_our_kernel_picks(
    model: runtime.LoadedModel, calls: dict[str, int], speculative: bool
) -> None:
    by_kernel, _ = _run(model, BY_KERNEL, speculative=False, new_tokens=200)
    calls.clear()
    by_search, stats = _run(model, PLAIN, speculative=speculative, new_tokens=200)
    assert [s[:3] for s in by_search] == [s[:3] for s in by_kernel]
    assert len(by_search) > 100  # the test model runs long before it ends
    assert calls["generate_next_token"] > 0
    if speculative:  # drafts followed the search's picks: accepted and rejected
        assert 0 < stats.accepted < stats.drafted
    else:  # one call per token, no copy of the logits
        assert calls["generate_next_token"] == len(by_search)
        assert "get_output" not in calls and "get_logits" not in calls


def test_each_of_n_plain_greedy_choices_is_the_kernels_answer(model: runtime.LoadedModel) -> None:
    """Each further choice rewinds to the prompt, past the previous choice's unrun pick."""
    ids = _prompt()
    answer = _texts(engine.generate(model, Prompt(ids, 30), BY_KERNEL))
    choices = _texts(engine.generate(model, Prompt(ids, 30), replace(PLAIN, n=3)))
    assert choices == answer * 3


def test_a_kept_generator_holds_only_tokens_the_model_ran(model: runtime.LoadedModel) -> None:
    """The search's last pick is added without the model running on it; the prefix cache must
    not reuse it as if it had run."""
    ids, new = _prompt(), 30
    by_kernel = list(engine.generate(model, Prompt(ids, new), BY_KERNEL))
    chosen = [t.token_id for s in by_kernel for step in s for t in step.tokens]
    assert len(chosen) == new
    cache = engine.PrefixCache(1)
    by_search = engine.generate(model, Prompt(ids, new), PLAIN, cache=cache)
    assert _texts(by_search) == _texts(iter(by_kernel))
    assert cache._kept[0][1] == ids + chosen[:-1]  # the last pick never ran
    follow = ids + chosen + [1000, 2000, 3000]
    warm = _texts(engine.generate(model, Prompt(follow, new), PLAIN, cache=cache))
    assert cache.hits == 1 and cache.reused_tokens == len(ids) + len(chosen) - 1
    assert warm == _texts(engine.generate(model, Prompt(follow, new), PLAIN))


# ----------------------------------------------------------------------------- the client


@pytest.fixture(scope="module")
def clients(tiny_fp32: Path) -> Iterator[tuple[ChatCompletionsClient, ChatCompletionsClient]]:
    with (
        ChatCompletionsClient(tiny_fp32, threads=1) as on,
        ChatCompletionsClient(tiny_fp32, threads=1, speculative=False) as off,
    ):
        yield on, off


def test_the_client_answers_the_same_with_and_without_speculation(
    clients: tuple[ChatCompletionsClient, ChatCompletionsClient],
) -> None:
    on, off = clients
    messages = [{"role": "user", "content": "Repeat after me: the cat sat on the mat. " * 3}]
    for params in (
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 4, "model_extras": {"logprobs": True, "top_logprobs": 2}},
    ):
        a = on.complete(messages=messages, max_tokens=48, **params).as_dict()
        b = off.complete(messages=messages, max_tokens=48, **params).as_dict()
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
        assert a["usage"] == b["usage"]
