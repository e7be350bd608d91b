"""Structured output (response_format json_object / json_schema, guided_regex, guided_grammar).

The models here have random weights, so their text is noise: every valid answer below is valid
because the allowed-token mask made it so. Each completion is parsed with ``json`` and checked
with the ``jsonschema`` package (neither written here); regexes with ``re.fullmatch``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from phi3edge import ApiError, ChatCompletionsClient, JsonSchemaFormat, UserMessage
from phi3edge.server import ServerSettings, create_app, running
from phi3edge.service import ChatService

PROMPT = [UserMessage("Describe a person as JSON.")]
# Random weights ramble: strings and arrays are bounded so that every answer can close.
SCHEMAS: dict[str, dict[str, Any]] = {
    "object-required": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
        },
        "required": ["name", "age", "member"],
        "additionalProperties": False,
    },
    "nested-arrays": {
        "type": "object",
        "properties": {
            "grid": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": -99, "maximum": 99},
                    "maxItems": 3,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["grid"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "bounded-numbers": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "exclusiveMinimum": 10, "maximum": 99},
        },
        "required": ["ratio", "count"],
        "additionalProperties": False,
    },
    "patterns": {
        "type": "object",
        "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,4}$"},
        },
        "required": ["zip", "code"],
        "additionalProperties": False,
    },
    "array-of-objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
}
MAX_TOKENS = 1500  # generous: whitespace runs are bounded (guidance.JSON_DEFAULTS), not absent


def json_schema_format(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


def assert_valid(content: str, schema: dict[str, Any]) -> Any:
    value = json.loads(content)
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def client(tiny_int4: Path) -> Iterator[ChatCompletionsClient]:
    with ChatCompletionsClient(tiny_int4) as client:
        yield client


# ----------------------------------------------------------------------------- validity


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_completion_validates_at_temperature_zero_and_one(
    client: ChatCompletionsClient, name: str
) -> None:
    cases = [(0.0, None, f"Give me {name} data as JSON.")]
    cases += [(1.0, seed, PROMPT[0].content) for seed in range(6)]
    for temperature, seed, prompt in cases:
        response = client.complete(
            messages=[UserMessage(prompt)],
            response_format=json_schema_format(name),
            temperature=temperature,
            seed=seed,
            max_tokens=MAX_TOKENS,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop", (temperature, seed, choice.message.content)
        assert_valid(choice.message.content, SCHEMAS[name])


def test_json_object_gives_an_object(client: ChatCompletionsClient) -> None:
    """Any object: keys and strings are unbounded, so random weights may ramble past max_tokens
    (one seed in twelve here); whatever ends with "stop" is an object."""
    reasons = []
    for seed in range(12):
        response = client.complete(
            messages=PROMPT,
            response_format="json_object",
            temperature=1.0,
            seed=seed,
            max_tokens=MAX_TOKENS,
        )
        choice = response.choices[0]
        reasons.append(choice.finish_reason)
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
    assert reasons.count("stop") >= 9, reasons


def test_without_a_constraint_the_same_request_is_not_json(client: ChatCompletionsClient) -> None:
    """The control: the model alone does not produce these (so the mask is what does)."""
    valid = 0
    for seed in range(6):
        content = client.complete(messages=PROMPT, temperature=1.0, seed=seed, max_tokens=40)
        try:
            assert_valid(content.choices[0].message.content, SCHEMAS["enums"])
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid == 0


def test_n_choices_are_all_valid_and_differ(client: ChatCompletionsClient) -> None:
    response = client.complete(
        messages=PROMPT,
        response_format=json_schema_format("object-required"),
        model_extras={"n": 3},
        temperature=1.0,
        seed=5,
        max_tokens=MAX_TOKENS,
    )
    contents = [c.message.content for c in response.choices]
    assert len(contents) == 3
    for content in contents:
        assert_valid(content, SCHEMAS["object-required"])
    assert len(set(contents)) > 1


def test_streamed_equals_non_streamed(client: ChatCompletionsClient) -> None:
    params: dict[str, Any] = {
        "messages": PROMPT,
        "response_format": json_schema_format("patterns"),
        "temperature": 1.0,
        "seed": 21,
        "max_tokens": MAX_TOKENS,
    }
    whole = client.complete(**params).choices[0]
    parts, reasons = [], []
    for update in client.complete(**params, stream=True):
        for choice in update.choices:
            parts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(parts) == whole.message.content
    assert [r for r in reasons if r] == ["stop"] == [whole.finish_reason]
    assert_valid(whole.message.content, SCHEMAS["patterns"])


def test_a_batch_mixes_constrained_and_free_requests(client: ChatCompletionsClient) -> None:
    requests = [
        {"messages": PROMPT, "temperature": 1.0, "seed": s, "max_tokens": MAX_TOKENS}
        | ({"response_format": json_schema_format("enums")} if s % 2 else {"max_tokens": 24})
        for s in range(6)
    ]
    answers = client.complete_batch(requests)
    for s, answer in enumerate(answers):
        if s % 2:
            assert_valid(answer.choices[0].message.content, SCHEMAS["enums"])
        else:
            assert answer.choices[0].finish_reason == "length"  # unconstrained ran on


def test_a_mask_leaves_other_rows_of_a_batch_alone(tiny_fp32: Path) -> None:
    """fp32: batched rows equal solo runs exactly, so the free row must be bit-identical."""
    free = {"messages": PROMPT, "temperature": 1.0, "seed": 3, "max_tokens": 24}
    guided = {**free, "response_format": json_schema_format("enums"), "max_tokens": MAX_TOKENS}
    with ChatCompletionsClient(tiny_fp32) as client:
        alone = client.complete(**free).choices[0].message.content
        batched = client.complete_batch([free, guided])
    assert batched[0].choices[0].message.content == alone
    assert_valid(batched[1].choices[0].message.content, SCHEMAS["enums"])


def test_the_engine_process_path(tiny_int4: Path) -> None:
    """The grammar travels with the request to a child process and compiles there."""
    schema = SCHEMAS["enums"]
    with ChatCompletionsClient(tiny_int4, engine_process=True) as client:
        response = client.complete(
            messages=PROMPT,
            response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": schema}},
            seed=8,
            max_tokens=MAX_TOKENS,
        )
    assert_valid(response.choices[0].message.content, schema)


def test_max_tokens_before_the_json_closes_is_length_never_stop(
    client: ChatCompletionsClient,
) -> None:
    response = client.complete(
        messages=PROMPT,
        response_format=json_schema_format("object-required"),
        temperature=0.0,
        max_tokens=3,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 3
    with pytest.raises(ValueError):
        json.loads(choice.message.content)


def test_guided_regex_and_lark_grammar(client: ChatCompletionsClient) -> None:
    regex = r"[0-9]{3}-[a-z]{2,6}"
    grammar = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[1-9][0-9]?/'
    for seed in range(5):
        matched = client.complete(
            messages=PROMPT, temperature=1.0, seed=seed, model_extras={"guided_regex": regex}
        ).choices[0]
        assert matched.finish_reason == "stop"
        assert re.fullmatch(regex, matched.message.content)
        answer = client.complete(
            messages=PROMPT, temperature=1.0, seed=seed, model_extras={"guided_grammar": grammar}
        ).choices[0]
        assert re.fullmatch(r"yes|no|maybe [1-9][0-9]?", answer.message.content)


def test_a_grammar_of_token_ids_gives_exactly_those_tokens(
    client: ChatCompletionsClient, tiny_int4: Path
) -> None:
    """llguidance's ``<[id]>`` lexemes, single-byte tokens among them (llguidance's forcing
    refused those after its own mask allowed them: a 500 mid-answer)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_int4 / "tokenizer.json"))
    ids = tokenizer.encode("a fox, o", add_special_tokens=False).ids
    assert any(len(tokenizer.id_to_token(i)) == 1 for i in ids), "no single-byte token here"
    grammar = "start: " + " ".join(f"<[{i}]>" for i in ids)
    for seed in range(3):
        choice = client.complete(
            messages=PROMPT, temperature=1.0, seed=seed, model_extras={"guided_grammar": grammar}
        ).choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.content == tokenizer.decode(ids)


