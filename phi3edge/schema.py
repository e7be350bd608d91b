"""Chat-completions wire schema: requests in, responses out.

Input: a request body as a dict (JSON, keyword arguments or ``model_extras``), the route it came in
on (``azure`` = the Azure AI Model Inference API, ``openai`` = /v1/...) and the ``extra-parameters``
policy. Output: a validated ``ChatRequest`` whose ``sampling()`` gives the engine plain values; and
the response objects ``ChatCompletions`` / ``StreamingChatCompletionsUpdate`` with attribute access
and ``as_dict()`` in the REST shape. Errors: every bad input becomes ``ApiError`` (400 malformed or
out of range, 422 valid but unsupported by the model), naming the parameter.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from phi3edge.errors import ApiError, bad_request, not_supported

Route = Literal["azure", "openai"]
EXTRA_PARAMETER_POLICIES = ("error", "drop", "pass-through")

# Parameters the Azure chat-completions schema itself defines
# (https://learn.microsoft.com/azure/ai-studio/reference/reference-model-inference-chat-completions).
AZURE_PARAMETERS = frozenset(
    {
        "messages",
        "model",
        "frequency_penalty",
        "presence_penalty",
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "stream",
        "seed",
        "response_format",
        "tools",
        "tool_choice",
    }
)
# What Phi-3 deployments accept beyond that schema when passed through.
PHI3_EXTRA_PARAMETERS = frozenset({"logit_bias", "logprobs", "top_logprobs", "n"})
# OpenAI's chat-completions parameters that are ordinary on the /v1 route.
OPENAI_PARAMETERS = (
    AZURE_PARAMETERS
    | PHI3_EXTRA_PARAMETERS
    | {
        "max_completion_tokens",
        "stream_options",
        "user",
        "parallel_tool_calls",
    }
)
MAX_N = 16
MAX_STOP = 4


# ----------------------------------------------------------------------------- request


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(BaseModel):
    """A validated chat-completions request (Azure field order; extensions fenced below)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    stream: bool = False
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    response_format: dict[str, Any] | None = None
    # --- Phi-3 extra parameters (pass-through on Azure, ordinary on OpenAI) ---
    logit_bias: dict[int, float] = Field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=MAX_N)
    # --- OpenAI-only ---
    include_usage_in_stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and any(isinstance(s, str) and s == "" for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_keys(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("logit_bias must be an object mapping token ids to bias values")
        parsed: dict[int, float] = {}
        for key, bias in value.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias key {key!r} is not a token id") from None
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise ValueError(f"logit_bias[{key}] must be a number")
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{key}] = {bias} is outside -100..100")
            if token < 0:
                raise ValueError(f"logit_bias key {key} is not a valid token id")
            parsed[token] = float(bias)
        return parsed

    def sampling(self) -> SamplingConfig:
        """The only place the wire schema becomes engine parameters."""
        return SamplingConfig(
            temperature=self.temperature,
            # top_p -> 0 keeps only the most likely token; the kernel wants a positive mass.
            top_p=max(self.top_p, 1e-9),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias),
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else 0,
            logprobs=self.logprobs,
            seed=self.seed,
            n=self.n,
            max_tokens=self.max_tokens,
            stop=tuple(self.stop),
        )


@dataclass(frozen=True)
class SamplingConfig:
    """Plain engine-side parameters of one request."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int = 0
    logprobs: bool = False
    seed: int | None = None
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()


def parse_request(
    body: Any, route: Route = "azure", extra_parameters: str | None = None
) -> ChatRequest:
    """Validate a request body; raise ``ApiError`` naming the first bad parameter."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    policy = (extra_parameters or "error").strip().lower()
    if policy not in EXTRA_PARAMETER_POLICIES:
        raise bad_request(
            f"extra-parameters must be one of {', '.join(EXTRA_PARAMETER_POLICIES)}, "
            f"not {extra_parameters!r}",
            param="extra-parameters",
        )
    known = AZURE_PARAMETERS if route == "azure" else OPENAI_PARAMETERS
    extras = [k for k in body if k not in known]  # named even when their value is null
    if extras and route == "azure":
        if policy == "error":
            raise bad_request(
                f"extra parameter '{extras[0]}' is not allowed when extra-parameters is 'error' "
                "(send the header extra-parameters: pass-through to hand it to the model)",
                param=extras[0],
                code="extra_parameters_not_allowed",
            )
        if policy == "drop":
            body = {k: v for k, v in body.items() if k not in extras}
        else:
            unusable = [k for k in extras if k not in PHI3_EXTRA_PARAMETERS]
            if unusable:
                raise not_supported(
                    f"parameter '{unusable[0]}' is not supported by this model", unusable[0]
                )
    elif extras:
        raise bad_request(
            f"unknown parameter '{extras[0]}'", param=extras[0], code="unknown_parameter"
        )

    body = {k: v for k, v in body.items() if v is not None or k == "messages"}
    _reject_unsupported(body)
    body = _normalise_openai(body, route)
    if route == "azure" and isinstance(body.get("temperature"), (int, float)):
        if body["temperature"] > 1:  # the Azure schema's range; OpenAI's is [0, 2]
            raise bad_request(
                "invalid value for 'temperature': must be in [0, 1]",
                param="temperature",
                code="invalid_parameter",
            )
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if request.top_logprobs is not None and not request.logprobs and request.top_logprobs > 0:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    return request


