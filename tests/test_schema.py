"""Request validation: ranges, the extra-parameters policy, unsupported features -> ApiError."""

from __future__ import annotations

import json
from typing import Any

import pytest

from phi3edge.errors import ApiError
from phi3edge.schema import (
    MAX_JSON_DEPTH,
    MAX_STOP,
    MAX_STOP_LENGTH,
    parse_json,
    parse_request,
    reject_unpaired_surrogates,
)

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
    ("body", "kind"),
    [
        ({"response_format": "json_object"}, "json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema"),
        ({"guided_regex": "[0-9]+"}, "regex"),
        ({"guided_grammar": 'start: "a"'}, "lark"),
    ],
)
def test_constraints_compile_into_the_sampling_config(body: dict[str, Any], kind: str) -> None:
    for route in ("openai", "azure"):
        request = parse_request({"messages": MESSAGES, **body}, route, "pass-through")
        grammar = request.sampling().grammar
        assert grammar is not None and grammar.kind == kind


def test_text_response_format_and_no_constraint_give_no_grammar() -> None:
    for body in ({}, {"response_format": {"type": "text"}}, {"response_format": "text"}):
        assert parse_request({"messages": MESSAGES, **body}).sampling().grammar is None


def test_guided_parameters_follow_the_extra_parameters_policy_on_azure() -> None:
    body = {"messages": MESSAGES, "guided_regex": "a+"}
    assert _error(body).code == "extra_parameters_not_allowed"
    assert parse_request(body, "azure", "drop").sampling().grammar is None


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


# ----------------------------------------------------------------------------- fuzzing finds


def _raw_error(raw: str, **kwargs: Any) -> ApiError:
    """Parse ``raw`` as the HTTP server does (json.loads) and expect an ApiError."""
    error = _error(json.loads(raw), **kwargs)
    # Whatever the error says must be sendable as UTF-8 JSON.
    json.dumps(error.as_dict(), ensure_ascii=False).encode("utf-8")
    return error


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"role": "user"}, "missing_parameter"),
        ({"role": "user", "content": None}, "invalid_parameter"),
        ({"role": "assistant"}, "missing_parameter"),
        ({"role": "system", "content": None}, "invalid_parameter"),
    ],
)
def test_message_content_is_required_and_not_null(message: dict, code: str) -> None:
    error = _error({"messages": [{"role": "user", "content": "hi"}, message]})
    assert (error.status, error.code, error.param) == (400, code, "messages[1].content")


def test_empty_string_content_is_still_allowed() -> None:
    request = parse_request({"messages": [{"role": "user", "content": ""}]})
    assert request.messages[0].text() == ""


def test_logit_bias_value_too_large_for_a_float_is_400() -> None:
    raw = '{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1%s}}' % (
        "0" * 400
    )
    error = _raw_error(raw, route="openai")
    assert (error.status, error.code, error.param) == (400, "invalid_parameter", "logit_bias")
    assert "-100..100" in error.message


@pytest.mark.parametrize(
    "key", [" 1_0 ", "1_0", "+5", " 5", "5 ", "0x10", "\u0663", "007", "1e3", "", True, -1]
)
def test_logit_bias_keys_must_be_canonical_decimal_token_ids(key: Any) -> None:
    error = _error({"messages": MESSAGES, "logit_bias": {key: 1}}, route="openai")
    assert (error.status, error.code, error.param) == (400, "invalid_parameter", "logit_bias")
    assert "token id" in error.message


def test_logit_bias_accepts_digit_strings_and_ints() -> None:
    request = parse_request(
        {"messages": MESSAGES, "logit_bias": {"10": 1, 0: -2, "32000": 100}}, route="openai"
    )
    assert request.logit_bias == {10: 1.0, 0: -2.0, 32000: 100.0}
    huge = {"9" * 5000: 1}  # int() of this would raise; must be a plain 400
    assert _error({"messages": MESSAGES, "logit_bias": huge}, route="openai").param == "logit_bias"


def test_stop_string_length_is_bounded() -> None:
    error = _error({"messages": MESSAGES, "stop": "x" * 1_000_000})
    assert (error.status, error.code, error.param) == (400, "invalid_parameter", "stop")
    assert str(MAX_STOP_LENGTH) in error.message
    error = _error({"messages": MESSAGES, "stop": ["ok", "x" * (MAX_STOP_LENGTH + 1)]})
    assert (error.status, error.param) == (400, "stop[1]")
    assert parse_request({"messages": MESSAGES, "stop": ["x" * MAX_STOP_LENGTH]}).stop


def test_too_many_stops_is_400_before_any_per_item_work() -> None:
    # 1000 one-megabyte strings: the count check must answer without looking at them.
    big = "x" * 1_000_000
    error = _error({"messages": MESSAGES, "stop": [big] * 1000})
    assert (error.status, error.code, error.param) == (400, "invalid_parameter", "stop")
    assert f"at most {MAX_STOP}" in error.message
    assert _error({"messages": MESSAGES, "stop": ["a", ""]}).param == "stop[1]"
    assert _error({"messages": MESSAGES, "stop": ["a", 5]}).param == "stop[1]"


