"""The in-process client end to end on tiny random models: shapes, streaming, stops, n, logprobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phi3edge import ApiError, AssistantMessage, ChatCompletionsClient, SystemMessage, UserMessage
from phi3edge.prompt import build_prompt
from phi3edge.schema import parse_request

HELLO = [UserMessage("Tell me a story about a fox.")]


@pytest.fixture(scope="module")
def client(tiny_int4: Path) -> ChatCompletionsClient:
    return ChatCompletionsClient(tiny_int4)


def _prompt_tokens(model_dir: Path) -> int:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "<|user|>\nTell me a story about a fox.<|end|>\n<|assistant|>\n"
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_response_shape_field_by_field(client: ChatCompletionsClient, tiny_int4: Path) -> None:
    response = client.complete(messages=HELLO, max_tokens=6, seed=1)
    body = response.as_dict()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["model"] == "Phi-3-mini-4k-instruct"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == _prompt_tokens(tiny_int4)
    assert response.choices[0].message.content == choice["message"]["content"]
    assert response.created.timestamp() == body["created"]


def test_model_info(client: ChatCompletionsClient) -> None:
    info = client.get_model_info()
    assert (info.model_name, info.model_type, info.model_provider_name) == (
        "Phi-3-mini-4k-instruct",
        "chat-completions",
        "Microsoft",
    )


def test_length_finish_and_usage_counts(client: ChatCompletionsClient) -> None:
    response = client.complete(
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        logit_bias={32007: -100, 32000: -100, 32001: -100},
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_stream_concatenates_to_the_same_text(client: ChatCompletionsClient) -> None:
    kwargs = {"messages": HELLO, "max_tokens": 24, "seed": 42, "temperature": 0.9}
    whole = client.complete(**kwargs)
    updates = list(client.complete(stream=True, **kwargs))
    assert updates[0].choices[0].delta.role == "assistant"
    text = "".join(u.choices[0].delta.content or "" for u in updates if u.choices)
    assert text == whole.choices[0].message.content
    finishes = [u.choices[0].finish_reason for u in updates if u.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert updates[-1].usage is not None and updates[-1].usage.as_dict() == whole.usage.as_dict()
    assert all(u.id == updates[0].id for u in updates)
    assert {u.as_dict()["object"] for u in updates} == {"chat.completion.chunk"}


def test_seed_reproduces_and_n_choices_differ(client: ChatCompletionsClient, tiny_int4) -> None:
    kwargs = {"messages": HELLO, "max_tokens": 12, "seed": 5, "temperature": 1.0, "n": 3}
    first, second = client.complete(**kwargs), client.complete(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) == 3
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.prompt_tokens == _prompt_tokens(tiny_int4)  # counted once
    single = client.complete(messages=HELLO, max_tokens=12, seed=5, temperature=1.0)
    assert single.choices[0].message.content == texts[0]  # row 0 uses stream (seed, 0)


def test_stop_string_ends_the_choice_and_never_appears(client: ChatCompletionsClient) -> None:
    kwargs = {
        "messages": HELLO,
        "max_tokens": 30,
        "seed": 3,
        "temperature": 1.0,
        "logit_bias": {32007: -100},
    }
    text = client.complete(**kwargs).choices[0].message.content
    stop = text[5:8]
    assert len(stop) == 3
    stopped = client.complete(**kwargs, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    streamed = list(client.complete(**kwargs, stop=[stop], stream=True))
    pieces = [u.choices[0].delta.content or "" for u in streamed if u.choices]
    assert "".join(pieces) == text[: text.index(stop)]


def test_logit_bias_forces_a_token(client: ChatCompletionsClient) -> None:
    table = client._service.model.table
    token = next(i for i in range(1000, 2000) if table.token_text(i).strip().isalpha())
    response = client.complete(
        messages=HELLO, max_tokens=4, logit_bias={str(token): 100}, temperature=1.0, seed=0
    )
    assert response.choices[0].message.content.strip() == (table.token_text(token) * 4).strip()


def test_model_extras_like_the_azure_sdk(client: ChatCompletionsClient) -> None:
    response = client.complete(
        messages=HELLO,
        max_tokens=3,
        temperature=0,
        model_extras={"logprobs": True, "top_logprobs": 2, "n": 2},
    )
    assert len(response.choices) == 2
    assert response.choices[0].message.content == response.choices[1].message.content  # greedy
    entries = response.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 for e in entries)


def test_errors_are_api_errors(client: ChatCompletionsClient) -> None:
    cases = [
        ({"temperature": 3}, 400, "temperature"),
        ({"logit_bias": {"40000": 5}}, 400, "logit_bias"),
        ({"response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "gpt-4o"}, 404, "model"),
        ({"frobnicate": 1}, 400, "frobnicate"),
    ]
    for params, status, param in cases:
        with pytest.raises(ApiError) as info:
            client.complete(messages=HELLO, **params)
        assert (info.value.status, info.value.param) == (status, param), params
    with pytest.raises(ApiError, match="5000"):
        client.complete(messages=HELLO, max_tokens=5000)


def test_system_message_is_folded_into_the_user_turn(
    client: ChatCompletionsClient, tiny_int4: Path
) -> None:
    from phi3edge import runtime

    model = runtime.load(tiny_int4, threads=1)
    request = parse_request(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]
        }
    )
    ids = build_prompt(model, request.messages, 4).ids
    expected = model.tokenizer.encode("<|user|>\nBe brief.\n\nHi<|end|>\n<|assistant|>\n")
    assert ids == [int(t) for t in expected]
    response = client.complete(
        messages=[
            SystemMessage("Be brief."),
            UserMessage("Hi"),
            AssistantMessage("Hello"),
            {"role": "user", "content": "More"},
        ],
        max_tokens=2,
    )
    assert response.choices[0].finish_reason in ("stop", "length")


def test_logprobs_match_the_fp32_models_own_logits(tiny_fp32: Path) -> None:
    """Greedy tokens and reported logprobs against onnxruntime run on the whole sequence."""
    import onnxruntime as ort

    from phi3edge import runtime

    fp32 = ChatCompletionsClient(tiny_fp32)
    response = fp32.complete(
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        logit_bias={32007: -100, 32000: -100, 32001: -100},
    )
    model = runtime.load(tiny_fp32, threads=1)
    prompt = build_prompt(
        model, parse_request({"messages": [m.as_dict() for m in HELLO]}).messages, 6
    ).ids
    vocab = {model.table.token_text(i): i for i in range(len(model.table))}
    generated = [vocab[e.token] for e in response.choices[0].logprobs.content]
    session = ort.InferenceSession(str(tiny_fp32 / "model.onnx"))
    ids = np.array([prompt + generated], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((1, 2, 0, 96), np.float32)
    logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
    for step, entry in enumerate(response.choices[0].logprobs.content):
        row = logits[len(prompt) - 1 + step].copy()
        row[[32007, 32000, 32001]] -= 100
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert generated[step] == int(np.argmax(logp))
        assert entry.logprob == pytest.approx(logp[generated[step]], abs=1e-4)
        expected_top = np.argsort(-logp, kind="stable")[:5]
        assert [vocab[t.token] for t in entry.top_logprobs] == list(expected_top)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            logp[expected_top], abs=1e-4
        )
        assert bytes(entry.bytes) == model.table.token_bytes(generated[step])


def _assert_same_logprobs(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The same tokens and alternatives, logprobs within 1e-5: at block 128 (the default layout)
    ONNX Runtime's INT4 kernel rounds an odd-length chunk differently from an even one (about 1e-6
    in the logits), and a reused prefix splits the prompt into other chunks than a cold prefill."""
    assert [t["token"] for t in a["content"]] == [t["token"] for t in b["content"]]
    for mine, theirs in zip(a["content"], b["content"], strict=True):
        assert mine["logprob"] == pytest.approx(theirs["logprob"], abs=1e-5)
        assert [t["token"] for t in mine["top_logprobs"]] == [
            t["token"] for t in theirs["top_logprobs"]
        ]
        assert [t["logprob"] for t in mine["top_logprobs"]] == pytest.approx(
            [t["logprob"] for t in theirs["top_logprobs"]], abs=1e-5
        )


