"""Shared fixtures: tiny random-weight checkpoints and their exports, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from phi3edge import export, fixtures


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``model_factory(member, precision=None)``: a tiny checkpoint, or its export when given a
    precision; each is built once per session."""
    root = tmp_path_factory.mktemp("models")
    built: dict[tuple[str, str | None], Path] = {}

    def make(member: str, precision: str | None = None) -> Path:
        key = (member, precision)
        if key not in built:
            if precision is None:
                built[key] = fixtures.write_random_checkpoint(member, root / member, size="tiny")
            else:
                built[key] = export.export(
                    make(member), root / f"{member}-{precision}", precision=precision
                )
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_int4(model_factory: Callable[..., Path]) -> Path:
    """The tiny random Phi-3-mini-4k exported to INT4 (what `phi3edge demo` serves)."""
    return model_factory("phi-3-mini-4k", "int4")


@pytest.fixture(scope="session")
def tiny_fp32(model_factory: Callable[..., Path]) -> Path:
    return model_factory("phi-3-mini-4k", "fp32")
