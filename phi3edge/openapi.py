"""The HTTP shim's OpenAPI description, generated from pydantic models.

Input: nothing at import time but ``phi3edge.schema``; ``install(app, ...)`` is called once by
``server.create_app``. Output: the operation fragments the route decorators use (``AZURE_CHAT``,
``OPENAI_CHAT``, ``*_RESPONSES``) and, in the served ``/openapi.json``, the component schemas they
point to, plus the API-key security schemes when the server requires a key.

Request bodies: the chat routes read and validate their bodies by hand (``schema.parse_request``),
so FastAPI never sees a body model. ``AzureChatCompletionsRequest`` and
``OpenAIChatCompletionsRequest`` below *describe* the wire request for clients and fuzzers; their
fields are exactly ``AZURE_PARAMETERS | PHI3_EXTRA_PARAMETERS`` and ``OPENAI_PARAMETERS`` and their
bounds are ``ChatRequest``'s (tests/test_http_guard.py checks both). They describe what this
server *serves*: features Phi-3 lacks (tools, image parts) are outside the schema and answer
422. Rules JSON Schema cannot state still answer 400: on the Azure route the Phi-3 extras
and any other property follow the ``extra-parameters`` header (so that body admits other
properties; the OpenAI one does not), the prompt plus ``max_tokens`` must fit the context,
``logit_bias`` ids must be in the vocabulary, strings must be valid Unicode (no lone surrogates),
and ``max_tokens`` / ``max_completion_tokens`` must agree when both are given.

Responses: 200 is ``ChatCompletions`` as ``application/json`` or, for ``stream: true``,
``text/event-stream`` whose events carry ``StreamingChatCompletionsUpdate`` (or an in-stream
error) as JSON and end with ``[DONE]``; every error status has the envelope schema and the
``x-ms-error-code`` header. Response schemas come from ``phi3edge.schema``'s models in
serialization mode, with ``created`` as the Unix seconds the wire carries.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema
from pydantic_core import core_schema

from phi3edge.schema import (
    MAX_N,
    MAX_STOP,
    MAX_STOP_LENGTH,
    ChatCompletions,
    ModelInfo,
    StreamingChatCompletionsUpdate,
)

REF = "#/components/schemas/{model}"
_INT64 = {"ge": -(2**63), "le": 2**63 - 1}


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


# ----------------------------------------------------------------------------- request bodies


class TextContentPart(BaseModel):
    """A text part of a message's content."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatRequestMessage(BaseModel):
    """One chat message. Tool messages and image/audio parts answer 422; other keys are ignored."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextContentPart]


class JsonSchemaFormat(BaseModel):
    """The schema the answer must follow (enforced while sampling, whatever ``strict`` says)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="A JSON Schema; none means any JSON value. One that cannot be compiled "
        "into a grammar answers 400 naming response_format, with the reason.",
    )
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text`` (the default), ``json_object`` (any JSON object) or ``json_schema`` (with
    ``json_schema``, and only with it)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    """OpenAI's stream options; needs ``stream: true``."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


_STOP = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
_LOGIT_BIAS = WithJsonSchema(
    {
        "anyOf": [
            {
                "type": "object",
                "description": (
                    "Token id (decimal digits, no leading zeros) -> bias added to its logit; "
                    "an id outside the vocabulary answers 400."
                ),
                "propertyNames": {"pattern": "^(0|[1-9][0-9]*)$", "maxLength": 10},
                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            },
            {"type": "null"},
        ]
    }
)


# Rules between parameters, as JSON Schema conditionals.
_NEEDS_LOGPROBS = {
    "if": {
        "required": ["top_logprobs"],
        "properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
    },
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}
_NEEDS_STREAM = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}


class AzureChatCompletionsRequest(BaseModel):
    """POST /chat/completions body (Azure AI Model Inference). ``null`` means "not given".

    ``logit_bias``, ``logprobs``, ``top_logprobs``, ``n``, ``guided_regex`` and
    ``guided_grammar`` are outside the Azure schema: they need the header
    ``extra-parameters: pass-through``. At most one of a JSON ``response_format``,
    ``guided_regex`` and ``guided_grammar`` per request. Other unknown properties answer 400
    (``extra-parameters: error``, the default), are dropped (``drop``) or answer 422
    (``pass-through``).
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"allOf": [_NEEDS_LOGPROBS]})

    messages: list[ChatRequestMessage] = Field(min_length=1)
    model: str | None = Field(
        None,
        description="The served model (the document lists its name; aliases such as the "
        "Hugging Face id are accepted too, in any case); other names answer 404.",
    )
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Prompt plus max_tokens over the context length answers 400."
    )
    stop: _STOP | Annotated[list[_STOP], Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = None
    seed: int | None = Field(None, **_INT64)
    response_format: ResponseFormat | Literal["text", "json_object"] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(
        None, description="Phi-3 has no tool calling: tools answer 422."
    )
    tool_choice: Literal["none"] | None = Field(None, description="Anything else answers 422.")
    # --- Phi-3 extra parameters ---
    logit_bias: Annotated[dict[str, float] | None, _LOGIT_BIAS] = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Needs logprobs: true.")
    n: int | None = Field(None, ge=1, le=MAX_N)
    guided_regex: str | None = Field(
        None, min_length=1, description="The answer matches this regular expression (Rust regex)."
    )
    guided_grammar: str | None = Field(
        None, min_length=1, description="The answer follows this Lark grammar (llguidance)."
    )


class OpenAIChatCompletionsRequest(AzureChatCompletionsRequest):
    """POST /v1/chat/completions body (OpenAI-compatible); unknown properties answer 400."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"allOf": [_NEEDS_LOGPROBS, _NEEDS_STREAM]}
    )

    temperature: float | None = Field(None, ge=0, le=2)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    stream_options: StreamOptions | None = None
    user: str | None = None
    parallel_tool_calls: Literal[False] | None = Field(None, description="true answers 422.")


# ----------------------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    code: str = Field(description="Also sent as the x-ms-error-code header.")
    message: str
    param: str | None = Field(description="The offending parameter or header, if any.")
    status: int


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"code", "message", "param", "status"}}``."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "engine_stopped"]
    requests: int  # running or waiting for the engine
    max_queue: int  # beyond it, requests are refused with 429


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None  # a LoRA adapter's base model (as vLLM lists adapters)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class WireJsonSchema(GenerateJsonSchema):
    """Datetimes are Unix seconds on the wire (``schema._Timestamped.as_dict``)."""

    def datetime_schema(self, schema: core_schema.DatetimeSchema) -> dict[str, Any]:
        return {"type": "integer", "description": "Unix time in seconds."}


_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (AzureChatCompletionsRequest, "validation"),
    (OpenAIChatCompletionsRequest, "validation"),
    (ChatCompletions, "serialization"),
    (StreamingChatCompletionsUpdate, "serialization"),
    (ModelInfo, "serialization"),
    (ModelList, "serialization"),
    (Health, "serialization"),
    (ErrorResponse, "serialization"),
]


def component_schemas() -> dict[str, Any]:
    """``components.schemas``: every model above and the models they use."""
    _, top = models_json_schema(_MODELS, ref_template=REF, schema_generator=WireJsonSchema)
    return dict(top["$defs"])


# ----------------------------------------------------------------------------- operations

_ERROR_CODE_HEADER = {
    "x-ms-error-code": {
        "description": "The error code, as in the body.",
        "required": True,
        "schema": {"type": "string"},
    }
}


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_ERROR_CODE_HEADER, **headers},
        "content": {"application/json": {"schema": ref("ErrorResponse")}},
    }


def _ok(description: str, model: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(model)}}}


_COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Malformed request, or a Host header this server does not answer for."),
    500: _error("A bug in phi3edge (no internals are disclosed)."),
}
_AUTH_ERROR: dict[int | str, dict[str, Any]] = {
    401: _error(
        "Missing or wrong API key (only when the server requires one).",
        **{"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
}
# One server-sent event (``data: <json>``); ``data: [DONE]`` ends the stream.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "if": {"const": "[DONE]"},
            "else": {
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [ref("StreamingChatCompletionsUpdate"), ref("ErrorResponse")]
                },
            },
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}

CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The completion; with stream: true, data-only server-sent events, each a "
            "chat.completion.chunk (or, after the stream started, one error envelope), then "
            "'data: [DONE]'."
        ),
        "content": {
            "application/json": {"schema": ref("ChatCompletions")},
            "text/event-stream": {"itemSchema": _SSE_EVENT},
        },
    },
    400: _COMMON_ERRORS[400],
    **_AUTH_ERROR,
    404: _error("Unknown model."),
    413: _error("The request body is too large."),
    415: _error("The request body is not sent as application/json."),
    422: _error("Valid, but this model cannot do it (tools, JSON mode, images, ...)."),
    429: _error(
        "Too many requests are running or waiting for the model (the server's max queue).",
        **{
            "Retry-After": {
                "description": "Seconds to wait.",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    ),
    500: _COMMON_ERRORS[500],
    503: _error("The engine has stopped, or the request used its time budget waiting."),
}
INFO_RESPONSES = {200: _ok("The served model.", "ModelInfo"), **_COMMON_ERRORS, **_AUTH_ERROR}
MODELS_RESPONSES = {
    200: _ok("The served model and its adapters.", "ModelList"),
    **_COMMON_ERRORS,
    **_AUTH_ERROR,
}
HEALTH_RESPONSES = {
    200: _ok("The server is up.", "Health"),
    **_COMMON_ERRORS,
    503: _ok("The engine has stopped (status engine_stopped).", "Health"),
}

API_VERSION = {
    "name": "api-version",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "Sent by the Azure SDK; accepted and ignored.",
}
_HELLO = [{"role": "user", "content": "Write a haiku about laptops."}]
_AZURE_EXAMPLES = {
    "complete": {"value": {"messages": _HELLO, "max_tokens": 32, "temperature": 0.7, "seed": 7}},
    "stream": {"value": {"messages": _HELLO, "max_tokens": 32, "stream": True}},
}
_OPENAI_EXAMPLES = {
    **_AZURE_EXAMPLES,
    "logprobs": {
        "value": {"messages": _HELLO, "max_tokens": 8, "n": 2, "logprobs": True, "top_logprobs": 2}
    },
    "stream-with-usage": {
        "value": {
            "messages": _HELLO,
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 1,
        }
    },
}

AZURE_CHAT = {
    "parameters": [
        API_VERSION,
        {
            "name": "extra-parameters",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "enum": ["error", "drop", "pass-through"]},
            "description": "What to do with parameters outside the Azure schema (default error).",
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": ref("AzureChatCompletionsRequest"),
                "examples": _AZURE_EXAMPLES,
            }
        },
    },
}
OPENAI_CHAT = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": ref("OpenAIChatCompletionsRequest"),
                "examples": _OPENAI_EXAMPLES,
            }
        },
    },
}

_SECURITY_SCHEMES = {
    "api-key": {"type": "apiKey", "in": "header", "name": "api-key"},
    "bearer": {"type": "http", "scheme": "bearer"},
}


def install(
    app: FastAPI,
    *,
    model_name: str,
    api_key_required: bool,
    open_paths: frozenset[str],
    adapter_names: tuple[str, ...] = (),
) -> None:
    """Make ``app.openapi()`` add the component schemas (and security when a key is required).

    The document describes this server: the request's ``model`` is an enum of ``model_name``
    and its LoRA adapters' names.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()  # FastAPI's document, cached on app.openapi_schema
            components = document.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            schemas.update(component_schemas())
            for name in ("AzureChatCompletionsRequest", "OpenAIChatCompletionsRequest"):
                model = schemas[name]["properties"]["model"]
                names = [model_name, *adapter_names]
                model["anyOf"] = [{"type": "string", "enum": names}, {"type": "null"}]
            if api_key_required:
                components["securitySchemes"] = _SECURITY_SCHEMES
                for path, operations in document.get("paths", {}).items():
                    if path not in open_paths:
                        for operation in operations.values():
                            operation["security"] = [{name: []} for name in _SECURITY_SCHEMES]
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
