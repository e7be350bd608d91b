"""One engine thread owns the model: concurrent callers never overlap, batch together, and leave
no slot behind. In-process here; the HTTP side is in test_server.py.

Every onnxruntime-genai generator the engine makes is wrapped to record which threads call it and
whether two calls ever overlap, so "nothing but the engine thread touches the model" is checked,
not assumed.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from phi3edge import ApiError, ChatCompletionsClient, Limits, engine
from phi3edge.engine import PREFILL_CHUNK
from phi3edge.prompt import Prompt
from phi3edge.schema import SamplingConfig
from phi3edge.server import ServerSettings, create_app, running
from phi3edge.service import ChatService

NO_EOS = {32007: -100, 32000: -100, 32001: -100}  # keep generating until max_tokens


@dataclass
class Calls:
    """What the wrapped generators saw."""

    threads: set[int] = field(default_factory=set)
    active: int = 0
    most_at_once: int = 0
    appended: list[int] = field(default_factory=list)  # tokens per append_tokens call, per row
    steps: int = 0
    delay_s: float = 0.0
    guard: threading.Lock = field(default_factory=threading.Lock)


class _Watched:
    def __init__(self, inner: Any, calls: Calls) -> None:
        self._inner, self._calls = inner, calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        calls = self._calls

        def call(*args: Any, **kwargs: Any) -> Any:
            with calls.guard:
                calls.threads.add(threading.get_ident())
                calls.active += 1
                calls.most_at_once = max(calls.most_at_once, calls.active)
                if name == "append_tokens":
                    calls.appended.append(int(args[0].shape[1]))
                # a decode step: get_logits, or the logits of a speculative append
                calls.steps += name in ("get_logits", "get_output")
            try:
                if calls.delay_s and name in ("get_logits", "get_output"):
                    time.sleep(calls.delay_s)
                return method(*args, **kwargs)
            finally:
                with calls.guard:
                    calls.active -= 1

        return call


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    recorded = Calls()
    real = engine._new_generator
    monkeypatch.setattr(engine, "_new_generator", lambda *a, **k: _Watched(real(*a, **k), recorded))
    return recorded


@pytest.fixture
def make_client(tiny_fp32: Path) -> Iterator[Any]:
    """``make_client(**kwargs)``: a fresh client (fresh engine thread) closed after the test.

    fp32, because "the same answer as a serial run" needs batched logits equal to single ones
    up to float rounding; INT4 at accuracy level 4 quantizes activations in a way that depends
    on the batch (logprobs move by about 1e-3), which can flip a sampled token at a near-tie on
    a random model's flat distribution."""
    made: list[ChatCompletionsClient] = []

    def make(**kwargs: Any) -> ChatCompletionsClient:
        made.append(ChatCompletionsClient(tiny_fp32, threads=1, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


def _request(i: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"Request {i}: " + "tell me more " * (i % 4)}],
        "max_tokens": 5 + i % 6,
        "seed": i,
        "temperature": 0.9,
        "n": 1 + i % 2,
        "logprobs": i % 3 == 0,
        "top_logprobs": 2 if i % 3 == 0 else None,
    }


def _texts(response: Any) -> list[tuple[str, str]]:
    return [(c.message.content, c.finish_reason) for c in response.choices]


def _streamed(client: ChatCompletionsClient, params: dict[str, Any]) -> list[tuple[str, str]]:
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    for update in client.complete(stream=True, **params):
        for choice in update.choices:
            texts.setdefault(choice.index, []).append(choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return [("".join(texts[i]), finish[i]) for i in sorted(texts)]


def test_concurrent_callers_get_serial_answers_without_overlap(
    make_client: Any, calls: Calls
) -> None:
    """16 threads at once (whole answers and streams, n, logprobs): the same answers as one at a
    time, every model call on the engine thread, never two at once, and batches were formed."""
    client = make_client()
    requests = [_request(i) for i in range(16)]
    serial = [_texts(client.complete(**r)) for r in requests]
    serial_streams = [_streamed(client, r) for r in requests[:4]]
    assert serial_streams == serial[:4]  # a stream concatenates to the whole answer
    calls.delay_s = 0.002  # slow steps a little so the requests really overlap
    before = client._service.core.stats.batched_requests

    def ask(i: int) -> list[tuple[str, str]]:
        if i % 4 == 0:
            return _streamed(client, requests[i])
        return _texts(client.complete(**requests[i]))

    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(ask, range(16)))
    assert concurrent == serial
    assert calls.most_at_once == 1
    assert len(calls.threads) == 1 and threading.get_ident() not in calls.threads
    assert client._service.core.stats.batched_requests > before  # they ran together
    assert client._service.wait_idle(5) and client._service.core.jobs == 0


