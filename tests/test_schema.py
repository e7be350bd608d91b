"""Request validation: ranges, the extra-parameters policy, unsupported features -> ApiError."""

from __future__ import annotations

from typing import Any

import pytest

from phi3edge.errors import ApiError
from phi3edge.schema import parse_request

MESSAGES = [{"role": "user", "content": "hi"}]


def _error(body: dict[str, Any], **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_request(body, **kwargs)
    return info.value


def test_valid_request_maps_to_sampling() -> None:
    request = parse_request(
        {
            "messages": MESSAGES,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": "x",
            "seed": 3,
            "presence_penalty": 1,
            "frequency_penalty": -1,
            "max_tokens": 5,
        }
    )
    cfg = request.sampling()
    assert (cfg.temperature, cfg.top_p, cfg.stop, cfg.seed, cfg.max_tokens) == (
        0.5,
        0.9,
        ("x",),
        3,
        5,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 1.5),
        ("top_p", 1.1),
        ("top_p", -1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("max_tokens", 0),
        ("max_tokens", "ten"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("stream", "yes"),
        ("seed", 2**64),
        ("messages", []),
        ("messages", "hi"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(field: str, value: Any) -> None:
    error = _error({"messages": MESSAGES, field: value})
    assert error.status == 400
    assert error.param is not None and error.param.startswith(field)


def test_openai_route_allows_temperature_up_to_2() -> None:
    assert (
        parse_request({"messages": MESSAGES, "temperature": 1.7}, route="openai").temperature == 1.7
    )


@pytest.mark.parametrize("name", ["logit_bias", "logprobs", "top_logprobs", "n"])
def test_phi3_extras_follow_the_extra_parameters_header(name: str) -> None:
    value = {"logit_bias": {"5": 10}, "logprobs": True, "top_logprobs": 2, "n": 2}[name]
    body = {"messages": MESSAGES, name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    error = _error(body)
    assert (error.status, error.code, error.param) == (400, "extra_parameters_not_allowed", name)
    dropped = parse_request(body, extra_parameters="drop")
    assert getattr(dropped, name) in ({}, False, None, 1)
    passed = parse_request(body, extra_parameters="pass-through")
    assert getattr(passed, name) == ({5: 10.0} if name == "logit_bias" else value)
    assert getattr(parse_request(body, route="openai"), name) == getattr(passed, name)


def test_unusable_extra_parameter_passed_through_is_422() -> None:
    error = _error({"messages": MESSAGES, "mirostat": 2}, extra_parameters="pass-through")
    assert (error.status, error.code, error.param) == (422, "parameter_not_supported", "mirostat")


def test_bad_extra_parameters_header() -> None:
    assert _error({"messages": MESSAGES}, extra_parameters="sometimes").param == "extra-parameters"


@pytest.mark.parametrize(
    "body",
    [
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "auto"},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
    ],
)
def test_unsupported_features_are_422(body: dict[str, Any]) -> None:
    error = _error({"messages": MESSAGES, **body})
    assert (error.status, error.code) == (422, "parameter_not_supported")


@pytest.mark.parametrize(
    ("bias", "fragment"),
    [
        ({"x": 1}, "not a token id"),
        ({"5": 101}, "-100..100"),
        ({"5": "a"}, "number"),
        ({"-1": 1}, "token id"),
    ],
)
def test_logit_bias_values(bias: dict, fragment: str) -> None:
    error = _error({"messages": MESSAGES, "logit_bias": bias}, route="openai")
    assert error.status == 400 and fragment in error.message and error.param == "logit_bias"


def test_top_logprobs_needs_logprobs_and_range() -> None:
    assert _error({"messages": MESSAGES, "top_logprobs": 3}, route="openai").param == "top_logprobs"
    body = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}
    assert _error(body, route="openai").param == "top_logprobs"
    assert _error({"messages": MESSAGES, "n": 0}, route="openai").param == "n"


def test_openai_spellings() -> None:
    request = parse_request(
        {
            "messages": MESSAGES,
            "max_completion_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u1",
        },
        route="openai",
    )
    assert request.max_tokens == 7 and request.include_usage_in_stream
    assert (
        _error(
            {"messages": MESSAGES, "stream_options": {"include_usage": True}}, route="openai"
        ).param
        == "stream_options"
    )


def test_message_shapes() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_request({"messages": [{"role": "user", "content": parts}]})
    assert request.messages[0].text() == "ab"
    assert _error({"messages": [{"role": "wizard", "content": "x"}]}).param == "messages[0].role"
    assert _error({"messages": [{"content": "x"}]}).param == "messages[0].role"
    assert _error({}).param == "messages"
    assert _error([1, 2]).status == 400  # type: ignore[arg-type]


def test_unknown_parameter_with_a_null_value_is_still_named() -> None:
    assert _error({"messages": MESSAGES, "foo": None}).param == "foo"
    assert _error({"messages": MESSAGES, "foo": None}, route="openai").param == "foo"
    dropped = parse_request({"messages": MESSAGES, "n": None}, extra_parameters="drop")
    assert dropped.n == 1
