"""The engine in a child process: ``EngineCore(..., process=True)`` and ``phi3edge serve``.

Input (parent side, ``ProcessLink``): jobs from ``EngineCore.submit``; their cancellations.
Output: each job's events, handed to its ticket by a reader thread; the engine's stats.
Errors: a model that fails to load raises in the parent as it would in-process; if the child
dies, every job still in it ends with 503 ``engine_stopped``.

Why a process: onnxruntime-genai 0.18 keeps the GIL while it computes (a 256-token prefill chunk
of full Phi-3-mini held it 14.6 s here: scripts/bench_model_calls.py), so in the process that runs
the model no other Python thread moves meanwhile: not the HTTP server's event loop, not an app's
UI thread. The child runs the very
same engine loop as the in-process engine thread (``core.run_engine``).

The child is ``python -c "...; phi3edge.engine_process.main()"``, not ``multiprocessing``: its
spawning would re-run the user's main script, which a library must not ask of its callers.
Messages are pickled, each preceded by its length, over the child's stdin and stdout; the child's
own prints and logs go to stderr, which it shares with the parent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

from phi3edge.core import (
    EngineOptions,
    EngineStats,
    Event,
    Failed,
    Finished,
    _Job,
    _Shared,
    metadata,
    run_engine,
)
from phi3edge.errors import engine_stopped
from phi3edge.limits import Limits

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")


def _write(stream: BinaryIO, lock: threading.Lock, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        stream.write(_LENGTH.pack(len(data)) + data)
        stream.flush()


def _read(stream: BinaryIO) -> Any:
    """The next message, or None at the end of the stream."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


# ----------------------------------------------------------------------------- parent side


class ProcessLink:
    """Starts the child, sends it jobs and cancellations, and routes its events back."""

    def __init__(self, shared: _Shared, model_dir: str | Path, options: EngineOptions) -> None:
        self._shared = shared
        # The child imports the very package this process runs (not one the working directory
        # may shadow, such as a source checkout without the compiled sampler).
        root = str(Path(__file__).resolve().parent.parent)
        start = f"import sys; sys.path.insert(0, {root!r}); import {__name__} as m; m.main()"
        self._process = subprocess.Popen(
            [sys.executable, "-c", start], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._to_child: BinaryIO = self._process.stdin
        self._from_child: BinaryIO = self._process.stdout
        self._lock = threading.Lock()
        self._deliveries: dict[int, Any] = {}  # job id -> its deliver, until its last event
        self._stopping = False
        config = (str(model_dir), options, shared.limits)
        _write(self._to_child, self._lock, (config, logging.getLogger().getEffectiveLevel()))
        loaded = _read(self._from_child)
        if loaded is None:
            self.shut_down()
            raise RuntimeError("the engine process exited while loading the model")
        if isinstance(loaded, BaseException):
            self.shut_down()
            raise loaded
        self.model = loaded
        self._reader = threading.Thread(
            target=self._read_events, name="phi3edge-engine-events", daemon=True
        )
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None and self._reader.is_alive()

    def send(self, job: _Job) -> None:
        with self._lock:
            self._deliveries[job.id] = job.deliver
        message = ("submit", job.id, job.requests, job.batch, job.time_budget_s)
        self._send(message, job)

    def cancel(self, job: _Job) -> None:
        if job.id in self._deliveries:  # not ended yet
            self._send(("cancel", job.id), job)

    def _send(self, message: Any, job: _Job) -> None:
        try:
            _write(self._to_child, self._lock, message)
        except (BrokenPipeError, OSError, ValueError):  # the child is gone
            self._end(job.id, Failed(engine_stopped()))

    def _end(self, job_id: int, event: Finished | Failed) -> None:
        with self._lock:
            deliver = self._deliveries.pop(job_id, None)
        if deliver is not None:
            log.debug("job %d ended in the engine process", job_id)
            deliver(event)

    def _read_events(self) -> None:
        while (message := _read(self._from_child)) is not None:
            kind, payload = message
            if kind == "stats":
                self._shared.stats = payload
                continue
            job_id, event = payload
            if isinstance(event, (Finished, Failed)):
                self._end(job_id, event)
                continue
            with self._lock:
                deliver = self._deliveries.get(job_id)
            if deliver is not None:
                deliver(event)
        if not self._stopping:
            log.warning("the engine process has stopped")
        with self._lock:
            left = list(self._deliveries)
        for job_id in left:
            self._end(job_id, Failed(engine_stopped()))

    def shut_down(self) -> None:
        self._stopping = True
        try:
            _write(self._to_child, self._lock, None)
            self._to_child.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


# ----------------------------------------------------------------------------- child side


class _Inbox:
    """What the engine loop reads (``get``): jobs decoded from stdin by a reader thread, which
    also applies cancellations at once (they set a flag the loop checks between units of work)."""

    def __init__(self, source: BinaryIO, send: Any) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._live: dict[int, _Job] = {}
        self._lock = threading.Lock()
        self._send = send
        threading.Thread(target=self._read, args=(source,), daemon=True).start()

    def get(self, block: bool = True, timeout: float | None = None) -> _Job | None:
        return self._jobs.get(block=block, timeout=timeout)

    def _read(self, source: BinaryIO) -> None:
        while (message := _read(source)) is not None:
            if message[0] == "cancel":
                with self._lock:
                    job = self._live.get(message[1])
                if job is not None:
                    job.cancelled.set()
                continue
            _, job_id, requests, batch, time_budget_s = message
            job = _Job(requests, batch, self._deliverer(job_id), time_budget_s)
            with self._lock:
                self._live[job_id] = job
            self._jobs.put(job)
        self._jobs.put(None)  # the parent said stop, or is gone

    def _deliverer(self, job_id: int) -> Any:
        def deliver(event: Event) -> None:
            if isinstance(event, (Finished, Failed)):
                with self._lock:
                    self._live.pop(job_id, None)
            self._send(("event", (job_id, event)))

        return deliver


def main() -> None:
    """The child: the protocol runs on the original stdout; anything printed goes to stderr."""
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    protocol_in = sys.stdin.buffer
    lock = threading.Lock()

    def send(message: Any) -> None:
        _write(protocol_out, lock, message)

    start = _read(protocol_in)
    if start is None:
        return
    (model_dir, options, limits), level = start
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    assert isinstance(limits, Limits)

    def on_loaded(result: Any) -> None:
        if isinstance(result, BaseException):
            try:
                pickle.dumps(result)
            except Exception:
                result = RuntimeError(f"{type(result).__name__}: {result}")
            send(result)
        else:
            send(metadata(result))

    def on_stats(stats: EngineStats) -> None:
        send(("stats", dataclasses.replace(stats)))

    inbox = _Inbox(protocol_in, send)
    run_engine(model_dir, options, limits, inbox, EngineStats(), on_loaded, on_stats)
    protocol_out.flush()
    # The stdin reader may still be blocked in a read; a normal interpreter exit would wait on
    # its lock. Everything the parent needs has been sent.
    os._exit(0)


if __name__ == "__main__":
    main()
