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
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from phi3edge.errors import ApiError, bad_request, not_supported
from phi3edge.guidance import ANY_JSON_OBJECT, Grammar

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
# What Phi-3 deployments accept beyond that schema when passed through, plus phi3edge's own
# constraints (vLLM's names): output that matches a regular expression or a Lark grammar.
GUIDED_PARAMETERS = frozenset({"guided_regex", "guided_grammar"})
PHI3_EXTRA_PARAMETERS = (
    frozenset({"logit_bias", "logprobs", "top_logprobs", "n"}) | GUIDED_PARAMETERS
)
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
MAX_MESSAGES = 50_000  # each message takes 3+ tokens: more never fit in a 128k context
MAX_STOP = 4
# Characters per stop sequence: every generated token is checked against every stop string, and
# nothing in a chat answer needs a longer one (OpenAI does not publish a limit; 256 is ours).
MAX_STOP_LENGTH = 256
# The largest logit_bias key we parse (the engine then checks it against the vocabulary).
MAX_TOKEN_ID = 2**31 - 1
# Deepest [ / { nesting a JSON body may have. Checked before json.loads, whose C scanner recurses
# once per level: near the interpreter's recursion limit a garbage collection that runs a
# finalizer then fails inside it, where no handler can catch it. A chat request (response_format
# schemas included) nests far less than this.
MAX_JSON_DEPTH = 128


# ----------------------------------------------------------------------------- request


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    # Required for every role: without tools there is no message whose content may be left out.
    content: str | list[_TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("content must be a string or a list of text parts, not null")
        if not isinstance(value, (str, list)):
            raise ValueError("content must be a string or a list of text parts")
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema`` (OpenAI's shape; the Azure SDK's ``JsonSchemaFormat``)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # No schema: any JSON value. "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Enforced either way: the sampler cannot produce output outside the schema.
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "json_object":
            return Grammar.from_json_schema(ANY_JSON_OBJECT, "response_format")
        if self.json_schema is not None:
            return Grammar.from_json_schema(self.json_schema.json_schema, "response_format")
        return None


class ChatRequest(BaseModel):
    """A validated chat-completions request (Azure field order; extensions fenced below)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # fail_fast: a body of a million bad messages is refused at the first, not after listing all
    messages: list[Message] = Field(min_length=1, fail_fast=True)
    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    # Checked (with the request's own param names) by _check_stop before validation; kept as a net.
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] = Field(
        default_factory=list, max_length=MAX_STOP
    )
    stream: bool = False
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    response_format: ResponseFormat | None = None
    # --- Phi-3 extra parameters (pass-through on Azure, ordinary on OpenAI) ---
    logit_bias: dict[int, float] = Field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=MAX_N)
    guided_regex: str | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, min_length=1)  # Lark
    # --- OpenAI-only ---
    include_usage_in_stream: bool = False
    # The constraint compiled from response_format / guided_* (here, off the engine thread).
    _grammar: Grammar | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _compile_grammar(self) -> ChatRequest:
        """At most one constraint per request, compiled once (an ApiError names the parameter)."""
        response_format = self.response_format
        given = [
            name
            for name, wanted in (
                ("response_format", response_format is not None and response_format.type != "text"),
                ("guided_regex", self.guided_regex is not None),
                ("guided_grammar", self.guided_grammar is not None),
            )
            if wanted
        ]
        if len(given) > 1:
            raise bad_request(f"give one of {' and '.join(given)}, not both", given[1])
        if response_format is not None:
            self._grammar = response_format.grammar()
        if self.guided_regex is not None:
            self._grammar = Grammar.from_regex(self.guided_regex, "guided_regex")
        if self.guided_grammar is not None:
            self._grammar = Grammar.from_lark(self.guided_grammar, "guided_grammar")
        return self

    @field_validator("max_tokens", "seed", "top_logprobs", "n", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """JSON has one number type: 16.0 is the integer 16 (as JSON Schema counts it)."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
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
            token = _token_id(key)
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise ValueError(f"logit_bias[{token}] must be a number")
            # A range comparison, not math.isfinite: a JSON integer of 400 digits overflows a
            # float, while NaN and infinities fail the comparison too.
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token}] is outside -100..100")
            if token in parsed:
                raise ValueError(f"logit_bias names token {token} more than once")
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
            grammar=self._grammar,
        )


def _token_id(key: Any) -> int:
    """A logit_bias key: an int, or the canonical decimal string of one ("7", not "07" or " 7 ")."""
    if isinstance(key, int) and not isinstance(key, bool):
        token = key
    elif (
        isinstance(key, str)
        and key.isascii()
        and key.isdigit()
        and (key == "0" or not key.startswith("0"))
        and len(key) <= len(str(MAX_TOKEN_ID))
    ):
        token = int(key)
    elif isinstance(key, str) and key.isascii() and key.isdigit() and not key.startswith("0"):
        raise ValueError(f"logit_bias key {_show(key)} is not a valid token id (too large)")
    else:
        raise ValueError(
            f"logit_bias key {_show(key)} is not a token id "
            '(keys are non-negative integers written in decimal digits only, e.g. "1234")'
        )
    if not 0 <= token <= MAX_TOKEN_ID:
        raise ValueError(f"logit_bias key {_show(key)} is not a valid token id")
    return token