def test_batch_of_requests_matches_single_runs_and_respects_the_row_limit(
    make_client: Any,
) -> None:
    client = make_client()
    requests = [{**_request(i), "n": 4} for i in range(6)]  # 24 rows: more than one batch
    singles = [_texts(client.complete(**r)) for r in requests]
    assert [_texts(r) for r in client.complete_batch(requests)] == singles
    assert client._service.core.stats.largest_batch_rows <= engine.MAX_BATCH_ROWS


def test_batches_group_alike_lengths_within_the_prefill_cap(make_client: Any, calls: Calls) -> None:
    """Interleaved short and long prompts, more rows than one batch holds: the engine puts the
    short ones together and the long ones together (first-come order would pad every batch to
    the long prompt), answers as single runs do, and a cap of one token batches nothing."""
    requests = [
        {
            "messages": [{"role": "user", "content": "tell me more " * (40 if i % 2 else 1)}],
            "max_tokens": 3,
            "seed": i,
        }
        for i in range(2 * engine.MAX_BATCH_ROWS)
    ]
    client = make_client(limits=Limits(max_queue=64, batch_prefill_tokens=4096))
    singles = [_texts(client.complete(**r)) for r in requests]
    calls.appended.clear()
    assert [_texts(r) for r in client.complete_batch(requests)] == singles
    assert len(calls.appended) == 2  # two batched prefills
    assert min(calls.appended) < 20 < 100 < max(calls.appended)  # a short batch, a long one
    client.close()

    solo = make_client(limits=Limits(max_queue=64, batch_prefill_tokens=1))
    assert [_texts(r) for r in solo.complete_batch(requests[:4])] == singles[:4]
    assert solo._service.core.stats.batched_requests == 0


def test_a_padding_cap_keeps_unlike_lengths_apart(make_client: Any, calls: Calls) -> None:
    """Four short and four long prompts fit one batch under a large prefill cap; with a padding
    cap of 25 % they run as a short batch and a long one, and answer as single runs do."""
    requests = [
        {
            "messages": [{"role": "user", "content": "tell me more " * (40 if i % 2 else 1)}],
            "max_tokens": 3,
            "seed": i,
        }
        for i in range(8)
    ]
    loose = make_client(limits=Limits(max_queue=64, batch_prefill_tokens=4096))
    singles = [_texts(loose.complete(**r)) for r in requests]
    calls.appended.clear()
    assert [_texts(r) for r in loose.complete_batch(requests)] == singles
    assert len(calls.appended) == 1  # one batched prefill, padded to the long prompts

    capped = make_client(
        limits=Limits(max_queue=64, batch_prefill_tokens=4096, batch_padding_pct=25)
    )
    calls.appended.clear()
    assert [_texts(r) for r in capped.complete_batch(requests)] == singles
    assert len(calls.appended) == 2
    assert min(calls.appended) < 20 < 100 < max(calls.appended)


def test_padded_work_counts_the_longest_prompt_and_the_largest_max_tokens() -> None:
    """Rows x (longest prompt + largest max_tokens) against each row's own, worked by hand:
    a request of n=2 with 10 prompt ids and 5 new tokens, and one of 4 ids and 20 new tokens,
    run 3 rows x 30 = 90 positions for 2 x 15 + 24 = 54 asked (66.7 % waste)."""
    items = [
        engine.BatchItem(Prompt(list(range(10)), 5), SamplingConfig(n=2)),
        engine.BatchItem(Prompt(list(range(4)), 20), SamplingConfig(n=1)),
    ]
    assert engine.padded_work(items) == (90, 54)
    model: Any = SimpleNamespace(context_length=4096, kv_tokens_in_memory=None)
    assert engine.fits_in_batch(model, items, 4096, padding_pct=None)
    assert engine.fits_in_batch(model, items, 4096, padding_pct=67)
    assert not engine.fits_in_batch(model, items, 4096, padding_pct=66)
    assert not engine.fits_in_batch(model, items, 26, padding_pct=67)  # 3 rows x 9 > 26


