"""HTTP shim: the cloud endpoint's chat-completions routes over one local ``ChatService``.

Input: HTTP requests. ``POST /chat/completions`` is the Azure AI Model Inference route (it honours
the ``extra-parameters`` header); ``POST /v1/chat/completions`` is the OpenAI-compatible one;
``GET /info`` (alias ``/models/info``), ``GET /v1/models`` and the unauthenticated
``GET /health`` describe the server. The ``api-version`` query parameter the Azure SDK sends is
accepted and ignored.
Output: JSON bodies in the REST shape, or data-only server-sent events (``data: {chunk}``, then
``data: [DONE]``) for ``stream: true``.
Errors: every failure answers ``{"error": {"code", "message", "param", "status"}}`` plus an
``x-ms-error-code`` header: 400 malformed, over a limit or a foreign ``Host`` (``invalid_host``),
401 bad key, 404 unknown route/model, 405 wrong method, 413 body too large, 415 a body that is not
``application/json``, 422 unsupported, 429 queue full (with ``Retry-After``), 503 the request's time
budget ran out before it started or the engine stopped, 500 only for our own bugs and then without
internals. A client that hangs up gets nothing (its request is cancelled). Once a stream has
started, an error goes out as one ``data: {"error": ...}`` event and the stream ends.

The layer stays thin: all validation is ``schema.parse_request``'s, all generation is
``ChatService``'s.
Parsing and validation run in worker threads; generation runs on the model's engine thread,
whose bounded queue turns overload into 429s. The event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from phi3edge import openapi
from phi3edge.errors import ApiError, bad_request, internal_error
from phi3edge.export import MANIFEST
from phi3edge.http_guard import (
    HostGuardMiddleware,
    HostPolicy,
    JsonBodyMiddleware,
    check_allowed_hosts,
    error_response,
)
from phi3edge.limits import Limits
from phi3edge.openapi import API_VERSION as _API_VERSION
from phi3edge.openapi import AZURE_CHAT as _AZURE_CHAT
from phi3edge.openapi import OPENAI_CHAT as _OPENAI_CHAT
from phi3edge.schema import (
    ChatRequest,
    Route,
    StreamingChatCompletionsUpdate,
    parse_json,
    parse_request,
)
from phi3edge.service import ChatService

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_AFTER_SECONDS = 1
_OPEN_PATHS = frozenset({"/health"})  # answered without an API key (liveness probes)
_DISCONNECT_POLL_SECONDS = 0.05
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class ServerSettings:
    """How the HTTP shim is exposed; the defaults are the safe ones (loopback, no CORS)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()  # empty: no CORS middleware at all
    # Host header values answered besides localhost and `host` ("*" = any); see http_guard.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if isinstance(self.allowed_hosts, str):
            raise ValueError("allowed_hosts must be a tuple of host names, not a string")
        check_allowed_hosts(self.allowed_hosts)


# ----------------------------------------------------------------------------- errors


