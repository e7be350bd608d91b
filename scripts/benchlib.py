"""Shared helpers of the benchmark scripts: cached full-size random models, timing, tables."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from phi3edge import export, fixtures
from phi3edge.cli import cache_dir


def full_model(
    member: str = "phi-3-mini-4k", precision: str = "int4", **options: int | str
) -> Path:
    """The full-size random checkpoint of ``member`` exported once and cached (INT4 options as
    keyword arguments, e.g. ``block_size=128``)."""
    root = cache_dir() / "bench"
    checkpoint = root / f"full-{member}-random"
    if not (checkpoint / "config.json").exists():
        print(f"building full-size random {member} in {checkpoint} (about a minute) ...")
        fixtures.write_random_checkpoint(member, checkpoint, size="full")
    suffix = "".join(f"-{k}{v}" for k, v in sorted(options.items()))
    exported = root / f"full-{member}-random-{precision}{suffix}"
    if not (exported / export.MANIFEST).exists():
        print(f"exporting to {exported} (about 3 minutes) ...")
        int4 = export.Int4Options(**options)  # type: ignore[arg-type]
        export.export(checkpoint, exported, precision=precision, int4=int4, progress=print)
    return exported


def median_time(run: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def machine() -> str:
    import onnxruntime_genai as og

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; onnxruntime-genai {og.__version__}; Python {platform.python_version()}"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --threads, --repeats, --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    return parser
