"""The KV cache and the machine's memory: a generator's cache is one preallocated buffer when it
fits its share (``runtime.kv_preallocate_bytes``), else a cache that grows every step; requests
and batches whose caches the free memory cannot hold are refused or not formed, and a request
whose cache does not fit beside the running ones' waits for them (``runtime.KvLedger``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phi3edge import ApiError, ChatCompletionsClient, Limits, UserMessage, engine, runtime
from phi3edge.benchmark import NO_END
from phi3edge.core import EngineCore, EngineOptions, EngineStats, Finished, _EngineLoop
from phi3edge.prompt import Prompt, fit_context
from phi3edge.schema import ChatRequest, SamplingConfig

GiB = 1 << 30


def test_each_holder_gets_a_share_of_free_memory_and_never_less_than_2_gib() -> None:
    assert runtime.kv_preallocate_bytes(20 * GiB, holders=3) == 5 * GiB
    assert runtime.kv_preallocate_bytes(20 * GiB, holders=9) == 2 * GiB
    assert runtime.kv_preallocate_bytes(4 * GiB, holders=1) == 2 * GiB
    assert runtime.kv_preallocate_bytes(GiB, holders=3) == GiB  # never more than is free
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


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The max_length of every generator made while the test runs."""
    lengths: list[int] = []
    new_generator = engine._new_generator

    def counted(model: runtime.LoadedModel, max_length: int, *args: Any) -> Any:
        lengths.append(max_length)
        return new_generator(model, max_length, *args)

    monkeypatch.setattr(engine, "_new_generator", counted)
    return lengths


@pytest.mark.parametrize("kept", [1, 0])
def test_the_first_conversation_gets_a_generator_allocated_before_it_came(
    tiny_int4: Path, model: runtime.LoadedModel, made: list[int], kept: int
) -> None:
    """With conversations kept, the engine allocates one generator as long as the context
    right after loading, and the first request runs on it; without, the request makes its own."""
    with ChatCompletionsClient(tiny_int4, threads=1, kv_cache_entries=kept) as client:
        answer = client.complete(messages=[UserMessage("Hi")], max_tokens=5)
    assert answer.usage.completion_tokens > 0
    need = answer.usage.prompt_tokens + 5
    assert made == ([model.context_length] if kept else [need])


def test_a_kept_conversation_gets_room_for_more_turns_within_free_memory(
    model: runtime.LoadedModel, made: list[int]
) -> None:
    prompt, cfg = Prompt(list(range(100, 120)), 5), SamplingConfig(temperature=0.0)
    for free_tokens in (None, 40, 10_000):
        memory = None if free_tokens is None else free_tokens * model.kv_bytes_per_token
        bounded = dataclasses.replace(
            model, memory_free_at_load=memory, kv_ledger=runtime.KvLedger()
        )
        for _ in engine.generate(bounded, prompt, cfg, cache=engine.PrefixCache(1)):
            pass
    assert made == [25 + engine.CACHE_HEADROOM, 40, 25 + engine.CACHE_HEADROOM]


def test_the_ledger_counts_each_generator_from_its_creation_until_it_is_freed(
    model: runtime.LoadedModel,
) -> None:
    per_token, ledger = model.kv_bytes_per_token, runtime.KvLedger()
    counted = dataclasses.replace(model, kv_ledger=ledger)
    lone = engine._new_generator(counted, 100, 1)
    batch = engine._new_generator(counted, 30, 2)
    assert (ledger.in_use, ledger.generators) == (160 * per_token, 2)
    del lone
    assert (ledger.in_use, ledger.generators) == (60 * per_token, 1)
    cache = engine.PrefixCache(1)
    work = engine.generate(counted, Prompt(list(range(100, 120)), 5), SamplingConfig(), None, cache)
    claimed = ledger.in_use - 60 * per_token  # when the request starts, not at its first step
    assert claimed == (25 + engine.CACHE_HEADROOM) * per_token
    list(work)
    del batch
    assert ledger.in_use == claimed  # the conversation's generator is kept for the next turn
    cache.clear()
    assert (ledger.in_use, ledger.generators) == (0, 0)


def _item(prompt_tokens: int, max_tokens: int) -> engine.BatchItem:
    return engine.BatchItem(
        Prompt(list(range(100, 100 + prompt_tokens)), max_tokens), SamplingConfig()
    )