def _show(value: Any, limit: int = 64) -> str:
    """User-provided text for an error message: quoted, escaped (never a raw lone surrogate or
    control character, which a UTF-8 response could not carry) and cut to ``limit`` characters."""
    if isinstance(value, str):
        cut = value[:limit]
        return repr(cut) + ("..." if len(value) > limit else "")
    try:
        text = repr(value)
    except ValueError:  # an int too large for str() (sys.set_int_max_str_digits)
        return f"<{type(value).__name__}>"
    return text[:limit] + ("..." if len(text) > limit else "")


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
    grammar: Grammar | None = None  # structured output (guidance.py)


def parse_json(raw: bytes | str) -> Any:
    """A JSON request body -> Python values; 400 ``invalid_json`` saying why it is not JSON.

    NaN and Infinity are refused (they are not JSON, and no parameter takes them). The HTTP
    shim and batch files read bodies through here, so both refuse the same texts."""
    if _nesting_depth(raw) > MAX_JSON_DEPTH:
        raise bad_request(
            f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            code="invalid_json",
        )
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} (line {exc.lineno}, column {exc.colno})"
    except UnicodeDecodeError:
        detail = "it is not UTF-8 text"
    except ValueError as exc:  # NaN / Infinity, refused by _reject_constant
        detail = str(exc)
    raise bad_request(f"the request body is not valid JSON: {detail}", code="invalid_json")


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _nesting_depth(raw: bytes | str) -> int:
    """How deep ``raw`` nests [ and { outside string literals, counted up to MAX_JSON_DEPTH + 1.

    Without recursion, so a hostile body costs one scan. A body with few brackets (nearly every
    request) skips the scan. Malformed text gets a depth too; json.loads then says what is wrong."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw  # keeps every byte's place
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0
    depth = deepest = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket.group() in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(
    body: Any, route: Route = "azure", extra_parameters: str | None = None
) -> ChatRequest:
    """Validate a request body; raise ``ApiError`` naming the first bad parameter."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:  # before any per-item work
        raise bad_request(
            f"messages has {len(messages)} items; at most {MAX_MESSAGES} are accepted",
            "messages",
            code="invalid_parameter",
        )
    reject_unpaired_surrogates(body)
    policy = (extra_parameters or "error").strip().lower()
    if policy not in EXTRA_PARAMETER_POLICIES:
        raise bad_request(
            f"extra-parameters must be one of {', '.join(EXTRA_PARAMETER_POLICIES)}, "
            f"not {_show(extra_parameters)}",
            param="extra-parameters",
        )
    known = AZURE_PARAMETERS if route == "azure" else OPENAI_PARAMETERS
    extras = [k for k in body if k not in known]  # named even when their value is null
    if extras and route == "azure":
        if policy == "error":
            raise bad_request(
                f"extra parameter {_show(extras[0])} is not allowed when extra-parameters is "
                "'error' "
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
                    f"parameter {_show(unusable[0])} is not supported by this model", unusable[0]
                )
    elif extras:
        raise bad_request(
            f"unknown parameter {_show(extras[0])}", param=extras[0], code="unknown_parameter"
        )

    body = {k: v for k, v in body.items() if v is not None or k == "messages"}
    _reject_unsupported(body)
    body = _normalise_openai(body, route)
    _check_stop(body.get("stop"))
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
        raise _validation_error(exc, body) from None
    if request.top_logprobs is not None and not request.logprobs and request.top_logprobs > 0:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    return request


def _reject_unsupported(body: dict[str, Any]) -> None:
    """Features Phi-3 cannot serve: answer 422 instead of ignoring them. Tool parameters that
    ask for nothing (``tools: []``, ``tool_choice: "none"``) are taken out of ``body``."""
    for name in ("tools", "tool_choice"):
        if body.pop(name, None) not in (None, [], "none"):
            raise not_supported(f"'{name}' is not supported by Phi-3 models", name)
    if not isinstance(body.pop("parallel_tool_calls", False), bool):  # moot without tools
        raise bad_request(
            "invalid value for 'parallel_tool_calls': must be true or false",
            "parallel_tool_calls",
            code="invalid_parameter",
        )
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
        include_usage = options.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise bad_request(
                "invalid value for 'stream_options.include_usage': must be true or false",
                "stream_options.include_usage",
                code="invalid_parameter",
            )
        if not body.get("stream"):
            raise bad_request("stream_options requires stream to be true", "stream_options")
        body["include_usage_in_stream"] = bool(include_usage)
    user = body.pop("user", None)  # an end-user id for abuse monitoring; nothing to do locally
    if user is not None and not isinstance(user, str):
        raise bad_request(
            "invalid value for 'user': must be a string", "user", code="invalid_parameter"
        )
    return body


