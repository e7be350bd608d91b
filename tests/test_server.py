"""The HTTP shim end to end: the real SDKs against a live uvicorn server over a tiny random model.

A module-scoped uvicorn server (with an API key) serves the Azure and OpenAI SDK tests, the
bad-input matrix and the disconnect test; ``client_factory`` builds in-process apps with other
settings (CORS, queue size, patched services).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from phi3edge import engine
from phi3edge.limits import Limits
from phi3edge.server import ServerSettings, create_app, running
from phi3edge.service import ChatService

KEY = "test-key-0123"
AUTH = {"api-key": KEY}
HELLO = [{"role": "user", "content": "Tell me a story about a fox."}]
NO_EOS = {"32007": -100, "32000": -100, "32001": -100}  # keep generating until max_tokens


@dataclass
class Live:
    url: str
    app: FastAPI
    service: ChatService


@pytest.fixture(scope="module")
def live(service: ChatService) -> Iterator[Live]:
    app = create_app(service, ServerSettings(api_key=KEY))
    with running(app) as url:
        yield Live(url, app, service)


@pytest.fixture
def http(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every decode step take 10 ms and count the steps the engine runs."""
    steps: list[int] = []
    real = engine.generate

    def counting(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for step in real(*args, **kwargs):
            steps.append(1)
            time.sleep(0.01)
            yield step

    monkeypatch.setattr(engine, "generate", counting)
    return steps


def _events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line:
            assert line.startswith("data: "), line
            yield line[len("data: ") :]


def _wait_idle(live: Live, timeout: float = 5.0) -> None:
    """Wait until no request is running or waiting for the engine."""
    assert live.service.wait_idle(timeout), "generation did not stop"


# ----------------------------------------------------------------------------- azure-ai-inference


@pytest.fixture
def azure(live: Live) -> Iterator[Any]:
    from azure.ai.inference import ChatCompletionsClient
    from azure.core.credentials import AzureKeyCredential

    with ChatCompletionsClient(endpoint=live.url, credential=AzureKeyCredential(KEY)) as client:
        yield client


class _Capture:
    """An azure-core ``raw_request_hook`` that keeps what the SDK actually sent."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: dict[str, Any] = {}
        self.url = ""

    def __call__(self, pipeline_request: Any) -> None:
        request = pipeline_request.http_request
        self.headers = {k.lower(): v for k, v in request.headers.items()}
        self.body = json.loads(request.content)
        self.url = request.url


def test_azure_sdk_get_model_info(azure: Any) -> None:
    info = azure.get_model_info()
    assert (info.model_name, info.model_type, info.model_provider_name) == (
        "Phi-3-mini-4k-instruct",
        "chat-completions",
        "Microsoft",
    )


def test_azure_sdk_complete_with_cloud_parameters(azure: Any) -> None:
    from azure.ai.inference.models import SystemMessage, UserMessage

    sent = _Capture()
    params: dict[str, Any] = {
        "messages": [SystemMessage("Be brief."), UserMessage("Tell me a story about a fox.")],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "max_tokens": 8,
        "stop": ["\n\n\n"],
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 11,
    }
    response = azure.complete(**params, response_format="text", raw_request_hook=sent)
    # What the SDK puts on the wire: Bearer auth, api-version, {"type": "text"}, no extras header.
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert "api-version=" in sent.url and "extra-parameters" not in sent.headers
    assert sent.body["response_format"] == {"type": "text"}
    assert sent.body["seed"] == 11 and sent.body["stop"] == ["\n\n\n"]
    assert response.model == "Phi-3-mini-4k-instruct" and response.id.startswith("chatcmpl-")
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert "\n\n\n" not in choice.message.content
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )
    again = azure.complete(**params)
    assert again.choices[0].message.content == choice.message.content  # seed reproduces


def test_azure_sdk_stream_concatenates_to_the_complete_text(azure: Any) -> None:
    from azure.ai.inference.models import UserMessage

    kwargs: dict[str, Any] = {
        "messages": [UserMessage("Tell me a story about a fox.")],
        "max_tokens": 24,
        "seed": 42,
        "temperature": 0.9,
    }
    whole = azure.complete(**kwargs)
    updates = list(azure.complete(stream=True, **kwargs))
    text = "".join(u.choices[0].delta.content or "" for u in updates if u.choices)
    assert text == whole.choices[0].message.content
    assert updates[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert updates[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_azure_sdk_model_extras_send_pass_through(azure: Any, service: ChatService) -> None:
    from azure.ai.inference.models import UserMessage

    table = service.model.table
    token = next(i for i in range(1000, 2000) if table.token_text(i).strip().isalpha())
    sent = _Capture()
    response = azure.complete(
        messages=[UserMessage("Hi")],
        max_tokens=3,
        temperature=1.0,
        seed=3,
        model_extras={"logprobs": True, "top_logprobs": 3, "n": 2, "logit_bias": {token: 100}},
        raw_request_hook=sent,
    )
    assert sent.headers["extra-parameters"] == "pass-through"  # set by the SDK itself
    assert len(response.choices) == 2
    for choice in response.choices:
        assert choice.message.content.strip() == (table.token_text(token) * 3).strip()
        entries = choice["logprobs"]["content"]
        assert len(entries) == 3 and all(len(e["top_logprobs"]) == 3 for e in entries)
        assert entries[0]["top_logprobs"][0]["token"] == table.token_text(token)


@pytest.mark.parametrize(
    ("params", "status", "code", "words"),
    [
        ({"top_p": 1.5}, 400, "invalid_parameter", "top_p"),
        ({"max_tokens": 5000}, 400, "context_length_exceeded", "5000"),
        ({"model": "gpt-4o"}, 404, "model_not_found", "gpt-4o"),
    ],
)
def test_azure_sdk_errors_carry_status_and_code(
    azure: Any, params: dict[str, Any], status: int, code: str, words: str
) -> None:
    from azure.ai.inference.models import UserMessage
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError) as info:
        azure.complete(messages=[UserMessage("Hi")], **params)
    assert info.value.status_code == status
    assert info.value.error.code == code and words in info.value.error.message
    assert info.value.response.headers["x-ms-error-code"] == code


def test_azure_sdk_wrong_key_is_an_authentication_error(live: Live) -> None:
    from azure.ai.inference import ChatCompletionsClient
    from azure.ai.inference.models import UserMessage
    from azure.core.credentials import AzureKeyCredential
    from azure.core.exceptions import ClientAuthenticationError

    with ChatCompletionsClient(live.url, AzureKeyCredential("wrong")) as client:
        with pytest.raises(ClientAuthenticationError) as info:
            client.complete(messages=[UserMessage("Hi")], max_tokens=2)
    assert info.value.status_code == 401 and info.value.error.code == "unauthorized"


# ----------------------------------------------------------------------------- openai


@pytest.fixture
def openai_client(live: Live) -> Iterator[Any]:
    from openai import OpenAI

    with OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=30) as client:
        yield client


def test_openai_create_with_openai_parameters(openai_client: Any, service: ChatService) -> None:
    table = service.model.table
    token = next(i for i in range(1000, 2000) if table.token_text(i).strip().isalpha())
    response = openai_client.chat.completions.create(
        model="Phi-3-mini-4k-instruct",
        messages=HELLO,
        n=2,
        logprobs=True,
        top_logprobs=2,
        logit_bias={str(token): 100},
        seed=5,
        stop=["zzzz"],
        max_tokens=4,
    )
    assert response.object == "chat.completion" and len(response.choices) == 2
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert choice.message.content.strip() == (table.token_text(token) * 4).strip()
        assert choice.finish_reason == "length"
        assert [e.token for e in choice.logprobs.content] == [table.token_text(token)] * 4
        assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    assert response.usage.completion_tokens == 8  # summed over both choices


def test_openai_stream_with_include_usage(openai_client: Any) -> None:
    kwargs: dict[str, Any] = {
        "model": "phi3edge",
        "messages": HELLO,
        "max_tokens": 6,
        "seed": 9,
        "logit_bias": NO_EOS,
    }
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(
        openai_client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(openai_client.chat.completions.create(stream=True, **kwargs))
    assert all(c.usage is None for c in plain)  # no usage unless include_usage asks for it


def test_openai_bad_request_raises(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="phi3edge", messages=HELLO, top_logprobs=21)
    assert info.value.status_code == 400 and info.value.code == "invalid_parameter"
    assert info.value.param == "top_logprobs"


def test_openai_models_list(openai_client: Any) -> None:
    (model,) = openai_client.models.list().data
    assert (model.id, model.object, model.owned_by) == (
        "Phi-3-mini-4k-instruct",
        "model",
        "microsoft",
    )
    assert model.created > 0


# ----------------------------------------------------------------------------- bad input matrix

AZ, OA = "/chat/completions", "/v1/chat/completions"


def _msgs(**params: Any) -> dict[str, Any]:
    return {"messages": HELLO, **params}


_H = b'{"messages": [{"role": "user", "content": "hi"}]'  # a body to continue by hand


# (id, method, path, extra headers, json body or raw bytes, status, code)
BAD_INPUT: list[tuple[str, str, str, dict[str, str], Any, int, str]] = [
    ("malformed-json", "POST", AZ, {}, b'{"messages": [', 400, "invalid_json"),
    ("nan-literal", "POST", OA, {}, b'{"messages": [], "top_p": NaN}', 400, "invalid_json"),
    ("not-utf8", "POST", AZ, {}, b'{"messages": "\xff\xfe"}', 400, "invalid_json"),
    ("empty-body", "POST", OA, {}, b"", 400, "invalid_json"),
    ("deeply-nested", "POST", AZ, {}, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("array-body", "POST", AZ, {}, [HELLO], 400, "invalid_request"),
    ("missing-messages", "POST", AZ, {}, {"max_tokens": 3}, 400, "missing_parameter"),
    ("empty-messages", "POST", OA, {}, {"messages": []}, 400, "invalid_parameter"),
    ("messages-string", "POST", AZ, {}, {"messages": "hi"}, 400, "invalid_parameter"),
    ("bad-role", "POST", OA, {}, {"messages": [{"role": "wizard"}]}, 400, "invalid_parameter"),
    ("temperature-string", "POST", OA, {}, _msgs(temperature="hot"), 400, "invalid_parameter"),
    # Azure allows temperature 0..1; schema checks that by hand, with the generic code.
    ("azure-temperature-1.5", "POST", AZ, {}, _msgs(temperature=1.5), 400, "invalid_parameter"),
    ("openai-temperature-2.5", "POST", OA, {}, _msgs(temperature=2.5), 400, "invalid_parameter"),
    ("top-p-1.5", "POST", AZ, {}, _msgs(top_p=1.5), 400, "invalid_parameter"),
    ("max-tokens-0", "POST", OA, {}, _msgs(max_tokens=0), 400, "invalid_parameter"),
    ("presence-3", "POST", OA, {}, _msgs(presence_penalty=3), 400, "invalid_parameter"),
    ("frequency--3", "POST", AZ, {}, _msgs(frequency_penalty=-3), 400, "invalid_parameter"),
    ("n-0", "POST", OA, {}, _msgs(n=0), 400, "invalid_parameter"),
    ("n-17", "POST", OA, {}, _msgs(n=17), 400, "invalid_parameter"),
    ("top-logprobs-21", "POST", OA, {}, _msgs(logprobs=True, top_logprobs=21), 400,
     "invalid_parameter"),
    ("logit-bias-out-of-vocab", "POST", OA, {}, _msgs(logit_bias={"99999": 1}), 400,
     "invalid_request"),
    ("logit-bias-200", "POST", OA, {}, _msgs(logit_bias={"5": 200}), 400, "invalid_parameter"),
    ("five-stops", "POST", AZ, {}, _msgs(stop=list("abcde")), 400, "invalid_parameter"),
    ("stream-options-without-stream", "POST", OA, {},
     _msgs(stream_options={"include_usage": True}), 400, "invalid_request"),
    ("azure-extra-default-error", "POST", AZ, {}, _msgs(logprobs=True), 400,
     "extra_parameters_not_allowed"),
    ("azure-extra-explicit-error", "POST", AZ, {"extra-parameters": "error"}, _msgs(n=2), 400,
     "extra_parameters_not_allowed"),
    ("azure-pass-through-unknown", "POST", AZ, {"extra-parameters": "pass-through"},
     _msgs(frobnicate=1), 422, "parameter_not_supported"),
    ("azure-bad-extra-header", "POST", AZ, {"extra-parameters": "maybe"}, _msgs(), 400,
     "invalid_request"),
    ("openai-unknown-param", "POST", OA, {}, _msgs(frobnicate=1), 400, "unknown_parameter"),
    ("context-overflow", "POST", AZ, {}, _msgs(max_tokens=5000), 400, "context_length_exceeded"),
    ("context-overflow-stream", "POST", OA, {}, _msgs(max_tokens=5000, stream=True), 400,
     "context_length_exceeded"),
    ("unknown-model", "POST", OA, {}, _msgs(model="gpt-4o"), 404, "model_not_found"),
    ("unknown-model-stream", "POST", AZ, {}, _msgs(model="gpt-4o", stream=True), 404,
     "model_not_found"),
    ("tools", "POST", OA, {}, _msgs(tools=[{"type": "function", "function": {"name": "f"}}]), 422,
     "parameter_not_supported"),
    ("bad-json-schema", "POST", AZ, {},
     _msgs(response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                   "schema": {"type": "frob"}}}),
     400, "invalid_parameter"),
    ("image-content", "POST", OA, {},
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 422,
     "parameter_not_supported"),
    ("tool-message", "POST", AZ, {}, {"messages": [{"role": "tool", "content": "x"}]}, 422,
     "parameter_not_supported"),
    ("oversized-body", "POST", OA, {}, _msgs(user="x" * (4 * 1024 * 1024)), 413,
     "payload_too_large"),
    ("unknown-route", "POST", "/v1/completions", {}, _msgs(), 404, "not_found"),
    ("get-on-post-route", "GET", AZ, {}, None, 405, "method_not_allowed"),
    ("post-on-get-route", "POST", "/info", {}, None, 405, "method_not_allowed"),
    ("missing-key", "POST", AZ, {"api-key": ""}, _msgs(), 401, "unauthorized"),
    ("wrong-key", "POST", AZ, {"api-key": "nope"}, _msgs(), 401, "unauthorized"),
    ("wrong-bearer", "GET", "/v1/models", {"api-key": "", "Authorization": "Bearer nope"}, None,
     401, "unauthorized"),
    ("key-on-unknown-route", "GET", "/admin", {"api-key": "nope"}, None, 401, "unauthorized"),
    # found by fuzzing: each was a 500, a wrong reading or a silent acceptance
    ("lone-surrogate-content", "POST", OA, {},
     b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "invalid_parameter"),
    ("lone-surrogate-stream", "POST", OA, {},
     b'{"stream": true, "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "invalid_parameter"),
    ("lone-surrogate-model", "POST", AZ, {}, _H + b', "model": "\\udc00"}', 400,
     "invalid_parameter"),
    ("lone-surrogate-stop", "POST", OA, {}, _H + b', "stop": ["ok", "\\ud800"]}', 400,
     "invalid_parameter"),
    ("lone-surrogate-param-name", "POST", OA, {}, _H + b', "x\\ud800": 1}', 400,
     "invalid_parameter"),
    ("lone-surrogate-param-name-azure", "POST", AZ, {}, _H + b', "x\\ud800": 1}', 400,
     "invalid_parameter"),
    ("message-without-content", "POST", OA, {}, {"messages": [{"role": "user"}]}, 400,
     "missing_parameter"),
    ("message-null-content", "POST", AZ, {}, {"messages": [{"role": "user", "content": None}]},
     400, "invalid_parameter"),
    ("content-number", "POST", AZ, {}, {"messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_parameter"),
    ("text-part-number", "POST", AZ, {},
     {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "invalid_parameter"),
    ("logit-bias-400-digits", "POST", OA, {}, _H + b', "logit_bias": {"5": 1' + b"0" * 400 + b"}}",
     400, "invalid_parameter"),
    ("logit-bias-noncanonical-key", "POST", OA, {}, _msgs(logit_bias={" 1_0 ": 1}), 400,
     "invalid_parameter"),
    ("stop-1mb", "POST", OA, {}, _msgs(stop="x" * 1_000_000), 400, "invalid_parameter"),
    ("stop-1000", "POST", AZ, {}, _msgs(stop=["a"] * 1000), 400, "invalid_parameter"),
    ("include-usage-string", "POST", OA, {},
     _msgs(stream=True, stream_options={"include_usage": "no"}), 400, "invalid_parameter"),
    ("max-tokens-over-the-limit", "POST", OA, {}, _msgs(max_tokens=1000, n=16), 400,
     "invalid_parameter"),
    ("text-plain-body", "POST", OA, {"Content-Type": "text/plain"}, _msgs(), 415,
     "unsupported_media_type"),
    ("foreign-host", "POST", OA, {"Host": "evil.example"}, _msgs(), 400, "invalid_host"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_answers_the_error_envelope(
    http: httpx.Client,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    code: str,
) -> None:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    response = http.request(
        method,
        path,
        headers={"Content-Type": "application/json", **headers},
        content=content,
        params={"api-version": "2024-05-01-preview"},
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-ms-error-code"] == code
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (code, status)
    assert set(error) == {"code", "message", "param", "status"} and error["message"]


def test_bad_input_matrix_is_broad() -> None:
    assert len(BAD_INPUT) >= 25 and len({c[0] for c in BAD_INPUT}) == len(BAD_INPUT)


def test_error_names_the_parameter(http: httpx.Client) -> None:
    response = http.post(OA, json=_msgs(max_tokens=5000))
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and "5000" in error["message"]
    assert "2048" in error["message"]  # both numbers
    response = http.post(AZ, json=_msgs(logprobs=True))
    assert response.json()["error"]["param"] == "logprobs"


def test_extra_parameters_drop_ignores_unknown_parameters(http: httpx.Client) -> None:
    response = http.post(
        AZ, json=_msgs(frobnicate=1, n=3, max_tokens=2), headers={"extra-parameters": "drop"}
    )
    assert response.status_code == 200
    assert len(response.json()["choices"]) == 1  # n was dropped too


def test_openai_route_ignores_the_extra_parameters_header(http: httpx.Client) -> None:
    response = http.post(OA, json=_msgs(n=2, max_tokens=1), headers={"extra-parameters": "bogus"})
    assert response.status_code == 200 and len(response.json()["choices"]) == 2


def test_stream_is_data_only_sse_ending_with_done(http: httpx.Client) -> None:
    response = http.post(AZ, json=_msgs(max_tokens=3, stream=True, seed=1))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3  # Azure: usage on the last chunk
    assert all("usage" not in c for c in chunks[:-1])


def test_both_key_headers_are_accepted_and_health_is_open(live: Live) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        health = client.get("/health").json()
        assert health == {"status": "ok", "requests": 0, "max_queue": 16}
        assert client.get("/info", headers={"api-key": KEY}).status_code == 200
        bearer = client.get("/models/info", headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.json()["model_name"] == "Phi-3-mini-4k-instruct"
        denied = client.get("/info")
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"


# ----------------------------------------------------------------------------- internal errors


def test_internal_error_is_a_json_500_without_internals(
    client_factory: Callable[..., TestClient],
    service: ChatService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(service, "acomplete", broken)
    client = client_factory()
    response = client.post(OA, json=_msgs(max_tokens=2))
    assert response.status_code == 500
    assert response.headers["x-ms-error-code"] == "internal_error"
    assert response.json() == {
        "error": {
            "code": "internal_error",
            "message": "internal error",
            "param": None,
            "status": 500,
        }
    }
    assert "secret detail" not in response.text and "Traceback" not in response.text
    assert "secret detail" in caplog.text  # logged on our side
    assert service.wait_idle(5)


def test_error_after_the_first_chunk_goes_out_in_the_stream(
    client_factory: Callable[..., TestClient],
    service: ChatService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = service.astream

    async def failing(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        chunks = real(*args, **kwargs)
        try:
            yield await anext(chunks)
            raise RuntimeError("secret detail")
        finally:
            await chunks.aclose()

    monkeypatch.setattr(service, "astream", failing)
    client = client_factory()
    with client.stream("POST", OA, json=_msgs(max_tokens=4, stream=True)) as response:
        assert response.status_code == 200
        events = list(_events(response.iter_lines()))
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(events[-1])["error"]["code"] == "internal_error"
    assert "[DONE]" not in events and "secret detail" not in "".join(events)
    assert service.wait_idle(5)


# ----------------------------------------------------------------------------- queue and disconnect


def test_queue_full_answers_429_and_admitted_requests_are_served(
    tiny_int4: Path, slow_steps: list[int]
) -> None:
    service = ChatService(tiny_int4, threads=1, limits=Limits(max_queue=2))
    app = create_app(service, ServerSettings())
    body = _msgs(max_tokens=1000, logit_bias=NO_EOS)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", OA, json={**body, "stream": True}) as holder:
            lines = holder.iter_lines()  # keep it: a collected iterator closes the connection
            assert next(lines).startswith("data: ")  # the model is busy with this stream now
            waiting: queue.Queue[httpx.Response] = queue.Queue()
            thread = threading.Thread(
                target=lambda: waiting.put(client.post(OA, json=_msgs(max_tokens=3)))
            )
            thread.start()
            deadline = time.monotonic() + 5
            while service.core.jobs < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = client.post(OA, json=_msgs(max_tokens=3))
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "too_many_requests"
            assert refused.headers["x-ms-error-code"] == "too_many_requests"
        served = waiting.get(timeout=20)  # waited for the model, then answered
        thread.join()
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 3
        assert client.post(OA, json=_msgs(max_tokens=2)).status_code == 200
    assert service.wait_idle(5) and service.core.jobs == 0
    service.close()


def test_client_disconnect_stops_generation(live: Live, slow_steps: list[int]) -> None:
    body = _msgs(max_tokens=1500, logit_bias=NO_EOS, stream=True)
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        with client.stream("POST", OA, json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    _wait_idle(live, timeout=5)  # 1500 steps of 10 ms would hold the model for 15 s or more
    stopped_at = len(slow_steps)
    time.sleep(0.2)
    assert len(slow_steps) == stopped_at < 500


def test_client_disconnect_stops_a_non_streamed_generation(
    live: Live, slow_steps: list[int]
) -> None:
    body = _msgs(max_tokens=1500, logit_bias=NO_EOS)
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(OA, json=body)  # the client gives up and closes the connection
    _wait_idle(live, timeout=5)
    stopped_at = len(slow_steps)
    time.sleep(0.2)
    assert len(slow_steps) == stopped_at < 500


# ----------------------------------------------------------------------------- app surface


def test_openapi_lists_exactly_the_routes(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {path: set(ops) for path, ops in paths.items()} == {
        "/health": {"get"},
        "/info": {"get"},
        "/models/info": {"get"},
        "/chat/completions": {"post"},
        "/v1/chat/completions": {"post"},
        "/v1/models": {"get"},
    }
    assert "api-version" in {p["name"] for p in paths["/chat/completions"]["post"]["parameters"]}


def test_cors_is_off_by_default_and_on_when_configured(
    client_factory: Callable[..., TestClient],
) -> None:
    preflight = {"Origin": "http://app.local", "Access-Control-Request-Method": "POST"}
    plain = client_factory(api_key=KEY)
    assert "access-control-allow-origin" not in plain.options(AZ, headers=preflight).headers
    cors = client_factory(api_key=KEY, cors_origins=("http://app.local",))
    answer = cors.options(AZ, headers=preflight)  # preflight carries no key
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "http://app.local"


def test_body_limit_is_a_setting(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(max_body_bytes=64)
    response = client.post(OA, json=_msgs(user="x" * 100))
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    small = client.post(OA, content=b"[]", headers={"Content-Type": "application/json"})
    assert small.status_code == 400 and small.json()["error"]["code"] == "invalid_request"


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        Limits(max_queue=0)
    assert ServerSettings().host == "127.0.0.1" and ServerSettings().cors_origins == ()


def test_cli_serve_port_0_prints_the_real_url(tiny_int4: Path, tmp_path: Path) -> None:
    """The installed package, as a user runs it (cwd away from the source tree)."""
    command = [sys.executable, "-m", "phi3edge.cli", "serve", str(tiny_int4), "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=90)
        match = re.fullmatch(
            r"phi3edge serving Phi-3-mini-4k-instruct at (http://127\.0\.0\.1:(\d+)) "
            r"\(routes: /chat/completions, /v1/chat/completions\)\n",
            line,
        )
        assert match and int(match[2]) > 0, line
        assert httpx.get(f"{match[1]}/health", timeout=10).json()["status"] == "ok"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) is not None