def test_random_grammars_accept_every_token_their_mask_allows(tiny_int4: Path) -> None:
    """Lark grammars mixing token ids, strings, regexes and alternatives, followed with random
    allowed tokens: the grammar never refuses what its own mask allowed (with llguidance's
    forcing on, several of these did)."""
    import random

    import numpy as np

    from phi3edge import runtime
    from phi3edge.guidance import Constraint, Grammar, mask_words

    model = runtime.load(tiny_int4)
    rng = random.Random(0)

    def piece() -> str:
        kind = rng.random()
        if kind < 0.4:
            return f"<[{rng.randrange(3, 2000)}]>"
        if kind < 0.6:
            return json.dumps(rng.choice(["a", "fox", " the", "o", "12", "x y"]))
        if kind < 0.8:
            return rng.choice(["/[a-z]{1,3}/", "/[0-9]+/", "/ ?/"])
        return f"({piece()} | {piece()})"

    row = np.zeros(mask_words(model.vocab_size), np.int32)
    for _ in range(300):
        lark = "start: " + " ".join(piece() for _ in range(rng.randrange(1, 8)))
        constraint = Constraint(Grammar.from_lark(lark, "guided_grammar"), model.grammar_tokenizer)
        for _ in range(40):
            constraint.fill(row)
            bits = np.unpackbits(row.view(np.uint8), bitorder="little")[: model.vocab_size]
            allowed = np.flatnonzero(bits)
            assert len(allowed), lark
            token = int(rng.choice(allowed.tolist()))
            constraint.accept(token)  # raises if the grammar refuses it
            if constraint.complete or token in model.eos_ids:
                break


