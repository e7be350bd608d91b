"""Batch jobs on a Ray cluster (the optional ``[ray]`` extra): one model copy per Ray actor.

Input: a Ray Data dataset whose ``request`` column holds Batch API input lines (JSON text or
dicts: ``custom_id``, ``method``, ``url``, ``body``), or a JSONL file for ``run``.
Output: ``ChatPredictor`` maps each batch of rows to rows of ``custom_id``, ``status_code``
(``None`` for a line that is not a request), ``content`` (the first choice's text, or None) and
``output`` (the whole Batch API output line as JSON text); ``run`` yields the output lines as
dicts, like ``phi3edge.batch.run``.
Errors: as ``phi3edge.batch`` (each row gets its own answer); ``ImportError`` without Ray.

Use it in a pipeline of your own::

    ds = ray.data.read_text("requests.jsonl").rename_columns({"text": "request"})
    answers = ds.map_batches(
        ChatPredictor,
        fn_constructor_kwargs={"model_dir": "/models/phi3-mini-int4"},
        compute=ray.data.ActorPoolStrategy(size=4),   # older Ray: concurrency=4
        num_cpus=2,  # per actor: ONNX Runtime then runs 2 threads
        batch_size=32,
    )

Each actor loads the model once and answers its batches through the same code as a local job
(the requests of a batch are kept in flight together, so its engine batches them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from phi3edge import batch
from phi3edge.service import ChatService

ACTOR_START_TIMEOUT_S = 600  # for every actor of a job to load its model


class ChatPredictor:
    """A callable class for ``Dataset.map_batches``: loads the model once per actor, with as
    many ONNX Runtime threads as CPUs Ray gave the actor."""

    def __init__(
        self,
        model_dir: str,
        threads: int | None = None,
        extra_parameters: str | None = None,
        skip_ids: Iterable[str] = (),
        line_errors: bool = True,
        window: int = batch.WINDOW,
        prefill_tokens: int = batch.JOB_PREFILL_TOKENS,
        padding_pct: int | None = batch.JOB_PADDING_PCT,
    ) -> None:
        """``skip_ids``: custom_ids already answered. ``line_errors``: answer rows that are not
        requests with an error row (False: drop them, when the caller reports them itself).
        ``window``, ``prefill_tokens`` and ``padding_pct``: as for a local job
        (``batch.job_limits``)."""
        self.window = window
        self.service = ChatService(
            model_dir,
            threads=threads or _assigned_cpus(),
            limits=batch.job_limits(window, prefill_tokens, padding_pct),
        )
        self.extra_parameters = extra_parameters
        self.skip_ids = set(skip_ids)
        self.line_errors = line_errors

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[Any]]:
        requests = [_plain(r) for r in rows["request"]]
        if not self.line_errors:
            requests = [r for r in requests if batch.read_line(r).error is None]
        outputs = batch.run(
            self.service,
            requests,
            skip_ids=self.skip_ids,
            extra_parameters=self.extra_parameters,
            window=self.window,
        )
        columns: dict[str, list[Any]] = {"custom_id": [], "status_code": [], "content": []}
        columns["output"] = []
        for output in outputs:
            response = output["response"]
            choices = (response or {}).get("body", {}).get("choices") or [{}]
            columns["custom_id"].append(output["custom_id"])
            columns["status_code"].append(response["status_code"] if response else None)
            columns["content"].append(choices[0].get("message", {}).get("content"))
            columns["output"].append(json.dumps(output, ensure_ascii=False))
        return columns

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def run(
    model_dir: str | Path,
    path: str | Path,
    *,
    address: str | None = None,
    actors: int = 2,
    cpus_per_actor: int = 1,
    skip_ids: Iterable[str] = (),
    skip_lines: Iterable[int] = (),
    extra_parameters: str | None = None,
    window: int = batch.WINDOW,
    prefill_tokens: int = batch.JOB_PREFILL_TOKENS,
    padding_pct: int | None = batch.JOB_PADDING_PCT,
) -> Iterator[dict[str, Any]]:
    """A Batch API JSONL file answered on a Ray cluster; yields output dicts as they arrive.

    ``address``: the cluster (as for ``ray.init``: ``auto``, ``ray://HOST:10001``); None starts
    a local Ray instance with room for ``actors`` x ``cpus_per_actor`` CPUs plus one for reading.
    The file is read by Ray Data: on a cluster of several machines it must be at the same path
    on each (shared storage), and phi3edge and the model folder too.
    Lines that are not requests are answered here (this process knows their line numbers); the
    rest go to ``actors`` ``ChatPredictor`` actors, ``window`` rows at a time each.
    """
    import ray

    path = Path(path).resolve()
    model_dir = str(Path(model_dir).resolve())
    # duplicates and mixed models: refused before Ray starts
    batch.scan(batch.read_file(path), batch.served_adapters(model_dir))
    skip_ids, skip_lines = set(skip_ids), set(skip_lines)

    def answer() -> Iterator[dict[str, Any]]:
        for number, raw in batch._numbered(batch.read_file(path)):
            line = batch.read_line(raw, number)
            if line.error is None:
                continue
            done = (
                line.number in skip_lines if line.custom_id is None else line.custom_id in skip_ids
            )
            if not done:
                yield batch.error_line(line)
        started_here = not ray.is_initialized()
        if started_here:
            if address is None:
                ray.init(
                    num_cpus=actors * cpus_per_actor + 1,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            else:
                ray.init(address=address, log_to_driver=False)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # ours is on stderr
            # Rows go out once every actor has loaded its model, so all of them share the work
            # (and a cluster without room for them fails here instead of waiting forever).
            context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            dataset = ray.data.read_text(str(path)).rename_columns({"text": "request"})
            answers = dataset.map_batches(
                ChatPredictor,
                fn_constructor_kwargs={
                    "model_dir": model_dir,
                    "threads": cpus_per_actor,
                    "extra_parameters": extra_parameters,
                    "skip_ids": skip_ids,
                    "line_errors": False,
                    "window": window,
                    "prefill_tokens": prefill_tokens,
                    "padding_pct": padding_pct,
                },
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus_per_actor,
                batch_size=window,
            )
            for row in answers.iter_rows():
                yield json.loads(row["output"])
        finally:
            if started_here:
                ray.shutdown()

    return answer()


def _assigned_cpus() -> int | None:
    """The CPUs Ray reserved for this actor (None outside Ray: the runtime's default)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker
        return None
    return max(1, int(cpus)) if cpus else None


def _plain(value: Any) -> Any:
    """A row value as Python text or dict (Ray hands numpy / Arrow scalars)."""
    if isinstance(value, (str, bytes, dict)):
        return value
    item = getattr(value, "item", None)
    return item() if callable(item) else value