def test_multi_turn_reuses_the_kv_cache_with_identical_results(tiny_int4: Path) -> None:
    cached = ChatCompletionsClient(tiny_int4, kv_cache_entries=1)
    cold = ChatCompletionsClient(tiny_int4, kv_cache_entries=0)
    history: list[dict[str, str]] = []
    for turn in range(4):
        history.append({"role": "user", "content": f"Question number {turn}: why is the sky blue?"})
        kwargs = {
            "messages": history,
            "max_tokens": 8,
            "seed": turn,
            "temperature": 0.8,
            "logprobs": True,
            "top_logprobs": 3,
        }
        a, b = cached.complete(**kwargs), cold.complete(**kwargs)
        assert a.choices[0].message.content == b.choices[0].message.content
        _assert_same_logprobs(a.choices[0].logprobs.as_dict(), b.choices[0].logprobs.as_dict())
        history.append({"role": "assistant", "content": a.choices[0].message.content})
    stats = cached._service.core.stats
    assert stats.prefix_hits == 3 and stats.prefix_reused_tokens > 3 * 20
    assert cold._service.core.stats.prefix_hits == 0
    # an unrelated prompt reuses the kept generator from its start: still the cold answer
    other = {
        "messages": [{"role": "assistant", "content": "Unrelated."}],
        "max_tokens": 8,
        "seed": 1,
    }
    assert cached.complete(**other).choices == cold.complete(**other).choices


