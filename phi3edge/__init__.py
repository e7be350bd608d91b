"""phi3edge: run Microsoft Phi-3 / Phi-3.5 on your own machine, answering cloud-style chat
completions.

The in-process client is imported lazily so that ``phi3edge.export`` and the fixtures work without
loading onnxruntime-genai.
"""

from __future__ import annotations

from typing import Any

from phi3edge.errors import ApiError

__all__ = [
    "ApiError",
    "AssistantMessage",
    "ChatCompletionsClient",
    "JsonSchemaFormat",
    "Limits",
    "SystemMessage",
    "UserMessage",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in (
        "ChatCompletionsClient",
        "JsonSchemaFormat",
        "SystemMessage",
        "UserMessage",
        "AssistantMessage",
    ):
        from phi3edge import client

        return getattr(client, name)
    if name == "Limits":
        from phi3edge.limits import Limits

        return Limits
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("phi3edge")
        except PackageNotFoundError:  # a source checkout that was never installed
            return "0+unknown"
    raise AttributeError(f"module 'phi3edge' has no attribute {name!r}")
