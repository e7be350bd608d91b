"""Web pages cannot use the local server (Host allow-list, JSON-only bodies), and /openapi.json
describes every route with its request schema, its response schemas and its error statuses.

In-process apps over the tiny random model (FastAPI's TestClient); no network.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from phi3edge.http_guard import HostGuardMiddleware, HostPolicy, host_name, is_json_content_type
from phi3edge.schema import (
    AZURE_PARAMETERS,
    OPENAI_PARAMETERS,
    PHI3_EXTRA_PARAMETERS,
    ChatRequest,
)
from phi3edge.server import ServerSettings, create_app
from phi3edge.service import ChatService

AZ, OA = "/chat/completions", "/v1/chat/completions"
LOCAL = "http://localhost:8000"
BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
CHAT_ERRORS = {"400", "401", "404", "413", "415", "422", "429", "500"}


@pytest.fixture
def client(client_factory: Callable[..., TestClient]) -> TestClient:
    return client_factory(LOCAL)


def _assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-ms-error-code"] == code
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "status"} and error["message"]
    assert (error["code"], error["status"]) == (code, status)
    return error


# ----------------------------------------------------------------------------- Content-Type


@pytest.mark.parametrize("path", [AZ, OA])
@pytest.mark.parametrize(
    ("content", "headers"),
    [
        # What a page can send cross-origin without a CORS preflight:
        (json.dumps(BODY), {"Content-Type": "text/plain"}),
        (json.dumps(BODY), {"Content-Type": "text/plain;charset=UTF-8"}),
        ("messages=hi", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("--b\r\n\r\nhi\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}),
        (json.dumps(BODY), {}),  # no Content-Type at all
        (json.dumps(BODY), {"Content-Type": "application/json; charset=latin-1"}),
        (json.dumps(BODY), {"Content-Type": "application/jsonx"}),
    ],
    ids=["text-plain", "text-plain-charset", "form", "multipart", "none", "latin-1", "jsonx"],
)
def test_post_bodies_that_are_not_declared_json_are_415(
    client: TestClient, path: str, content: str, headers: dict[str, str]
) -> None:
    error = _assert_error(
        client.post(path, content=content, headers=headers), 415, "unsupported_media_type"
    )
    assert error["param"] == "Content-Type" and "application/json" in error["message"]


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;Charset=UTF-8"],
)
def test_json_bodies_are_served(client: TestClient, content_type: str) -> None:
    response = client.post(OA, content=json.dumps(BODY), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_the_media_type_check_keeps_404_405_and_get_routes(client: TestClient) -> None:
    plain = {"Content-Type": "text/plain"}
    _assert_error(client.post("/v1/completions", content="x", headers=plain), 404, "not_found")
    _assert_error(client.post("/info", content="x", headers=plain), 405, "method_not_allowed")
    assert client.get("/info").status_code == 200  # no body, no Content-Type needed


def test_the_api_key_is_checked_before_the_media_type(
    client_factory: Callable[..., TestClient],
) -> None:
    keyed = client_factory(api_key="k")
    plain = {"Content-Type": "text/plain"}
    _assert_error(keyed.post(OA, content="{}", headers=plain), 401, "unauthorized")
    response = keyed.post(OA, content="{}", headers={**plain, "api-key": "k"})
    _assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("application/json", True),
        ("application/json;charset=utf8", True),
        ('application/json; charset="UTF-8"', True),
        (" application/json ; foo=bar", True),
        ("application/json; charset=utf-16", False),
        ("text/json", False),
        ("", False),
    ],
)
def test_is_json_content_type(value: str, ok: bool) -> None:
    assert is_json_content_type(value) is ok


def test_the_openai_sdk_sends_json(service: ChatService) -> None:
    """The real client, through the app in-process (TestClient is an httpx.Client)."""
    import openai

    app = create_app(service, ServerSettings())
    with TestClient(app, base_url=LOCAL) as http:
        sdk = openai.OpenAI(base_url=f"{LOCAL}/v1", api_key="unused", http_client=http)
        answer = sdk.chat.completions.create(
            model="Phi-3-mini-4k-instruct", messages=BODY["messages"], max_tokens=2
        )
    assert answer.usage.completion_tokens == 2


def test_the_azure_sdk_sends_json() -> None:
    """What azure-ai-inference puts on the wire (captured before it is sent)."""
    from azure.ai.inference import ChatCompletionsClient
    from azure.core.credentials import AzureKeyCredential

    seen: dict[str, str] = {}

    class Sent(Exception):
        pass

    def capture(pipeline_request: Any) -> None:
        seen.update({k.lower(): v for k, v in pipeline_request.http_request.headers.items()})
        raise Sent

    client = ChatCompletionsClient(endpoint=LOCAL, credential=AzureKeyCredential("unused"))
    with client, pytest.raises(Sent):
        client.complete(messages=BODY["messages"], max_tokens=2, raw_request_hook=capture)
    assert is_json_content_type(seen["content-type"]), seen


# ----------------------------------------------------------------------------- Host


LOCAL_HOSTS = ["localhost", "localhost:8000", "LOCALHOST.:1", "127.0.0.1:8000", "127.0.0.2",
               "[::1]:8000", "[::1]", "::1"]  # fmt: skip
FOREIGN_HOSTS = ["evil.example", "evil.example:8000", "localhost.evil.example",
                 "192.168.1.5:8000", "[::2]", "localhost:x", "", "local host"]  # fmt: skip


@pytest.mark.parametrize("host", LOCAL_HOSTS)
def test_local_host_names_are_served(client: TestClient, host: str) -> None:
    assert client.get("/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("POST", OA), ("GET", "/nope")])
def test_foreign_hosts_are_400(client: TestClient, host: str, method: str, path: str) -> None:
    response = client.request(method, path, headers={"Host": host}, json=BODY)
    error = _assert_error(response, 400, "invalid_host")
    assert error["param"] == "Host"


def test_the_default_test_client_host_is_refused(service: ChatService) -> None:
    """TestClient says ``Host: testserver``: a name that is not ours (pass base_url)."""
    with TestClient(create_app(service, ServerSettings())) as plain:
        _assert_error(plain.get("/health"), 400, "invalid_host")


def test_the_bound_host_is_served(client_factory: Callable[..., TestClient]) -> None:
    lan = client_factory(host="192.168.1.5")
    assert lan.get("/health", headers={"Host": "192.168.1.5:8000"}).status_code == 200
    assert lan.get("/health", headers={"Host": "localhost"}).status_code == 200
    _assert_error(lan.get("/health", headers={"Host": "192.168.1.6"}), 400, "invalid_host")
    named = client_factory(host="box.lan")
    assert named.get("/health", headers={"Host": "BOX.lan:8000"}).status_code == 200


def test_a_wildcard_bind_serves_ip_literals_but_not_names(
    client_factory: Callable[..., TestClient],
) -> None:
    wildcard = client_factory(host="0.0.0.0")
    for host in ("10.1.2.3:8000", "[fe80::1]:8000", "localhost"):
        assert wildcard.get("/health", headers={"Host": host}).status_code == 200
    _assert_error(wildcard.get("/health", headers={"Host": "evil.example"}), 400, "invalid_host")


def test_allowed_hosts(client_factory: Callable[..., TestClient]) -> None:
    listed = client_factory(allowed_hosts=("api.example.com", "*.corp.example", "10.0.0.7:9"))
    for host in ("api.example.com", "API.example.com:443", "a.corp.example", "10.0.0.7"):
        assert listed.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("corp.example", "example.com", "10.0.0.8"):
        _assert_error(listed.get("/health", headers={"Host": host}), 400, "invalid_host")
    anything = client_factory(allowed_hosts=("*",))
    assert anything.get("/health", headers={"Host": "whatever.example"}).status_code == 200


@pytest.mark.parametrize("bad", ["bad/host", "a b", "*", "[::1"])
def test_settings_refuse_bad_allowed_hosts(bad: str) -> None:
    if bad == "*":
        assert ServerSettings(allowed_hosts=(bad,)).allowed_hosts == ("*",)
        return
    with pytest.raises(ValueError, match="allowed_hosts"):
        ServerSettings(allowed_hosts=(bad,))


def test_settings_refuse_a_string_for_allowed_hosts() -> None:
    with pytest.raises(ValueError, match="tuple"):
        ServerSettings(allowed_hosts="localhost")  # type: ignore[arg-type]


def test_the_host_check_runs_before_auth_and_cors(
    client_factory: Callable[..., TestClient],
) -> None:
    app = client_factory(api_key="k", cors_origins=("http://app.local",))
    foreign = {"Host": "evil.example"}
    _assert_error(app.post(OA, json=BODY, headers=foreign), 400, "invalid_host")
    preflight = {"Origin": "http://app.local", "Access-Control-Request-Method": "POST"}
    _assert_error(app.options(OA, headers={**preflight, **foreign}), 400, "invalid_host")
    answered = app.options(OA, headers=preflight)  # CORS preflight: no key, no body
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == "http://app.local"


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("Example.COM:80", "example.com"),
        ("[::1]:8000", "::1"),
        ("::1", "::1"),
        ("localhost.", "localhost"),
        ("localhost:", "localhost"),
        ("[::1]x", None),
        ("a:b", None),
        ("", None),
        ("a@b", None),
    ],
)
def test_host_name(value: str, name: str | None) -> None:
    assert host_name(value) == name


def test_missing_or_repeated_host_headers_are_400() -> None:
    """Raw ASGI: clients cannot be made to drop or repeat Host."""
    guard = HostGuardMiddleware(_never_called, HostPolicy())
    for headers in ([], [(b"host", b"localhost"), (b"host", b"localhost")]):
        sent = _call(guard, headers)
        assert sent[0]["status"] == 400
        assert json.loads(sent[1]["body"])["error"]["code"] == "invalid_host"


async def _never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the guard let the request through")


def _call(app: Any, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    import anyio

    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "GET", "path": "/health", "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)
    return sent


# ----------------------------------------------------------------------------- OpenAPI


@pytest.fixture(scope="module")
def document(service: ChatService) -> dict[str, Any]:
    with TestClient(create_app(service, ServerSettings()), base_url=LOCAL) as client:
        return client.get("/openapi.json").json()


def _validator(document: dict[str, Any], name: str) -> Any:
    import jsonschema

    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(schema)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_openapi_chat_routes_declare_body_200_and_errors(document: dict[str, Any]) -> None:
    for path, body in ((AZ, "AzureChatCompletionsRequest"), (OA, "OpenAIChatCompletionsRequest")):
        operation = document["paths"][path]["post"]
        request = operation["requestBody"]
        assert request["required"] is True
        assert request["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
        responses = operation["responses"]
        assert CHAT_ERRORS <= set(responses)
        ok = responses["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletions")
        assert "itemSchema" in ok["text/event-stream"]
        for status in set(responses) - {"200"}:
            error = responses[status]
            schema = error["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorResponse"), status
            assert error["headers"]["x-ms-error-code"]["required"] is True
        assert responses["429"]["headers"]["Retry-After"]["required"] is True


def test_openapi_get_routes_declare_their_models(document: dict[str, Any]) -> None:
    expected = {
        "/health": "Health",
        "/info": "ModelInfo",
        "/models/info": "ModelInfo",
        "/v1/models": "ModelList",
    }
    for path, model in expected.items():
        responses = document["paths"][path]["get"]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"400", "500"} <= set(responses)
        assert ("401" in responses) == (path != "/health")


def test_openapi_refs_resolve_and_there_is_no_docs_page(
    document: dict[str, Any], client: TestClient
) -> None:
    schemas = document["components"]["schemas"]
    for ref in set(_refs(document)):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref
    assert client.get("/docs").status_code == 404


def test_request_schemas_name_exactly_the_accepted_parameters(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    azure = schemas["AzureChatCompletionsRequest"]
    openai = schemas["OpenAIChatCompletionsRequest"]
    assert set(azure["properties"]) == AZURE_PARAMETERS | PHI3_EXTRA_PARAMETERS
    assert set(openai["properties"]) == OPENAI_PARAMETERS
    assert azure["required"] == openai["required"] == ["messages"]
    assert openai["additionalProperties"] is False  # the Azure route: extra-parameters header
    model = azure["properties"]["model"]["anyOf"][0]
    assert model["enum"] == ["Phi-3-mini-4k-instruct"]


_BOUNDS = ("minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength")


def _bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """Bounds of a property's non-null branch(es), items included."""
    branches = schema.get("anyOf", [schema])
    found: dict[str, Any] = {}
    for branch in branches:
        if branch.get("type") in (None, "null"):
            continue
        found.update({k: branch[k] for k in _BOUNDS if k in branch})
        if isinstance(branch.get("items"), dict):
            found.update(
                {f"items.{k}": branch["items"][k] for k in _BOUNDS if k in branch["items"]}
            )
    return found