def test_a_start_fits_beside_the_live_caches_after_dropping_kept_ones_it_cannot_use(
    model: runtime.LoadedModel,
) -> None:
    """Memory for 500 tokens of KV; a kept conversation of 300 tokens (``PrefixCache.warm``)."""
    per_token = model.kv_bytes_per_token
    budget = dataclasses.replace(
        model,
        memory_free_at_load=500 * per_token,
        kv_preallocate_bytes=300 * per_token,
        kv_ledger=runtime.KvLedger(),
    )
    ledger, cache = budget.kv_ledger, engine.PrefixCache(1)
    assert ledger is not None
    loop = _EngineLoop(None, Limits(), budget, cache, EngineStats(), None, False)
    cache.warm(budget)
    assert ledger.in_use == 300 * per_token
    assert loop._kv_fits([_item(20, 200)])  # runs on the kept generator
    assert ledger.in_use == 300 * per_token
    assert loop._kv_fits([_item(20, 330)])  # too long for it: it goes
    assert ledger.in_use == 0
    cache.warm(budget)
    pair = [_item(20, 200)] * 2  # a batch of 440 tokens, which cannot use it
    assert not loop._kv_fits(pair, drop_kept=False)  # a request is not added to a batch at its cost
    assert ledger.in_use == 300 * per_token
    assert loop._kv_fits(pair)
    assert ledger.in_use == 0
    cache.warm(budget)
    running = engine._new_generator(budget, 200, 1)
    assert loop._kv_fits([_item(20, 200)])
    assert not loop._kv_fits([_item(20, 330)])  # 200 running + 350 > 500, even without the kept
    assert ledger.in_use == 200 * per_token
    del running
    assert loop._kv_fits([_item(20, 330)])


@pytest.mark.parametrize("free_tokens", [300, 1000])
def test_a_request_whose_kv_cache_does_not_fit_beside_a_running_one_waits_for_it(
    tiny_int4: Path, model: runtime.LoadedModel, monkeypatch: pytest.MonkeyPatch, free_tokens: int
) -> None:
    """Two requests of about 216 tokens each, sent together, that cannot batch (a prefill cap of
    1 token): with memory for 300 tokens of KV the second starts only once the first has ended;
    with memory for 1000 they run side by side."""
    monkeypatch.setattr(runtime, "available_memory", lambda: free_tokens * model.kv_bytes_per_token)
    order: list[tuple[str, int]] = []
    generate = engine.generate

    def traced(*args: Any, **kwargs: Any) -> Any:
        number = sum(event == "start" for event, _ in order)
        order.append(("start", number))
        work = generate(*args, **kwargs)  # claims its generator now, as the engine's call does

        def steps() -> Any:
            try:
                yield from work
            finally:
                order.append(("end", number))

        return steps()

    monkeypatch.setattr(engine, "generate", traced)
    request = {"messages": [{"role": "user", "content": "Tell me about foxes."}], "max_tokens": 200}
    core = EngineCore(
        tiny_int4,
        EngineOptions(threads=1, kv_cache_entries=0),
        Limits(batch_prefill_tokens=1),
    )
    try:
        jobs = [ChatRequest.model_validate({**request, "logit_bias": NO_END}) for _ in range(2)]
        tickets = [core.submit([job]) for job in jobs]
        events = [list(ticket.events()) for ticket in tickets]
        assert all(isinstance(e[-1], Finished) for e in events)
        assert core.stats.held_for_memory == (1 if free_tokens == 300 else 0)
    finally:
        core.close()
    if free_tokens == 300:
        assert order == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    else:
        assert order[:2] == [("start", 0), ("start", 1)]


def test_a_generator_that_cannot_be_made_fails_its_request_and_the_engine_goes_on(
    tiny_int4: Path, monkeypatch: pytest.MonkeyPatch, within: Any
) -> None:
    calls: list[int] = []
    new_generator = engine._new_generator

    def allocate(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("could not allocate the KV cache")
        return new_generator(*args)

    monkeypatch.setattr(engine, "_new_generator", allocate)
    request = {"messages": [UserMessage("Hi")], "max_tokens": 3}
    with ChatCompletionsClient(tiny_int4, threads=1, kv_cache_entries=0) as client:
        with pytest.raises(ApiError) as info:
            within(60, lambda: client.complete(**request))
        assert (info.value.status, info.value.code) == (500, "internal_error")
        assert within(60, lambda: client.complete(**request)).usage.completion_tokens > 0