def _check_stop(stop: Any) -> None:
    """Count and size of stop sequences, checked before any per-item work, named as sent."""
    if isinstance(stop, str):
        items = [("stop", stop)]
    elif isinstance(stop, list):
        if len(stop) > MAX_STOP:
            raise bad_request(
                f"invalid value for 'stop': at most {MAX_STOP} stop sequences are allowed, "
                f"got {len(stop)}",
                "stop",
                code="invalid_parameter",
            )
        items = [(f"stop[{i}]", s) for i, s in enumerate(stop)]
    else:
        return  # null is dropped earlier; other types are the model's to name
    for where, sequence in items:
        if not isinstance(sequence, str):
            continue
        if sequence == "":
            raise bad_request(
                f"invalid value for '{where}': stop sequences must not be empty strings",
                where,
                code="invalid_parameter",
            )
        if len(sequence) > MAX_STOP_LENGTH:
            raise bad_request(
                f"invalid value for '{where}': a stop sequence may have at most "
                f"{MAX_STOP_LENGTH} characters, this one has {len(sequence)}",
                where,
                code="invalid_parameter",
            )


def reject_unpaired_surrogates(value: Any, path: str = "") -> None:
    """Raise a 400 naming the first string or object key in ``value`` holding a lone surrogate.

    ``json.loads`` turns an escape such as ``"\\ud800"`` into a str with an unpaired UTF-16
    surrogate, which is not Unicode text: the model cannot tokenize it and no UTF-8 response (nor
    an error message echoing it) can carry it. The walk is iterative (bodies may nest deeply),
    visits each container once (in-process callers may pass shared or cyclic objects) and builds
    a path only for the value it reports; a bad key is shown escaped, never raw.
    """
    # Stack entries: (node, parent link, path segment, is_key); a link is (parent link, segment).
    stack: list[tuple[Any, Any, str, bool]] = [(value, None, path, False)]
    seen: set[int] = set()
    while stack:
        node, parent, segment, is_key = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _has_surrogate(node):
                where = _path_of((parent, segment))
                shown = where[:200] + ("..." if len(where) > 200 else "")
                what = f"the parameter name {shown}" if is_key else f"the value of '{shown}'"
                raise bad_request(
                    f"{what} contains an unpaired UTF-16 surrogate (U+D800..U+DFFF), which is "
                    "not valid Unicode text",
                    param=where or None,
                    code="invalid_parameter",
                )
        elif isinstance(node, (dict, list, tuple)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            link = (parent, segment)
            if isinstance(node, dict):
                for key, item in reversed(list(node.items())):
                    key_segment = _key_segment(key)
                    stack.append((item, link, key_segment, False))
                    if isinstance(key, str):
                        stack.append((key, link, key_segment, True))
            else:
                for index in range(len(node) - 1, -1, -1):
                    stack.append((node[index], link, f"[{index}]", False))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _key_segment(key: Any) -> str:
    """An object key as a path segment: as sent, or escaped when it is not valid text."""
    if isinstance(key, str) and (key.isascii() or not _has_surrogate(key)):
        return f".{key}"
    return f".{ascii(key)}"


def _path_of(link: Any) -> str:
    segments: list[str] = []
    while link is not None:
        link, segment = link
        segments.append(segment)
    return "".join(reversed(segments)).lstrip(".")


def _validation_error(exc: ValidationError, body: Any = None) -> ApiError:
    """The first error, named by the request's own path (pydantic's union-member and validator
    tags such as ``str``, ``list[_TextPart]`` or ``function-after[...]`` dropped). When a union
    member got further into the value than the first error (content=[{"text": 5}] fails both as
    a string and at [0].text), the deeper error is the one that names the real problem."""
    errors = exc.errors()
    named = [(_request_path(error, body), error) for error in errors]
    first_path, error = named[0]
    best = len(first_path)
    for path, candidate in named[1:]:
        if len(path) > best and path[: len(first_path)] == first_path:
            best, error = len(path), candidate
    param = "".join(_request_path(error, body)).lstrip(".")
    message = error.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error.get("type") == "extra_forbidden":
        return bad_request(
            f"unknown parameter {_show(param, 200)}", param=param, code="unknown_parameter"
        )
    if error.get("type") == "missing":
        return bad_request(
            f"{_show(param, 200)} is required", param=param, code="missing_parameter"
        )
    return bad_request(
        f"invalid value for {_show(param, 200)}: {message}", param=param, code="invalid_parameter"
    )


def _request_path(error: Any, body: Any) -> list[str]:
    """pydantic's ``loc`` walked through the body that was validated: an element that is a key or
    index of the value at that point is part of the request's path; anything else is a tag of
    pydantic's own (kept only as the last element of a missing/extra field, which is a name)."""
    location = list(error.get("loc", ()))
    segments: list[str] = []
    node = body
    for i, part in enumerate(location):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            segments.append(_key_segment(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            segments.append(f"[{part}]")
            node = node[part]
        elif i == len(location) - 1 and error.get("type") in ("missing", "extra_forbidden"):
            segments.append(_key_segment(part) if isinstance(part, str) else f"[{part}]")
        elif body is None:  # no body to walk: keep what looks like a field name or index
            if isinstance(part, int):
                segments.append(f"[{part}]")
            elif part.isidentifier():
                segments.append(f".{part}")
    return segments


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