def test_request_schema_bounds_are_chat_requests(document: dict[str, Any]) -> None:
    """The documented bounds are the validator's (Azure's temperature 0..1 aside)."""
    truth = ChatRequest.model_json_schema()["properties"]
    for name in ("AzureChatCompletionsRequest", "OpenAIChatCompletionsRequest"):
        documented = document["components"]["schemas"][name]["properties"]
        for field, schema in documented.items():
            if field not in truth or (field, name) == (
                "temperature",
                "AzureChatCompletionsRequest",
            ):
                continue
            expected = _bounds(truth[field])
            assert _bounds(schema).items() >= expected.items(), (name, field)
    azure = document["components"]["schemas"]["AzureChatCompletionsRequest"]["properties"]
    assert _bounds(azure["temperature"]) == {"minimum": 0, "maximum": 1}


def test_examples_match_the_request_schemas_and_are_served(
    document: dict[str, Any], client: TestClient
) -> None:
    for path in (AZ, OA):
        media = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        validator = _validator(document, media["schema"]["$ref"].split("/")[-1])
        for name, example in media["examples"].items():
            validator.validate(example["value"])
            response = client.post(path, json=example["value"])
            assert response.status_code == 200, (path, name, response.text)


def test_responses_match_the_documented_schemas(
    document: dict[str, Any], client: TestClient
) -> None:
    body = {**BODY, "n": 2, "logprobs": True, "top_logprobs": 2, "stop": ["zz"], "seed": 1}
    _validator(document, "ChatCompletions").validate(client.post(OA, json=body).json())
    streamed = client.post(OA, json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    chunk = _validator(document, "StreamingChatCompletionsUpdate")
    for event in events[:-1]:
        chunk.validate(json.loads(event))
    error = _validator(document, "ErrorResponse")
    error.validate(client.post(OA, json={"messages": []}).json())
    error.validate(client.post(OA, content="{}", headers={"Content-Type": "text/plain"}).json())
    error.validate(client.get("/health", headers={"Host": "evil.example"}).json())
    _validator(document, "ModelInfo").validate(client.get("/info").json())
    _validator(document, "ModelList").validate(client.get("/v1/models").json())
    _validator(document, "Health").validate(client.get("/health").json())


def test_security_schemes_only_when_a_key_is_required(
    document: dict[str, Any], client_factory: Callable[..., TestClient]
) -> None:
    assert "securitySchemes" not in document["components"]
    keyed = client_factory(api_key="k").get("/openapi.json", headers={"api-key": "k"}).json()
    assert set(keyed["components"]["securitySchemes"]) == {"api-key", "bearer"}
    assert keyed["paths"][OA]["post"]["security"] == [{"api-key": []}, {"bearer": []}]
    assert "security" not in keyed["paths"]["/health"]["get"]
