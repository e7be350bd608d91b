"""In-process client with the method names and result shapes of azure-ai-inference's client.

Code written for the cloud endpoint changes one constructor::

    client = ChatCompletionsClient("models/phi-3-mini-4k-int4")      # instead of (endpoint, cred)
    response = client.complete(messages=[UserMessage("Hi")], temperature=0)

Input: messages (dicts, the message classes below, or any object with ``role``/``content``) and the
cloud's parameters, directly or in ``model_extras`` (Phi-3's ``logit_bias``, ``logprobs``,
``top_logprobs``, ``n``; phi3edge's ``guided_regex`` and ``guided_grammar``); ``response_format``
as ``"json_object"``, a ``JsonSchemaFormat`` or the REST dict. Output: ``ChatCompletions`` or an
iterator of streaming updates.
Errors: ``ApiError`` with the status, code and param the HTTP shim would send.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3edge.errors import ApiError, bad_request, in_batch
from phi3edge.limits import Limits
from phi3edge.schema import (
    AZURE_PARAMETERS,
    PHI3_EXTRA_PARAMETERS,
    ChatCompletions,
    ChatRequest,
    ModelInfo,
    StreamingChatCompletionsUpdate,
    parse_request,
)
from phi3edge.service import ChatService


@dataclass
class ChatRequestMessage:
    """A chat message (same fields as azure.ai.inference.models' message classes)."""

    content: Any
    role: str = "user"

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}


class SystemMessage(ChatRequestMessage):
    def __init__(self, content: Any) -> None:
        super().__init__(content, "system")


class UserMessage(ChatRequestMessage):
    def __init__(self, content: Any) -> None:
        super().__init__(content, "user")


class AssistantMessage(ChatRequestMessage):
    def __init__(self, content: Any) -> None:
        super().__init__(content, "assistant")


@dataclass
class JsonSchemaFormat:
    """``response_format`` for output that follows a JSON schema (azure.ai.inference.models'
    ``JsonSchemaFormat``, which this client also accepts)."""

    name: str
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        fields = {
            "name": self.name,
            "schema": self.schema,
            "description": self.description,
            "strict": self.strict,
        }
        return {k: v for k, v in fields.items() if v is not None}


_KNOWN = AZURE_PARAMETERS | PHI3_EXTRA_PARAMETERS


class ChatCompletionsClient:
    """Answer chat completions from an exported model folder, in this process."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        kv_cache_entries: int = 1,
        limits: Limits | None = None,
        engine_process: bool = False,
        speculative: bool = True,
        model_extras: dict[str, Any] | None = None,
        **defaults: Any,
    ) -> None:
        """``threads``: ONNX Runtime intra-op threads (default: physical cores).
        ``kv_cache_entries``: conversations whose KV cache is kept for the next turn (0 = off).
        ``limits``: what one request may ask for and how many may wait (``phi3edge.Limits``).
        ``engine_process``: run the model in a child process, so that this process's other
        threads (a UI, a server) keep running while it computes: onnxruntime-genai holds the
        GIL for the whole of each model call.
        ``speculative``: decode a request that runs alone with prompt-lookup drafts (the same
        tokens, fewer model calls when the answer repeats text of the prompt); False: off.

        The model runs on its own engine thread; the client may be used from any number of
        threads, and concurrent requests are batched together."""
        _check_names(defaults)
        self._service = ChatService(
            model_dir,
            threads=threads,
            kv_cache_entries=kv_cache_entries,
            limits=limits,
            engine_process=engine_process,
            speculative=speculative,
        )
        self._defaults = defaults
        self._model_extras = dict(model_extras or {})

    def get_model_info(self) -> ModelInfo:
        return self._service.model_info()

    def complete(
        self,
        body: dict[str, Any] | None = None,
        *,
        messages: list[Any] | None = None,
        stream: bool | None = None,
        model_extras: dict[str, Any] | None = None,
        **params: Any,
    ) -> ChatCompletions | Iterator[StreamingChatCompletionsUpdate]:
        """As ``azure.ai.inference.ChatCompletionsClient.complete``; ``stream=True`` -> updates.

        Closing a stream (or dropping it) cancels its generation."""
        request = self._request(
            params, body=body, messages=messages, stream=stream, model_extras=model_extras
        )
        if request.stream:
            return self._service.stream(request)
        return self._service.complete(request)

    def _request(
        self,
        params: dict[str, Any],
        body: dict[str, Any] | None = None,
        messages: list[Any] | None = None,
        stream: bool | None = None,
        model_extras: dict[str, Any] | None = None,
    ) -> ChatRequest:
        """Merge constructor defaults, body, keyword arguments and model_extras; validate."""
        messages = params.pop("messages", messages)
        stream = params.pop("stream", stream)
        model_extras = params.pop("model_extras", model_extras)
        _check_names(params)
        request_body: dict[str, Any] = {**self._defaults, **(body or {})}
        request_body.update(params)
        if messages is not None:
            request_body["messages"] = messages
        if stream is not None:
            request_body["stream"] = stream
        request_body.update(model_extras if model_extras is not None else self._model_extras)
        request_body["messages"] = [_message_dict(m) for m in request_body.get("messages") or []]
        response_format = request_body.get("response_format")
        if hasattr(response_format, "as_dict"):  # a JsonSchemaFormat, ours or the Azure SDK's
            schema_format = dict(response_format.as_dict())
            request_body["response_format"] = {"type": "json_schema", "json_schema": schema_format}
        return parse_request(request_body, route="azure", extra_parameters="pass-through")

    def complete_batch(self, requests: list[dict[str, Any]]) -> list[ChatCompletions]:
        """Answer many requests (each a dict of ``complete`` keyword arguments) in one batch.

        Results come back in order. Every request is validated before any runs, so a bad one
        fails the batch up front with its index in ``ApiError.param``.
        """
        prepared = []
        for index, params in enumerate(requests):
            try:
                request = self._request(dict(params))
            except ApiError as exc:
                raise in_batch(exc, index) from None
            if request.stream:
                raise bad_request("complete_batch does not stream", f"requests[{index}].stream")
            prepared.append(request)
        return self._service.complete_batch(prepared)

    def close(self) -> None:
        """Cancel what is running and free the model (also done when the client is collected)."""
        self._service.close()

    def __enter__(self) -> ChatCompletionsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_names(params: dict[str, Any]) -> None:
    for name in params:
        if name not in _KNOWN:
            raise bad_request(f"unknown parameter '{name}'", param=name, code="unknown_parameter")


def _message_dict(message: Any) -> Any:
    if isinstance(message, dict):
        return message
    if hasattr(message, "as_dict"):
        return message.as_dict()
    if hasattr(message, "role") and hasattr(message, "content"):
        return {
            "role": str(getattr(message.role, "value", message.role)),
            "content": message.content,
        }
    return message  # schema validation reports it with its index