@pytest.mark.parametrize("value", ["no", "false", 0, 1, [], {}])
def test_stream_options_include_usage_must_be_a_boolean(value: Any) -> None:
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": value}}
    error = _error(body, route="openai")
    assert (error.status, error.code, error.param) == (
        400,
        "invalid_parameter",
        "stream_options.include_usage",
    )
    body["stream_options"] = {"include_usage": False}
    assert not parse_request(body, route="openai").include_usage_in_stream


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        (5, "messages[0].content", "invalid_parameter"),
        ({"text": "x"}, "messages[0].content", "invalid_parameter"),
        ([{"type": "text", "text": 5}], "messages[0].content[0].text", "invalid_parameter"),
        ([{"type": "text"}], "messages[0].content[0].text", "missing_parameter"),
        ([{"type": "text", "text": "a", "x": 1}], "messages[0].content[0].x", "unknown_parameter"),
        ([{"type": "text", "text": "a"}, "b"], "messages[0].content[1]", "invalid_parameter"),
    ],
)
def test_union_errors_name_the_request_path(content: Any, param: str, code: str) -> None:
    error = _error({"messages": [{"role": "user", "content": content}]})
    assert (error.status, error.code, error.param) == (400, code, param)
    assert param in error.message


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
            "messages[0].content[0].text",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}], "model": "m\\udfff"}', "model"),
        (
            '{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\ud800"]}',
            "stop[1]",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}], "x\\ud800y": 1}', "'x\\ud800y'"),
        (
            '{"messages": [{"role": "user", "content": "hi", "n\\ud800": 1}]}',
            "messages[0].'n\\ud800'",
        ),
        ('{"messages": [{"role": "u\\ud800", "content": "hi"}]}', "messages[0].role"),
    ],
)
@pytest.mark.parametrize("route", ["azure", "openai"])
def test_lone_surrogates_anywhere_are_400_naming_the_path(raw: str, param: str, route: str) -> None:
    error = _raw_error(raw, route=route, extra_parameters="pass-through")
    assert (error.status, error.code, error.param) == (400, "invalid_parameter", param)
    assert "surrogate" in error.message


def test_paired_surrogates_are_ordinary_text() -> None:
    raw = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert parse_request(json.loads(raw)).messages[0].text() == "\U0001f600"


def test_surrogate_walk_survives_deep_and_cyclic_values() -> None:
    deep: list[Any] = []
    node = deep
    for _ in range(100_000):
        node.append([])
        node = node[0]
    node.append("\ud800")
    reject_unpaired_surrogates({"a": "fine", "b": [1, 2.5, None, True]})
    with pytest.raises(ApiError) as info:
        reject_unpaired_surrogates({"d": deep})
    assert info.value.param is not None and info.value.param.startswith("d[0][0]")
    cyclic: list[Any] = ["ok"]
    cyclic.append(cyclic)
    reject_unpaired_surrogates({"c": cyclic})


def test_error_messages_never_echo_raw_user_text() -> None:
    long_name = "p" * 10_000
    error = _error({"messages": MESSAGES, long_name: 1}, route="openai")
    assert (error.code, error.param) == ("unknown_parameter", long_name)
    assert len(error.message) < 200
    error = _error({"messages": MESSAGES}, extra_parameters="dro\ud800p")
    assert error.param == "extra-parameters"
    error.message.encode("utf-8")


def test_whole_number_floats_are_integers_and_openai_extras_are_type_checked() -> None:
    request = parse_request(
        {
            "messages": MESSAGES,
            "max_tokens": 16.0,
            "seed": 5.0,
            "n": 2.0,
            "parallel_tool_calls": False,
        },
        route="openai",
    )
    assert (request.max_tokens, request.seed, request.n) == (16, 5, 2)
    assert _error({"messages": MESSAGES, "max_tokens": 16.5}).param == "max_tokens"
    for body, param in (
        ({"messages": MESSAGES, "user": 5}, "user"),
        ({"messages": MESSAGES, "user": {}}, "user"),
        ({"messages": MESSAGES, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ):
        error = _error(body, route="openai")
        assert (error.status, error.param) == (400, param)


def test_a_million_messages_are_refused_before_any_per_item_work() -> None:
    from phi3edge.schema import MAX_MESSAGES

    error = _error({"messages": [{}] * 1_300_000})
    assert (error.status, error.param) == (400, "messages") and str(MAX_MESSAGES) in error.message
    bad = _error({"messages": [{}] * MAX_MESSAGES})  # under the cap: stops at the first bad one
    assert bad.param == "messages[0].role"


def _nested(levels: int) -> str:
    return '{"a": ' * (levels - 1) + "[]" + "}" * (levels - 1)


def test_json_nesting_is_capped_before_the_parser_recurses() -> None:
    value = parse_json(_nested(MAX_JSON_DEPTH).encode())
    for _ in range(MAX_JSON_DEPTH - 1):
        value = value["a"]
    assert value == []
    for raw in (_nested(MAX_JSON_DEPTH + 1).encode(), "[" * 100_000 + "]" * 100_000):
        with pytest.raises(ApiError) as info:
            parse_json(raw)
        assert (info.value.status, info.value.code) == (400, "invalid_json")
        assert f"more than {MAX_JSON_DEPTH} levels" in info.value.message


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '"\\"' + "[{" * MAX_JSON_DEPTH + '"'  # an escaped quote does not end the string
    assert parse_json(f'{{"content": {text}}}'.encode()) == {"content": json.loads(text)}
