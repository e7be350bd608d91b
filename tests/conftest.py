"""Shared fixtures: tiny random-weight checkpoints and their exports, built once per session."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="module")
def service(tiny_int4: Path) -> Iterator[Any]:
    """A ``ChatService`` (engine thread and all) over the tiny INT4 model, per test module."""
    from phi3edge.service import ChatService

    service = ChatService(tiny_int4, threads=1)
    yield service
    service.close()


@pytest.fixture
def client_factory(service: Any) -> Iterator[Callable[..., Any]]:
    """``client_factory(base_url=..., **settings)``: an in-process HTTP client (FastAPI's
    TestClient) over ``create_app(service, ServerSettings(**settings))``. The default base URL
    sends a local Host header, as a real local client does."""
    from fastapi.testclient import TestClient

    from phi3edge.server import ServerSettings, create_app

    clients: list[TestClient] = []

    def make(base_url: str = "http://127.0.0.1:8000", **settings: Any) -> TestClient:
        app = create_app(service, ServerSettings(**settings))
        clients.append(TestClient(app, base_url=base_url, raise_server_exceptions=False))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def cli_error(capsys: pytest.CaptureFixture) -> Callable[..., str]:
    """Runs ``phi3edge ARGV...`` expecting exit status 2 and returns its one-line error, checked to
    start with ``error:`` and to carry no traceback."""
    from phi3edge.cli import main

    def run(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ")
        assert not any(line.startswith(("Traceback", "  File")) for line in err)
        return err[-1]

    return run


@pytest.fixture
def within() -> Callable[..., Any]:
    """``within(seconds, call)``: ``call()``'s result (or its exception), run on a daemon thread
    so that a test of the engine's survival fails instead of hanging when the engine is gone and
    the caller would wait forever."""

    def run(seconds: float, call: Callable[[], Any]) -> Any:
        outcome: list[Any] = []

        def target() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # handed to the test
                outcome.append((False, exc))

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(seconds)
        if not outcome:
            pytest.fail(f"no answer within {seconds} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return run