def test_a_short_request_is_not_starved_by_a_long_one(make_client: Any, calls: Calls) -> None:
    """It starts at once in a second batch and ends while the long one is still going."""
    client = make_client()
    calls.delay_s = 0.005
    long = client.complete(
        messages=[{"role": "user", "content": "long"}],
        max_tokens=1500,
        logit_bias=NO_EOS,
        stream=True,
    )
    next(long), next(long)  # the long one is decoding now
    started = time.monotonic()
    short = client.complete(messages=[{"role": "user", "content": "short"}], max_tokens=3)
    waited = time.monotonic() - started
    assert short.usage.completion_tokens == 3
    assert calls.steps < 500  # the long one is far from done (1500 steps of >= 5 ms)
    assert waited < 2.0, waited
    long.close()
    assert client._service.wait_idle(5)


def test_closing_a_stream_from_another_thread_frees_the_engine(
    make_client: Any, calls: Calls
) -> None:
    client = make_client()
    calls.delay_s = 0.005
    stream = client.complete(
        messages=[{"role": "user", "content": "x"}], max_tokens=1500, logit_bias=NO_EOS, stream=True
    )
    next(stream), next(stream)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join()
    assert client._service.wait_idle(5)
    stopped_at = calls.steps
    time.sleep(0.1)
    assert calls.steps == stopped_at < 200
    assert client._service.core.jobs == 0


def test_a_dropped_stream_is_cancelled(make_client: Any, calls: Calls) -> None:
    client = make_client()
    calls.delay_s = 0.005
    stream = client.complete(
        messages=[{"role": "user", "content": "x"}], max_tokens=1500, logit_bias=NO_EOS, stream=True
    )
    next(stream)
    del stream
    gc.collect()
    assert client._service.wait_idle(5)
    assert calls.steps < 200


def test_a_long_prompt_is_prefilled_in_chunks_and_can_be_cancelled(
    make_client: Any, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(kv_cache_entries=0, speculative=False)
    words = " ".join(f"w{i}" for i in range(250))  # over 2 chunks of tiny-model tokens
    answer = client.complete(messages=[{"role": "user", "content": words}], max_tokens=2)
    prompt_tokens = answer.usage.prompt_tokens
    assert prompt_tokens > 2 * PREFILL_CHUNK
    # the prompt in chunks, then the first token (the second is never run: the answer ends)
    assert calls.appended == [PREFILL_CHUNK] * (prompt_tokens // PREFILL_CHUNK) + [
        prompt_tokens % PREFILL_CHUNK,
        1,
    ]
    # chunks give the logits of one append: the same tokens and logprobs
    params = {
        "messages": [{"role": "user", "content": words}],
        "max_tokens": 6,
        "seed": 1,
        "logprobs": True,
    }
    chunked = client.complete(**params)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "PREFILL_CHUNK", 100_000)
        one_append = client.complete(**params)
    assert chunked.choices[0].message.content == one_append.choices[0].message.content
    assert [e.logprob for e in chunked.choices[0].logprobs.content] == pytest.approx(
        [e.logprob for e in one_append.choices[0].logprobs.content], abs=1e-4
    )
    # cancelled between chunks: closing the stream before its first token stops the prefill
    calls.appended.clear()
    calls.delay_s = 0.0
    stream = client.complete(messages=[{"role": "user", "content": words}], stream=True)
    next(stream)  # role chunk: the request entered a batch
    stream.close()
    assert client._service.wait_idle(5)
    assert sum(calls.appended) < prompt_tokens


