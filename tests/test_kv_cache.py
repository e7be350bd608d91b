"""The KV cache and the machine's memory: a generator's cache is one preallocated buffer when it
fits its share (``runtime.kv_preallocate_bytes``), else a cache that grows every step; requests
and batches whose caches the free memory cannot hold are refused or not formed."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phi3edge import ApiError, ChatCompletionsClient, UserMessage, engine, runtime
from phi3edge.benchmark import NO_END
from phi3edge.prompt import Prompt, fit_context
from phi3edge.schema import SamplingConfig

GiB = 1 << 30


def test_each_holder_gets_a_share_of_free_memory_and_never_less_than_2_gib() -> None:
    assert runtime.kv_preallocate_bytes(20 * GiB, holders=3) == 5 * GiB
    assert runtime.kv_preallocate_bytes(20 * GiB, holders=9) == 2 * GiB
    assert runtime.kv_preallocate_bytes(4 * GiB, holders=1) == 2 * GiB
    assert runtime.kv_preallocate_bytes(None, holders=1) == 2 * GiB


def test_available_memory_is_within_the_machines_memory() -> None:
    available = runtime.available_memory()
    if not Path("/proc/meminfo").is_file():
        assert available is None
        return
    assert available is not None
    assert 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture(scope="module")
def model(tiny_int4: Path) -> runtime.LoadedModel:
    return runtime.load(tiny_int4, threads=1)


@pytest.fixture
def shared_buffers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The past_present_share_buffer of every generator made while the test runs."""
    import onnxruntime_genai as og

    made: list[bool] = []
    real, real_generator = og.GeneratorParams, og.Generator

    class Recorded:
        def __init__(self, og_model: Any) -> None:
            self._params = real(og_model)

        def set_search_options(self, **options: Any) -> None:
            made.append(options["past_present_share_buffer"])
            self._params.set_search_options(**options)

    monkeypatch.setattr(og, "GeneratorParams", Recorded)
    monkeypatch.setattr(og, "Generator", lambda m, params: real_generator(m, params._params))
    return made


def test_a_lone_request_preallocates_and_a_batch_within_its_share(
    model: runtime.LoadedModel, shared_buffers: list[bool]
) -> None:
    per_token = model.kv_bytes_per_token
    share = dataclasses.replace(model, kv_preallocate_bytes=100 * per_token)
    engine._new_generator(share, 101, 1)  # fit_context has checked it against free memory
    engine._new_generator(share, 50, 2)
    engine._new_generator(share, 51, 2)
    engine._new_generator(dataclasses.replace(share, memory_free_at_load=None), 100, 1)
    engine._new_generator(dataclasses.replace(share, memory_free_at_load=None), 101, 1)
    engine._new_generator(dataclasses.replace(share, shared_kv_limit=60), 61, 1)
    assert shared_buffers == [True, True, False, True, False, False]


def test_a_growing_cache_answers_as_a_preallocated_one(
    model: runtime.LoadedModel, shared_buffers: list[bool]
) -> None:
    cfg = SamplingConfig(temperature=0.9, seed=4, n=2, logprobs=True)
    ids = [int(t) for t in np.random.default_rng(6).integers(100, 30000, size=80)]
    growing = dataclasses.replace(model, kv_preallocate_bytes=0, memory_free_at_load=None)
    answers = [
        [
            (step.index, t.token_id, t.logprob)
            for steps in engine.generate(m, Prompt(ids, 24), cfg)
            for step in steps
            for t in step.tokens
        ]
        for m in (model, growing)
    ]
    assert shared_buffers == [True, False]
    assert [a[:2] for a in answers[1]] == [a[:2] for a in answers[0]]
    np.testing.assert_allclose([a[2] for a in answers[1]], [a[2] for a in answers[0]], atol=1e-5)


