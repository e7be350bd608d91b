"""Keep web pages away from a local server: Host allow-list and JSON-only request bodies.

A server on 127.0.0.1 is reachable from every page the user's browser opens. Two attacks need no
help from the user and work even though the pages cannot read cross-origin answers:

- **Cross-site "simple" requests.** A page may POST to ``http://127.0.0.1:8000/chat/completions``
  with ``Content-Type: text/plain`` (or a form encoding) and no CORS preflight; with no API key
  (the default) the server would run the request. ``JsonBodyMiddleware`` therefore answers
  **415** ``unsupported_media_type`` to any POST on a JSON route whose ``Content-Type`` is not
  ``application/json`` (case-insensitive; a ``charset=utf-8`` parameter is fine, another charset
  is not; a missing header is refused too). ``application/json`` is not a "simple" content type, so
  a browser sends such a request only after a CORS preflight that this server answers only for the
  origins in ``ServerSettings.cors_origins``. The ``azure-ai-inference`` and ``openai`` clients
  send ``application/json``. Unknown routes and wrong methods keep their 404 / 405.
- **DNS rebinding.** A page on ``evil.example`` re-points that name to 127.0.0.1 and then talks to
  the server as a same-origin site, reading every answer. Its requests still say
  ``Host: evil.example``, so ``HostGuardMiddleware`` answers **400** ``invalid_host`` to every
  request (any route, any method, before authentication and CORS) whose ``Host`` is not allowed:

  - always: ``localhost``, loopback IP literals (``127.0.0.1``, ``[::1]``, ...), with any port;
  - the host the server binds to (``ServerSettings.host``), when it is a specific name or address;
    binding to a wildcard (``0.0.0.0``, ``::``) also admits any IP literal and this machine's
    host name (an IP literal cannot be rebound, so it is safe to accept);
  - ``ServerSettings.allowed_hosts``: extra names (a port in an entry is ignored;
    ``*.example.com`` matches subdomains; ``*`` turns the check off, e.g. behind a proxy that
    rewrites ``Host``).

  A request without a ``Host`` header (HTTP/1.0) or with several is refused too.

Both middlewares are pure ASGI (no ``BaseHTTPMiddleware``: streaming responses pass through
untouched). Refusals use the server's error envelope: ``{"error": {"code", "message", "param",
"status"}}`` plus the ``x-ms-error-code`` header, written by ``error_response`` (the one place it
is written; ``phi3edge.server`` uses it too).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from phi3edge.errors import ApiError

LOCAL_HOST_NAMES = frozenset({"localhost"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
JSON_MEDIA_TYPE = "application/json"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error envelope and ``x-ms-error-code``; ``headers`` are added (and may override)."""
    all_headers = {"x-ms-error-code": error.code, **(headers or {})}
    return JSONResponse(error.as_dict(), status_code=error.status, headers=all_headers)


# ----------------------------------------------------------------------------- Host


def host_name(value: str) -> str | None:
    """The host part of a ``Host`` header (or allow-list entry), lower case, without port,
    brackets or a trailing dot; None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not _is_port_suffix(rest)):
            return None
    elif value.count(":") > 1:  # a bare IPv6 address ("::1"), no port possible
        name = value
    else:
        name, colon, port = value.partition(":")
        if colon and not _is_port_suffix(":" + port):
            return None
    name = name.removesuffix(".")
    if not name or any(c.isspace() or c in "/\\@?#" for c in name):
        return None
    return name


def _is_port_suffix(text: str) -> bool:
    """``":8000"`` or ``":"`` (an empty port is legal in a URI authority)."""
    return text.startswith(":") and (text == ":" or text[1:].isascii() and text[1:].isdigit())


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostPolicy:
    """Which ``Host`` header values the server answers (see the module docstring)."""

    def __init__(self, bind_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = ()) -> None:
        self.any_host = False
        self.any_ip = False
        self.names: set[str] = set(LOCAL_HOST_NAMES)
        self.suffixes: list[str] = []
        bind = bind_host.strip().lower()
        if bind in WILDCARD_BINDS:
            self.any_ip = True
            self.names.add(socket.gethostname().lower().removesuffix("."))
        else:
            name = host_name(bind)
            if name:
                self.names.add(name)
        for entry in (e.strip() for e in allowed_hosts):
            if entry == "*":
                self.any_host = True
            elif entry.startswith("*."):
                self.suffixes.append("." + _allowed_entry(entry[2:]))
            else:
                self.names.add(_allowed_entry(entry))

    def allows(self, host: str) -> bool:
        if self.any_host:
            return True
        name = host_name(host)
        if name is None:
            return False
        if name in self.names or any(name.endswith(s) for s in self.suffixes):
            return True
        address = _ip(name)
        return address is not None and (self.any_ip or address.is_loopback)


def _allowed_entry(entry: str) -> str:
    name = host_name(entry)
    if name is None or name.startswith("*"):
        raise ValueError(f"allowed_hosts entry {entry!r} is not a host name")
    return name


def check_allowed_hosts(entries: Iterable[str]) -> None:
    """Raise ``ValueError`` for an entry ``HostPolicy`` cannot use (settings validation)."""
    HostPolicy("127.0.0.1", entries)


class HostGuardMiddleware:
    """Refuse requests whose ``Host`` the policy does not allow (400 ``invalid_host``)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.policy.any_host:
            await self.app(scope, receive, send)
            return
        hosts = Headers(scope=scope).getlist("host")
        if len(hosts) == 1 and self.policy.allows(hosts[0]):
            await self.app(scope, receive, send)
            return
        if not hosts:
            message = "the request has no Host header"
        elif len(hosts) > 1:
            message = "the request has more than one Host header"
        else:
            message = (
                f"this server does not answer for host {hosts[0][:100]!r}; "
                "use localhost or add the name to the server's allowed hosts"
            )
        response = error_response(ApiError(400, "invalid_host", message, "Host"))
        await response(scope, receive, send)


# ----------------------------------------------------------------------------- Content-Type


def is_json_content_type(value: str) -> bool:
    """``application/json``, optionally with ``charset=utf-8`` (any case, optional quotes)."""
    media_type, *params = value.split(";")
    if media_type.strip().lower() != JSON_MEDIA_TYPE:
        return False
    for param in params:
        name, _, param_value = param.partition("=")
        if name.strip().lower() == "charset":
            if param_value.strip().strip('"').lower() not in ("utf-8", "utf8"):
                return False
    return True


class JsonBodyMiddleware:
    """Refuse POST/PUT/PATCH on ``paths`` unless the body is declared ``application/json``."""

    def __init__(self, app: ASGIApp, paths: Iterable[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _BODY_METHODS
            or scope["path"] not in self.paths
        ):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).getlist("content-type")
        if len(declared) == 1 and is_json_content_type(declared[0]):
            await self.app(scope, receive, send)
            return
        got = "no Content-Type" if not declared else "Content-Type " + repr(", ".join(declared))
        error = ApiError(
            415,
            "unsupported_media_type",
            f"the request body must be JSON sent as 'Content-Type: {JSON_MEDIA_TYPE}' "
            f"(got {got[:120]})",
            "Content-Type",
        )
        response = error_response(error, headers={"Accept": JSON_MEDIA_TYPE})
        await response(scope, receive, send)