def test_time_budget_ends_choices_with_length(make_client: Any, calls: Calls) -> None:
    client = make_client(limits=Limits(time_budget_s=0.5))
    calls.delay_s = 0.01
    started = time.monotonic()
    answer = client.complete(
        messages=[{"role": "user", "content": "x"}], max_tokens=1500, logit_bias=NO_EOS, n=2
    )
    assert time.monotonic() - started < 3
    assert [c.finish_reason for c in answer.choices] == ["length", "length"]
    assert 0 < answer.usage.completion_tokens < 200
    assert client._service.wait_idle(5)


def test_limits_refuse_what_is_over_them(make_client: Any) -> None:
    client = make_client(limits=Limits(max_tokens=8, max_output_tokens=12, max_n=3))
    cases = [
        ({"max_tokens": 9}, "max_tokens", "8"),
        ({"n": 4}, "n", "3"),
        ({"n": 2, "max_tokens": 7}, "max_tokens", "12"),
    ]
    for params, param, limit in cases:
        with pytest.raises(ApiError) as info:
            client.complete(messages=[{"role": "user", "content": "x"}], **params)
        assert (info.value.status, info.value.param) == (400, param)
        assert limit in info.value.message
    # no max_tokens: the server's default per choice, not the whole context
    answer = client.complete(messages=[{"role": "user", "content": "x"}], logit_bias=NO_EOS, n=3)
    assert [c.finish_reason for c in answer.choices] == ["length"] * 3
    assert answer.usage.completion_tokens == 3 * 4  # min(8, 12 // 3) each
    with pytest.raises(ValueError, match="max_n"):
        Limits(max_n=0)


def test_a_request_error_does_not_stop_the_engine(make_client: Any) -> None:
    client = make_client()
    with pytest.raises(ApiError) as info:
        client.complete(messages=[{"role": "user", "content": "x"}], logit_bias={40000: 1})
    assert info.value.param == "logit_bias"
    assert client.complete(messages=[{"role": "user", "content": "x"}], max_tokens=2).choices
    client.close()
    with pytest.raises(ApiError) as info:
        client.complete(messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert info.value.status == 503


def test_an_engine_bug_between_units_of_work_ends_the_requests_it_held_not_the_engine(
    make_client: Any, monkeypatch: pytest.MonkeyPatch, within: Any
) -> None:
    """A bug in the engine loop itself (not in a batch's unit of work) fails the requests the
    loop held with a 500; the engine thread lives on and answers the next request."""
    from phi3edge.core import _EngineLoop

    real = _EngineLoop._drop_halted
    broken: list[int] = []

    def drop_halted(self: Any, waiting: Any) -> None:
        if waiting and not broken:
            broken.append(1)
            raise RuntimeError("a bug")
        real(self, waiting)

    monkeypatch.setattr(_EngineLoop, "_drop_halted", drop_halted)
    client = make_client()
    request = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with pytest.raises(ApiError) as info:
        within(60, lambda: client.complete(**request))
    assert (info.value.status, info.value.code) == (500, "internal_error")
    assert within(60, lambda: client.complete(**request)).choices


# ----------------------------------------------------------------------------- over HTTP


@pytest.fixture(params=["thread", "process"])
def live(tiny_fp32: Path, calls: Calls, request: Any) -> Iterator[tuple[str, ChatService]]:
    """A served tiny model, its engine in a thread (model calls recorded) or in a process."""
    service = ChatService(
        tiny_fp32,
        threads=1,
        limits=Limits(max_queue=32),
        engine_process=request.param == "process",
    )
    with running(create_app(service, ServerSettings())) as url:
        yield url, service
    service.close()


def _http_answer(url: str, i: int) -> list[tuple[str, str]]:
    body = {**_request(i), "stream": i % 2 == 0}
    body = {k: v for k, v in body.items() if v is not None}
    with httpx.Client(base_url=url, timeout=60) as http:
        if not body["stream"]:
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return [
                (c["message"]["content"], c["finish_reason"]) for c in response.json()["choices"]
            ]
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line or line == "data: [DONE]":
                    continue
                for choice in json.loads(line.removeprefix("data: "))["choices"]:
                    texts.setdefault(choice["index"], []).append(
                        choice["delta"].get("content") or ""
                    )
                    if choice.get("finish_reason"):
                        finish[choice["index"]] = choice["finish_reason"]
        return [("".join(texts[k]), finish[k]) for k in sorted(texts)]


def test_overlapping_http_requests_get_serial_answers(
    live: tuple[str, ChatService], calls: Calls
) -> None:
    url, service = live
    serial = [_http_answer(url, i) for i in range(12)]
    calls.delay_s = 0.002
    with ThreadPoolExecutor(max_workers=12) as pool:
        assert list(pool.map(lambda i: _http_answer(url, i), range(12))) == serial
    assert calls.most_at_once <= 1 and len(calls.threads) <= 1  # none seen in process mode
    assert service.core.stats.batched_requests > 0
    assert service.wait_idle(5) and service.core.jobs == 0


def test_twenty_streams_dropped_after_their_first_chunk_free_every_slot(
    live: tuple[str, ChatService], calls: Calls
) -> None:
    url, service = live
    calls.delay_s = 0.002
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1500,
        "logit_bias": {str(k): v for k, v in NO_EOS.items()},
        "stream": True,
    }

    def drop(_: int) -> str:
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                return next(response.iter_lines())  # then hang up

    with ThreadPoolExecutor(max_workers=20) as pool:
        firsts = list(pool.map(drop, range(20)))
    assert all(line.startswith("data: {") for line in firsts)
    assert service.wait_idle(10), f"{service.core.jobs} requests still in"
    stopped_at = service.core.stats.work_units
    time.sleep(0.2)
    assert service.core.stats.work_units == stopped_at
    assert stopped_at < 20 * 300  # none ran anywhere near its 1500 tokens
    with httpx.Client(base_url=url, timeout=60) as http:  # and the server answers at once
        ok = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert ok.status_code == 200