def test_prompt_and_max_tokens_are_bounded_by_the_kv_cache_memory_holds() -> None:
    ids = list(range(100, 160))  # 60 tokens
    assert fit_context(ids, 4096, None, 4096, memory_tokens=100).max_new_tokens == 40
    assert fit_context(ids, 4096, 40, memory_tokens=100).max_new_tokens == 40
    assert fit_context(ids, 80, None, memory_tokens=100).max_new_tokens == 20  # context first
    with pytest.raises(ApiError, match="max_tokens \\(41\\) exceeds the 100 tokens of KV") as info:
        fit_context(ids, 4096, 41, memory_tokens=100)
    assert (info.value.status, info.value.code) == (400, "context_length_exceeded")
    with pytest.raises(ApiError, match="60 tokens, which fills the 60 tokens of KV cache"):
        fit_context(ids, 4096, None, memory_tokens=60)


def test_a_request_the_free_memory_cannot_hold_is_refused_before_it_runs(
    tiny_int4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a machine whose free memory holds 100 tokens of this model's KV cache, the client
    answers within that and refuses more with a 400 (not a process killed mid-answer)."""
    per_token = runtime.load(tiny_int4, threads=1).kv_bytes_per_token
    monkeypatch.setattr(runtime, "available_memory", lambda: 100 * per_token)
    messages = [UserMessage("Tell me a story about a fox.")]
    with ChatCompletionsClient(tiny_int4, threads=1) as client:
        with pytest.raises(ApiError, match="KV cache that the memory") as info:
            client.complete(messages=messages, max_tokens=99)
        assert info.value.status == 400
        answer = client.complete(messages=messages, logit_bias=NO_END, temperature=0)
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == 100
    assert answer.choices[0].finish_reason == "length"


def test_requests_whose_caches_the_memory_cannot_hold_together_do_not_batch(
    model: runtime.LoadedModel,
) -> None:
    cfg = SamplingConfig(temperature=0.0)
    items = [engine.BatchItem(Prompt(list(range(100, 120)), 30), cfg, None, None)] * 2
    holds = dataclasses.replace(model, memory_free_at_load=100 * model.kv_bytes_per_token)
    assert engine.fits_in_batch(holds, items)  # 2 rows x (20 + 30) tokens
    assert not engine.fits_in_batch(holds, [*items, items[0]])
    assert engine.fits_in_batch(dataclasses.replace(holds, memory_free_at_load=None), items * 2)


@pytest.mark.parametrize("kept", [1, 0])
def test_the_first_conversation_gets_a_generator_allocated_before_it_came(
    tiny_int4: Path, model: runtime.LoadedModel, monkeypatch: pytest.MonkeyPatch, kept: int
) -> None:
    """With conversations kept, the engine allocates one generator as long as the context
    right after loading, and the first request runs on it; without, the request makes its own."""
    made: list[int] = []
    new_generator = engine._new_generator

    def counted(model: runtime.LoadedModel, max_length: int, *args: Any) -> Any:
        made.append(max_length)
        return new_generator(model, max_length, *args)

    monkeypatch.setattr(engine, "_new_generator", counted)
    with ChatCompletionsClient(tiny_int4, threads=1, kv_cache_entries=kept) as client:
        answer = client.complete(messages=[UserMessage("Hi")], max_tokens=5)
    assert answer.usage.completion_tokens > 0
    need = answer.usage.prompt_tokens + 5
    assert made == ([model.context_length] if kept else [need])


def test_a_kept_conversation_gets_room_for_more_turns_within_free_memory(
    model: runtime.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []
    new_generator = engine._new_generator

    def counted(model: runtime.LoadedModel, max_length: int, *args: Any) -> Any:
        made.append(max_length)
        return new_generator(model, max_length, *args)

    monkeypatch.setattr(engine, "_new_generator", counted)
    prompt, cfg = Prompt(list(range(100, 120)), 5), SamplingConfig(temperature=0.0)
    for free_tokens in (None, 40, 10_000):
        memory = None if free_tokens is None else free_tokens * model.kv_bytes_per_token
        bounded = dataclasses.replace(model, memory_free_at_load=memory)
        for _ in engine.generate(bounded, prompt, cfg, cache=engine.PrefixCache(1)):
            pass
    assert made == [25 + engine.CACHE_HEADROOM, 40, 25 + engine.CACHE_HEADROOM]