def test_reported_logprobs_are_those_of_the_constrained_distribution(
    client: ChatCompletionsClient,
) -> None:
    """A step the grammar forces has one allowed token: logprob 0, no alternatives; at every step
    the reported alternatives are allowed tokens, so their probabilities sum to at most 1."""
    response = client.complete(
        messages=PROMPT,
        response_format=json_schema_format("enums"),
        temperature=1.0,
        seed=2,
        max_tokens=MAX_TOKENS,
        model_extras={"logprobs": True, "top_logprobs": 5},
    )
    content = response.choices[0].logprobs.content
    forced = [t for t in content if len(t.top_logprobs) == 1]
    assert forced, "the key names of a required-properties object are forced"
    assert all(t.logprob == 0.0 and t.top_logprobs[0].logprob == 0.0 for t in forced)
    for token in content:
        assert sum(2.718281828459045**alt.logprob for alt in token.top_logprobs) <= 1 + 1e-5


def test_a_json_schema_format_object_is_accepted(client: ChatCompletionsClient) -> None:
    schema = SCHEMAS["bounded-numbers"]
    response = client.complete(
        messages=PROMPT,
        response_format=JsonSchemaFormat(name="numbers", schema=schema, strict=True),
        temperature=1.0,
        seed=1,
        max_tokens=MAX_TOKENS,
    )
    assert_valid(response.choices[0].message.content, schema)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("params", "param", "reason"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frob"}},
                }
            },
            "response_format",
            "frob",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            "required",
        ),
        ({"model_extras": {"guided_regex": "[a-"}}, "guided_regex", "unclosed"),
        (
            {"model_extras": {"guided_grammar": "start: nothing_here"}},
            "guided_grammar",
            "nothing_here",
        ),
        (
            {"response_format": "json_object", "model_extras": {"guided_regex": "a+"}},
            "guided_regex",
            "one of",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_parameter(
    client: ChatCompletionsClient, params: dict[str, Any], param: str, reason: str
) -> None:
    with pytest.raises(ApiError) as raised:
        client.complete(messages=PROMPT, **params)
    assert (raised.value.status, raised.value.param) == (400, param)
    assert reason in raised.value.message


# ----------------------------------------------------------------------------- real SDKs over HTTP


@pytest.fixture(scope="module")
def url(tiny_int4: Path) -> Iterator[str]:
    service = ChatService(tiny_int4)
    try:
        with running(create_app(service, ServerSettings())) as url:
            yield url
    finally:
        service.close()


def test_openai_sdk_response_format_json_schema_and_parse(url: str) -> None:
    import openai
    import pydantic

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    schema = SCHEMAS["object-required"]
    completion = client.chat.completions.create(
        model="phi-3-mini-4k",
        messages=[{"role": "user", "content": "A person, please."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
        seed=4,
        max_tokens=MAX_TOKENS,
    )
    assert completion.choices[0].finish_reason == "stop"
    assert_valid(completion.choices[0].message.content, schema)

    class Shirt(pydantic.BaseModel):
        size: str = pydantic.Field(pattern="^(S|M|L)$")
        price: int = pydantic.Field(ge=1, le=99)
        cotton: bool

    parsed = client.chat.completions.parse(
        model="phi-3-mini-4k",
        messages=[{"role": "user", "content": "A shirt, please."}],
        response_format=Shirt,
        seed=9,
        max_tokens=MAX_TOKENS,
    )
    shirt = parsed.choices[0].message.parsed
    assert isinstance(shirt, Shirt) and 1 <= shirt.price <= 99

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="phi-3-mini-4k",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "frob"}},
            },
        )
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == "response_format"


def test_openai_sdk_guided_regex_as_extra_body(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="phi-3-mini-4k",
        messages=[{"role": "user", "content": "A date."}],
        extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"},
        seed=1,
    )
    assert re.fullmatch(
        r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", completion.choices[0].message.content
    )


def test_azure_sdk_json_schema_format_and_json_object(url: str) -> None:
    from azure.ai.inference import ChatCompletionsClient as AzureClient
    from azure.ai.inference.models import JsonSchemaFormat as AzureJsonSchemaFormat
    from azure.ai.inference.models import UserMessage as AzureUserMessage
    from azure.core.credentials import AzureKeyCredential
    from azure.core.exceptions import HttpResponseError

    schema = SCHEMAS["enums"]
    with AzureClient(endpoint=url, credential=AzureKeyCredential("unused")) as client:
        response = client.complete(
            messages=[AzureUserMessage("A T-shirt.")],
            response_format=AzureJsonSchemaFormat(name="shirt", schema=schema, strict=True),
            seed=6,
            max_tokens=MAX_TOKENS,
        )
        assert_valid(response.choices[0].message.content, schema)
        response = client.complete(
            messages=[AzureUserMessage("Anything.")],
            response_format="json_object",
            seed=6,
            max_tokens=MAX_TOKENS,
        )
        assert isinstance(json.loads(response.choices[0].message.content), dict)
        with pytest.raises(HttpResponseError) as raised:
            client.complete(
                messages=[AzureUserMessage("x")],
                response_format=AzureJsonSchemaFormat(name="x", schema={"type": "frob"}),
            )
        assert raised.value.status_code == 400
        assert raised.value.error.code == "invalid_parameter"