def _error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """``http_guard.error_response`` (the envelope's one writer) plus Retry-After on 429."""
    all_headers = dict(headers or {})
    if error.status == 429:
        all_headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
    return error_response(error, all_headers)


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in our envelope, not plain text."""
    assert isinstance(exc, StarletteHTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = HTTPStatus(exc.status_code).phrase
    return _error_response(ApiError(exc.status_code, code, message), headers=exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    """Never FastAPI's own 422 body: validation belongs to ``parse_request``."""
    return _error_response(bad_request("the request does not match the API schema"))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    """Our bug: log the traceback here, tell the client nothing internal."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(internal_error())


# ----------------------------------------------------------------------------- auth


class _ApiKeyMiddleware:
    """Require the key on every route but /health, as ``api-key`` (Azure) or Bearer (OpenAI)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            401,
            "unauthorized",
            "missing or invalid API key (send it as 'api-key: KEY' or 'Authorization: Bearer KEY')",
        )
        response = _error_response(error, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = Headers(scope=scope)
        candidates = [headers.get("api-key", "")]
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(token.strip())
        # Check every candidate so the time taken does not depend on which header matched.
        matches = [hmac.compare_digest(c.encode(), self._key) for c in candidates]
        return any(matches)


# ----------------------------------------------------------------------------- request bodies


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most ``limit`` bytes; FastAPI never sees it."""
    too_large = ApiError(413, "payload_too_large", f"the request body exceeds {limit} bytes", None)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_chat(raw: bytes, route: Route, policy: str | None) -> ChatRequest:
    """JSON text -> validated request; CPU-bound, so it runs in a worker thread."""
    return parse_request(parse_json(raw), route=route, extra_parameters=policy)


# ----------------------------------------------------------------------------- streaming


def _sse(data: Mapping[str, Any]) -> bytes:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that always runs ``cleanup`` when it ends, however it ends."""

    def __init__(
        self, content: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()


class _ClientGone(Exception):
    """The client hung up while we waited for the engine."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (which cancels its job)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            if await request.is_disconnected():
                log.info("client disconnected; cancelling generation")
                task.cancel()
                return
            await asyncio.sleep(_DISCONNECT_POLL_SECONDS)

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not watcher.done():
            raise  # we were cancelled ourselves
        raise _ClientGone() from None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _stream(request: Request, chat: ChatRequest, route: Route) -> Response:
    """Wait for the first chunk before answering 200, so early errors keep their 4xx status."""
    service: ChatService = request.app.state.service
    usage_chunk = route == "openai" and chat.include_usage_in_stream
    # OpenAI sends usage only when stream_options.include_usage asks for it.
    drop_usage = route == "openai" and not usage_chunk
    chunks = service.astream(chat, usage_chunk=usage_chunk)

    def event(chunk: StreamingChatCompletionsUpdate) -> bytes:
        data = chunk.as_dict()
        if drop_usage:
            data.pop("usage", None)
        return _sse(data)

    try:
        first = await _unless_disconnected(request, anext(chunks))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await chunks.aclose()
        raise

    async def events() -> AsyncIterator[bytes]:
        yield event(first)
        try:
            async for chunk in chunks:
                yield event(chunk)
        except ApiError as exc:
            yield _sse(exc.as_dict())
            return
        except Exception:
            log.exception("error while streaming")
            yield _sse(internal_error().as_dict())
            return
        yield _DONE

    return _EventStream(events(), chunks.aclose)


# ----------------------------------------------------------------------------- routes

router = APIRouter()

# The body is read and validated by hand (parse_request); phi3edge.openapi describes it
# (_API_VERSION, _AZURE_CHAT, _OPENAI_CHAT) and every response, from pydantic models.


async def _chat(request: Request, route: Route) -> Response:
    """Both chat routes: read, validate (off the event loop), then answer whole or as a stream.

    The engine's queue bounds how many requests run or wait (429 beyond it); a client that hangs
    up cancels its request within one unit of the engine's work.
    """
    state = request.app.state
    raw = await _read_body(request, state.settings.max_body_bytes)
    policy = request.headers.get("extra-parameters") if route == "azure" else None
    chat = await anyio.to_thread.run_sync(_parse_chat, raw, route, policy)
    try:
        if chat.stream:
            return await _stream(request, chat, route)
        result = await _unless_disconnected(request, state.service.acomplete(chat))
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it
    return JSONResponse(result.as_dict())


@router.get(
    "/health",
    summary="Liveness probe (no API key needed)",
    responses=openapi.HEALTH_RESPONSES,
)
async def health(request: Request) -> JSONResponse:
    """``ok`` while the engine thread runs (503 once it has stopped), and how many requests are
    running or waiting for it (beyond ``max_queue`` they are refused with 429)."""
    core = request.app.state.service.core
    body = {
        "status": "ok" if core.alive else "engine_stopped",
        "requests": core.jobs,
        "max_queue": core.limits.max_queue,
    }
    return JSONResponse(body, 200 if core.alive else 503)


@router.get(
    "/info",
    summary="The served model (Azure AI Model Inference: get_model_info)",
    openapi_extra={"parameters": [_API_VERSION]},
    responses=openapi.INFO_RESPONSES,
)
async def info(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.service.model_info().as_dict())


@router.get("/models/info", summary="Alias of /info", responses=openapi.INFO_RESPONSES)
async def models_info(request: Request) -> JSONResponse:
    return await info(request)


@router.post(
    "/chat/completions",
    summary="Chat completions, Azure AI Model Inference API",
    openapi_extra=_AZURE_CHAT,
    responses=openapi.CHAT_RESPONSES,
)
async def chat_completions_azure(request: Request) -> Response:
    """Parameters outside the Azure schema follow the ``extra-parameters`` header."""
    return await _chat(request, "azure")


@router.post(
    "/v1/chat/completions",
    summary="Chat completions, OpenAI-compatible",
    openapi_extra=_OPENAI_CHAT,
    responses=openapi.CHAT_RESPONSES,
)
async def chat_completions_openai(request: Request) -> Response:
    return await _chat(request, "openai")


@router.get(
    "/v1/models",
    summary="The served model and its LoRA adapters in OpenAI's list shape",
    responses=openapi.MODELS_RESPONSES,
)
async def list_models(request: Request) -> JSONResponse:
    service: ChatService = request.app.state.service
    created = request.app.state.model_created
    models = [
        {"id": service.model_name, "object": "model", "created": created, "owned_by": "microsoft"}
    ]
    models += [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "user",
            "parent": service.model_name,
        }
        for name in service.adapter_names
    ]
    return JSONResponse({"object": "list", "data": models})


def create_app(service: ChatService, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app over ``service``; everything it needs lives on ``app.state``."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="phi3edge",
        version=_package_version(),
        description="Phi-3 chat completions on this machine (Azure AI Model Inference / OpenAI).",
        docs_url=None,  # the docs pages load scripts from a CDN; /openapi.json stays
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.service = service
    app.state.settings = settings
    manifest = Path(service.model.folder) / MANIFEST
    app.state.model_created = int(manifest.stat().st_mtime) if manifest.exists() else 0
    app.include_router(router)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    # The last added runs first: Host check, CORS preflight, API key, JSON-only bodies, routes.
    json_paths = {r.path for r in router.routes if "POST" in getattr(r, "methods", ())}
    app.add_middleware(JsonBodyMiddleware, paths=json_paths)
    if settings.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:  # preflight requests are answered before auth
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(
        HostGuardMiddleware, policy=HostPolicy(settings.host, settings.allowed_hosts)
    )
    openapi.install(
        app,
        model_name=service.model_name,
        adapter_names=service.adapter_names,
        api_key_required=bool(settings.api_key),
        open_paths=_OPEN_PATHS,
    )
    return app


def _package_version() -> str:
    """The installed version; a source checkout on PYTHONPATH has no metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("phi3edge")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- serve


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so ``port=0`` yields the real port to print."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    """The base URL a bound socket answers on."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port in a background thread; yield its base URL.

    For tests, benchmarks and apps that embed the HTTP shim next to their own code.
    """
    import uvicorn

    sock = bind_socket(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def serve(
    model_dir: str | Path,
    settings: ServerSettings | None = None,
    threads: int | None = None,
    limits: Limits | None = None,
    engine_process: bool = True,
    speculative: bool = True,
) -> None:
    """Load the model, then serve it with uvicorn until interrupted.

    ``engine_process``: the model runs in a child process, so that the event loop never waits
    for the GIL that onnxruntime-genai holds while it computes. ``speculative``: prompt-lookup
    speculative decoding of requests that run alone."""
    import uvicorn

    settings = settings or ServerSettings()
    service = ChatService(
        model_dir,
        threads=threads,
        limits=limits,
        engine_process=engine_process,
        speculative=speculative,
    )
    app = create_app(service, settings)
    sock = bind_socket(settings.host, settings.port)
    announcement = (
        f"phi3edge serving {service.model_name} at {url_of(sock)} "
        "(routes: /chat/completions, /v1/chat/completions)"
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(announcement, flush=True)

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    try:
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
        service.close()
