"""How a generator's KV cache is laid out: one preallocated buffer when it fits the machine's
share (``runtime.kv_preallocate_bytes``), else a cache that grows every step."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from phi3edge import engine, runtime

GiB = 1 << 30


def test_each_holder_gets_a_share_of_free_memory_and_never_less_than_2_gib() -> None:
    assert runtime.kv_preallocate_bytes(20 * GiB, holders=3) == 5 * GiB
    assert runtime.kv_preallocate_bytes(20 * GiB, holders=9) == 2 * GiB
    assert runtime.kv_preallocate_bytes(4 * GiB, holders=1) == 2 * GiB
    assert runtime.kv_preallocate_bytes(None, holders=1) == 2 * GiB


def test_available_memory_is_within_the_machines_memory() -> None:
    available = runtime.available_memory()
    if not Path("/proc/meminfo").is_file():
        assert available is None
        return
    assert available is not None
    assert 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture(scope="module")
def model(tiny_int4: Path) -> runtime.LoadedModel:
    return runtime.load(tiny_int4, threads=1)


@pytest.fixture
def shared_buffers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The past_present_share_buffer of every generator made while the test runs."""
    import onnxruntime_genai as og

    made: list[bool] = []
    real, real_generator = og.GeneratorParams, og.Generator

    class Recorded:
        def __init__(self, og_model: Any) -> None:
            self._params = real(og_model)

        def set_search_options(self, **options: Any) -> None:
            made.append(options["past_present_share_buffer"])
            self._params.set_search_options(**options)

    monkeypatch.setattr(og, "GeneratorParams", Recorded)
    monkeypatch.setattr(og, "Generator", lambda m, params: real_generator(m, params._params))
    return made


def test_a_cache_within_the_share_is_preallocated_and_a_longer_one_grows(
    model: runtime.LoadedModel, shared_buffers: list[bool]
) -> None:
    per_token = model.kv_bytes_per_token
    fits = dataclasses.replace(model, kv_preallocate_bytes=100 * per_token)
    engine._new_generator(fits, 100, 1)
    engine._new_generator(fits, 101, 1)
    engine._new_generator(fits, 50, 2)
    engine._new_generator(fits, 51, 2)
    engine._new_generator(dataclasses.replace(fits, shared_kv_limit=60), 61, 1)
    assert shared_buffers == [True, False, True, False, False]