# ----------------------------------------------------------------------------- engine process


def test_the_engine_process_answers_like_the_engine_thread(make_client: Any) -> None:
    thread = make_client()
    process = make_client(engine_process=True)
    requests = [_request(i) for i in range(8)]
    expected = [_texts(thread.complete(**r)) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda r: _texts(process.complete(**r)), requests)) == expected
    assert _streamed(process, requests[1]) == expected[1]
    assert [_texts(r) for r in process.complete_batch(requests[:3])] == expected[:3]
    with pytest.raises(ApiError) as info:  # errors cross the process boundary whole
        process.complete(messages=[{"role": "user", "content": "x"}], logit_bias={40000: 1})
    assert (info.value.status, info.value.param) == (400, "logit_bias")
    assert process._service.core.stats.batched_requests > 0
    assert process._service.wait_idle(5) and process._service.core.jobs == 0


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
def test_a_full_queue_answers_429_cancels_and_recovers_at_once(
    make_client: Any, engine_process: bool
) -> None:
    client = make_client(engine_process=engine_process, limits=Limits(max_queue=2))
    core = client._service.core
    long = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 1900,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    streams = [client.complete(**long) for _ in range(2)]
    for stream in streams:
        next(stream), next(stream)
    with pytest.raises(ApiError) as info:
        client.complete(messages=[{"role": "user", "content": "y"}], max_tokens=1)
    assert info.value.status == 429
    for stream in streams:
        stream.close()
    assert client._service.wait_idle(5)
    stopped_at = core.stats.work_units
    time.sleep(0.2)
    assert core.stats.work_units == stopped_at < 2 * 1900
    assert client.complete(messages=[{"role": "user", "content": "y"}], max_tokens=1).choices


def test_a_dead_engine_process_ends_its_jobs_with_503(make_client: Any) -> None:
    client = make_client(engine_process=True)
    core = client._service.core
    stream = client.complete(
        messages=[{"role": "user", "content": "x"}], max_tokens=1900, logit_bias=NO_EOS, stream=True
    )
    next(stream)
    core._link._process.kill()
    with pytest.raises(ApiError) as info:
        list(stream)
    assert info.value.status == 503 and info.value.code == "engine_stopped"
    assert core.jobs == 0 and not core.alive
    with pytest.raises(ApiError) as info:
        client.complete(messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert info.value.status == 503
