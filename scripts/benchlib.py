"""Shared helpers of the benchmark scripts: cached full-size random models, timing, tables."""

from __future__ import annotations

import argparse
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from phi3edge import export, fixtures
from phi3edge.benchmark import NO_END
from phi3edge.cli import cache_dir
from phi3edge.schema import SamplingConfig


def random_checkpoint(member: str = "phi-3-mini-4k", layers: int | None = None) -> Path:
    """Where ``full_model`` keeps the full-width random checkpoint of ``member`` (``layers``
    deep when given; the real depth names the same checkpoint as none); the exports and other
    formats of it are named after it."""
    full_depth = fixtures.checkpoint_config(member, "full")["num_hidden_layers"]
    depth = f"-{layers}layers" if layers and layers != full_depth else ""
    return cache_dir() / "bench" / f"full-{member}{depth}-random"


def full_model(
    member: str = "phi-3-mini-4k",
    precision: str = "int4",
    layers: int | None = None,
    **options: int | str | tuple[str, ...],
) -> Path:
    """The full-size random checkpoint of ``member`` exported once and cached (INT4 options as
    keyword arguments, e.g. ``block_size=128``; none: rtn at block 32, the layout the engine
    benchmarks have always measured). ``layers`` keeps the full width with fewer layers, for
    members too big for this machine."""
    checkpoint = random_checkpoint(member, layers)
    if not (checkpoint / "config.json").exists():
        print(f"building full-size random {checkpoint.name} ...")
        fixtures.write_random_checkpoint(member, checkpoint, size="full", layers=layers)
    suffix = "".join(
        f"-{k}{'+'.join(v) if isinstance(v, tuple) else v}" for k, v in sorted(options.items())
    )
    exported = checkpoint.with_name(f"{checkpoint.name}-{precision}{suffix}")
    if not (exported / export.MANIFEST).exists():
        print(f"exporting to {exported} (about 3 minutes) ...")
        int4 = export.Int4Options(**options)  # type: ignore[arg-type]
        export.export(checkpoint, exported, precision=precision, int4=int4, progress=print)
    return exported


# Every sampling feature on: what our engine's per-token cost is measured with.
ALL_FEATURES = SamplingConfig(
    temperature=0.7,
    top_p=0.9,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    logit_bias={**NO_END, **{i: 1.0 for i in range(1000, 1007)}},
    top_logprobs=20,
    logprobs=True,
    seed=1,
)

MID = {
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 2816,
}
MID_LAYERS = 8


def mid_model() -> tuple[Path, Path]:
    """A mid-size random Phi-3-mini (hidden 1024, 8 layers, the real vocabulary) and its INT4
    export, built once and cached: a model fast enough that a per-token overhead shows."""
    root = cache_dir() / "bench"
    checkpoint = root / f"mid-phi-3-mini-h{MID['hidden_size']}-l{MID_LAYERS}-random"
    if not (checkpoint / "config.json").exists():
        print(f"building a mid-size random Phi-3-mini in {checkpoint} ...", flush=True)
        fixtures.write_random_checkpoint(
            "phi-3-mini-4k", checkpoint, size="full", layers=MID_LAYERS, overrides=MID
        )
    exported = checkpoint.with_name(checkpoint.name + "-int4")
    if not (exported / export.MANIFEST).exists():
        export.export(checkpoint, exported, int4=export.PLAIN, progress=print)
    return checkpoint, exported


def median_time(run: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def alternating_medians(
    runs: dict[str, Callable[[], tuple[float, ...]]], rounds: int
) -> dict[str, tuple[float, ...]]:
    """Per name, the median of each figure its run returns over ``rounds`` rounds, every round
    calling each run once in turn, so that a slow spell of a shared machine hits all of them
    alike instead of whichever ran during it."""
    samples: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for number in range(1, rounds + 1):
        for name, run in runs.items():
            samples[name].append(run())
            print(f"round {number}/{rounds} {name}: {samples[name][-1]}", flush=True)
    return {
        name: tuple(statistics.median(column) for column in zip(*figures, strict=True))
        for name, figures in samples.items()
    }


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


_URL = re.compile(r" at (http://\S+) ")


class Server:
    """``phi3edge serve`` in a child process; its output (the server log) goes to ``log_path``.

    stdout is read to the end by a thread: uvicorn's access log goes there, and an unread pipe
    would fill up and block the server mid-request.
    """

    def __init__(self, model: Path, log_path: Path, flags: list[str]) -> None:
        command = [sys.executable, "-m", "phi3edge.cli", "serve", str(model), "--port", "0"]
        command += flags
        self.log_path = log_path
        self._log = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(  # cwd away from a source tree: the installed package runs
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
            cwd=tempfile.gettempdir(),
        )
        self._first_line: list[str] = []
        self._started = threading.Event()
        self._access_log = log_path.with_name("access.log").open("w", encoding="utf-8")
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        self.url = self._wait_for_url(timeout=180)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not self._started.is_set():
                self._first_line.append(line)
                self._started.set()
            else:
                self._access_log.write(line)
        self._started.set()  # the process ended before printing anything

    def _wait_for_url(self, timeout: float) -> str:
        self._started.wait(timeout)
        match = _URL.search(self._first_line[0]) if self._first_line else None
        if match is None:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"phi3edge serve did not start: {self._first_line!r}\n{tail}")
        return match[1]

    def rss_kb(self) -> int:
        """Resident memory (VmRSS) of the server and its children (the engine process), KiB."""
        total, pending = 0, [self.proc.pid]
        while pending:
            pid = pending.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            rss = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
            total += int(rss.split()[1])
        return total

    def errors(self) -> list[str]:
        """ERROR lines and tracebacks in the server log."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if line.startswith(("ERROR", "Traceback"))]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._log.close()
        self._access_log.close()


# A JSON object schema with bounded strings, a pattern, an integer range and an enum array: the
# structured-output benchmarks' answers (bench_engine, bench_sampler).
JSON_ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    },
    "required": ["name", "age", "email", "tags"],
    "additionalProperties": False,
}