def _reject_unsupported(body: dict[str, Any]) -> None:
    """Features Phi-3 cannot serve: answer 422 instead of ignoring them."""
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) not in (None, [], "none"):
            raise not_supported(f"'{name}' is not supported by Phi-3 models", name)
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        if kind != "text":
            if kind in ("json_object", "json_schema"):
                raise not_supported(
                    f"response_format '{kind}' is not supported by Phi-3 models", "response_format"
                )
            raise bad_request(f"invalid response_format {response_format!r}", "response_format")
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            if message.get("role") == "tool" or message.get("tool_calls"):
                raise not_supported(
                    "tool messages are not supported by Phi-3 models", f"messages[{i}]"
                )
            content = message.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") in ("image_url", "input_audio"):
                        raise not_supported(
                            f"{part['type']} content is not supported by this text-only model",
                            f"messages[{i}].content",
                        )


def _normalise_openai(body: dict[str, Any], route: Route) -> dict[str, Any]:
    body = dict(body)
    if isinstance(body.get("response_format"), str):
        body["response_format"] = {"type": body["response_format"]}
    if route != "openai":
        return body
    if "max_completion_tokens" in body:
        value = body.pop("max_completion_tokens")
        if body.get("max_tokens") not in (None, value):
            raise bad_request("give max_tokens or max_completion_tokens, not both", "max_tokens")
        body["max_tokens"] = value
    options = body.pop("stream_options", None)
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options accepts only include_usage", "stream_options")
        if not body.get("stream"):
            raise bad_request("stream_options requires stream to be true", "stream_options")
        body["include_usage_in_stream"] = bool(options.get("include_usage"))
    body.pop("user", None)  # an end-user id for abuse monitoring; nothing to do locally
    return body


def _validation_error(exc: ValidationError) -> ApiError:
    error = exc.errors()[0]
    location = error.get("loc", ())
    param = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in location)
    param = param.replace(".[", "[")
    message = error.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error.get("type") == "extra_forbidden":
        return bad_request(f"unknown parameter '{param}'", param=param, code="unknown_parameter")
    if error.get("type") == "missing":
        return bad_request(f"'{param}' is required", param=param, code="missing_parameter")
    return bad_request(
        f"invalid value for '{param}': {message}", param=param, code="invalid_parameter"
    )


# ----------------------------------------------------------------------------- response


class _Wire(BaseModel):
    """Response objects: attribute access like the Azure SDK, ``as_dict()`` in the REST shape."""

    model_config = ConfigDict(frozen=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Wire):
    content: list[TokenLogprob]


class ChatResponseMessage(_Wire):
    role: str = "assistant"
    content: str


class ChatChoice(_Wire):
    index: int
    finish_reason: Literal["stop", "length", "content_filter"]
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None


class CompletionsUsage(_Wire):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int


class _Timestamped(_Wire):
    """``created`` is a datetime in Python (as in the Azure SDK) and Unix seconds on the wire."""

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        data["created"] = int(self.created.timestamp())  # type: ignore[attr-defined]
        return data


class ChatCompletions(_Timestamped):
    id: str
    object: str = "chat.completion"
    created: dt.datetime
    model: str
    choices: list[ChatChoice]
    usage: CompletionsUsage


class StreamingChatResponseMessageUpdate(_Wire):
    role: str | None = None
    content: str | None = None


class StreamingChatChoiceUpdate(_Wire):
    index: int
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    delta: StreamingChatResponseMessageUpdate
    logprobs: ChoiceLogprobs | None = None


class StreamingChatCompletionsUpdate(_Timestamped):
    id: str
    object: str = "chat.completion.chunk"
    created: dt.datetime
    model: str
    choices: list[StreamingChatChoiceUpdate]
    usage: CompletionsUsage | None = None


class ModelInfo(_Wire):
    model_name: str
    model_type: str = "chat-completions"
    model_provider_name: str = "Microsoft"
