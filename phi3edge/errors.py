"""The one error type every layer raises for a request that cannot be answered.

``ApiError`` carries what the HTTP shim sends: status, code, message and the offending parameter.
The in-process client raises it directly, so both paths fail the same way.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class ApiError(Exception):
    """A request failed; ``status`` is the HTTP status the cloud endpoint would answer with."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with every field (errors cross to and from the engine process)."""
        return (type(self), (self.status, self.code, self.message, self.param))

    def as_dict(self) -> dict[str, Any]:
        """The error body: ``{"error": {"code", "message", "param", "status"}}``."""
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "status": self.status,
            }
        }

    def __repr__(self) -> str:
        phrase = (
            HTTPStatus(self.status).phrase if self.status in HTTPStatus._value2member_map_ else ""
        )
        return (
            f"ApiError({self.status} {phrase}, code={self.code!r}, param={self.param!r}: "
            f"{self.message})"
        )


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    """400: the request is malformed or a value is out of range."""
    return ApiError(400, code, message, param)


def not_supported(message: str, param: str | None = None) -> ApiError:
    """422: the request is valid but this model cannot do what it asks."""
    return ApiError(422, "parameter_not_supported", message, param)


def engine_stopped() -> ApiError:
    """503: the model's engine has stopped (closed, or its process died)."""
    return ApiError(503, "engine_stopped", "the model's engine has stopped")


def internal_error() -> ApiError:
    """500: our own bug; the message says nothing internal (the log has the traceback)."""
    return ApiError(500, "internal_error", "internal error")


def client_closed() -> ApiError:
    """499: the caller left before the answer was complete."""
    return ApiError(499, "client_closed_request", "the client closed the request")


def in_batch(error: ApiError, index: int) -> ApiError:
    """The same error, naming request ``index`` of a batch."""
    param = f"requests[{index}]" + (f".{error.param}" if error.param else "")
    return ApiError(error.status, error.code, f"request {index}: {error.message}", param)