def test_thread_setting_reaches_the_onnxruntime_session(tiny_int4: Path) -> None:
    """ONNX Runtime starts threads-1 intra-op workers; count the process's OS threads."""
    import gc
    import os

    def threads_after_load(threads: int) -> int:
        with ChatCompletionsClient(tiny_int4, threads=threads) as client:
            client.complete(messages=HELLO, max_tokens=1)
            count = len(os.listdir("/proc/self/task"))
        gc.collect()
        return count

    one, four = threads_after_load(1), threads_after_load(4)
    assert four - one == 3


def test_complete_batch_answers_in_order_like_single_calls(client: ChatCompletionsClient) -> None:
    """Different prompt lengths, parameters and n in one batch give what single calls give."""
    requests = [
        {
            "messages": [UserMessage("Item " + "very " * (3 * i) + f"number {i} is")],
            "max_tokens": 4 + 3 * i,
            "seed": i,
            "temperature": 0.6 + 0.1 * i,
            "presence_penalty": 0.5 * i,
            "logprobs": True,
            "top_logprobs": 2,
            "n": 1 + i % 2,
        }
        for i in range(5)
    ]
    batch = client.complete_batch(requests)
    singles = [client.complete(**r) for r in requests]
    for b, s in zip(batch, singles, strict=True):
        assert [c.message.content for c in b.choices] == [c.message.content for c in s.choices]
        assert [c.finish_reason for c in b.choices] == [c.finish_reason for c in s.choices]
        assert b.usage.as_dict() == s.usage.as_dict()
        for bc, sc in zip(b.choices, s.choices, strict=True):
            # A batch's step multiplies all its rows at once (M > 1); on AVX2 CPUs onnxruntime's
            # INT4 kernel rounds that differently from one row (M = 1): 0.002 seen on the default
            # layout, up to 0.0125 between a prefill and token-by-token decoding of one prompt.
            got = [e.logprob for e in bc.logprobs.content]
            assert got == pytest.approx([e.logprob for e in sc.logprobs.content], abs=2e-2)
    with pytest.raises(ApiError) as info:
        client.complete_batch([requests[0], {"messages": HELLO, "top_p": 7}])
    assert info.value.param == "requests[1].top_p"
    with pytest.raises(ApiError) as info:
        client.complete_batch([requests[0], {"messages": HELLO, "max_tokens": 4000}])
    assert info.value.param == "requests[1].max_tokens"


def test_one_client_from_many_threads(client: ChatCompletionsClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def ask(i: int) -> str:
        r = client.complete(
            messages=[UserMessage(f"Thread {i}")], max_tokens=6, seed=i, temperature=1.0
        )
        return r.choices[0].message.content

    expected = [ask(i) for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(ask, range(6))) == expected


def test_regression_forced_assistant_token_does_not_end_a_batch_row(tiny_int4: Path) -> None:
    """<|assistant|> is an EOS id in Phi-3's genai_config; forcing it as a batch's last prompt
    token made onnxruntime-genai end the row, and every later step repeated one token."""
    from phi3edge import engine, runtime
    from phi3edge.prompt import Prompt
    from phi3edge.schema import SamplingConfig

    model = runtime.load(tiny_int4)
    prompt = Prompt([32010, *range(300, 310), 32007, 32001], 6)
    cfg = SamplingConfig(temperature=0, logit_bias={32000: -100, 32001: -100, 32007: -100})
    single = [s[0].text for s in engine.generate(model, prompt, cfg)]
    batched = [s[0][1].text for s in engine.generate_batch(model, [engine.BatchItem(prompt, cfg)])]
    assert batched == single and len(set(single)) > 1


def test_a_half_read_stream_does_not_block_the_same_thread(client: ChatCompletionsClient) -> None:
    stream = client.complete(messages=HELLO, max_tokens=6, stream=True)
    next(stream)
    answer = client.complete(messages=HELLO, max_tokens=2)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert list(stream)  # the first stream still finishes


def test_shapes_parse_in_the_reference_client_libraries(client: ChatCompletionsClient) -> None:
    """Our REST JSON read by the Azure SDK's and OpenAI's own response models."""
    from azure.ai.inference import models as azure_models
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    response = client.complete(
        messages=HELLO, max_tokens=4, seed=2, n=2, logprobs=True, top_logprobs=2
    )
    body = response.as_dict()
    azure = azure_models.ChatCompletions(body)
    assert azure.created == response.created and azure.model == response.model
    assert [c.message.content for c in azure.choices] == [
        c.message.content for c in response.choices
    ]
    assert azure.usage.total_tokens == response.usage.total_tokens
    openai_view = ChatCompletion.model_validate(body)
    assert openai_view.choices[1].logprobs.content[0].top_logprobs[1].logprob == (
        response.choices[1].logprobs.content[0].top_logprobs[1].logprob
    )
    for update in client.complete(messages=HELLO, max_tokens=3, seed=2, stream=True):
        chunk = update.as_dict()
        assert azure_models.StreamingChatCompletionsUpdate(chunk).id == update.id
        ChatCompletionChunk.model_validate(chunk)
