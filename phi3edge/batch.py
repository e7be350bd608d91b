"""Batch jobs: files in the OpenAI / Azure OpenAI Batch API format, answered by one local model.

Input: lines of the Batch API input format, one request each::

    {"custom_id": "task-0", "method": "POST", "url": "/chat/completions", "body": {...}}

``url`` is ``/v1/chat/completions`` (the body is checked by the HTTP server's OpenAI route rules)
or ``/chat/completions`` (the Azure route's rules, with the ``extra-parameters`` policy given
here instead of a header). Lines come as text, bytes or already-parsed dicts.
Output: one dict per request in the Batch API output format::

    {"id": "batch_req_...", "custom_id": "task-0",
     "response": {"status_code": 200, "request_id": "...", "body": {chat.completion}},
     "error": null}

A body the server would refuse gets the server's answer (``status_code`` 400/422 and its
``{"error": ...}`` body); a line that is not a request at all (not JSON, no ``custom_id``, another
method or url) gets ``response: null`` and ``error: {code, message, line}``. Neither stops the job.
Errors: ``BatchInputError`` for a file that cannot run as a whole (two lines with one
``custom_id``; bodies naming two different models): refused before anything runs.

The ``model`` of a body: a cloud batch runs on one deployment and its files carry that
deployment's name (``gpt-4o-mini``, ``REPLACE-WITH-MODEL-DEPLOYMENT-NAME``); here the model
folder chosen for the job plays that part, and each response's ``model`` names it. A name that
is one of the model's LoRA adapters (``phi3edge adapter add``) selects that adapter for its line,
as it does for a server request, so one file can mix the base and its fine-tunes.

Memory stays flat for any file size: lines are read as they are needed, at most ``window``
requests are in flight, and only the ``custom_id`` strings are kept (to refuse duplicates).
The engine groups the requests in flight into batches with its own policy
(``engine.fits_in_batch``), as it does for concurrent server requests (``job_limits``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3edge.engine import MAX_BATCH_ROWS
from phi3edge.errors import ApiError, bad_request, internal_error
from phi3edge.export import ExportError, Manifest
from phi3edge.limits import Limits
from phi3edge.runtime import adapter_named
from phi3edge.schema import ChatRequest, Route, parse_json, parse_request
from phi3edge.service import ChatService, PendingCompletion

log = logging.getLogger(__name__)

# The Batch API's chat-completions urls and the server route whose rules check their bodies.
CHAT_URLS: dict[str, Route] = {"/v1/chat/completions": "openai", "/chat/completions": "azure"}
LINE_FIELDS = ("custom_id", "method", "url", "body")
# Requests in flight: four full batches' worth, so the engine finds alike lengths to batch
# together (the engine runs up to two batches at once by default).
WINDOW = 4 * MAX_BATCH_ROWS
# A batch job's caps on one batch: 1024 padded prefill tokens, and at most 10% of its work
# wasted on padding and filler steps (Limits.batch_prefill_tokens, .batch_padding_pct). On
# full-size Phi-3-mini, 64 mixed requests ran side by side in one run at 2.28x of one at a time
# with these, 2.21x with a 25% padding cap, 2.19x / 2.14x with 32 in flight
# (docs/bench_batch_padding.json); with 1024 and no padding cap at 1.40x (mixed prompts padded to
# the longest cost as much as real tokens; docs/bench_batch_mixed.json). A job has no one waiting
# on a reply, so a longer uninterruptible prefill costs it nothing.
JOB_PREFILL_TOKENS = 1024
JOB_PADDING_PCT: int | None = 10


def job_limits(
    window: int = WINDOW,
    prefill_tokens: int = JOB_PREFILL_TOKENS,
    padding_pct: int | None = JOB_PADDING_PCT,
) -> Limits:
    """The limits of a model loaded for a batch job: ``window`` requests in flight."""
    return Limits(
        max_queue=window, batch_prefill_tokens=prefill_tokens, batch_padding_pct=padding_pct
    )


Raw = str | bytes | dict[str, Any]
# Failures that say nothing about the request: the job stops and a rerun tries it again.
_NOT_ANSWERED = frozenset({"client_closed_request", "engine_stopped"})


class BatchInputError(ValueError):
    """The input cannot run as a whole (duplicate custom_ids, several models)."""


@dataclass(frozen=True)
class Line:
    """One input line, its envelope checked: a request to answer, or a line-level error."""

    number: int | None  # 1-based line of the input; None when unknown (rows of a Ray dataset)
    custom_id: str | None
    route: Route | None = None
    body: Any = None
    error: ApiError | None = None  # the line is not a request; written as an error line


def read_line(raw: Raw, number: int | None = None) -> Line:
    """Check a line's envelope (JSON object, custom_id, method, url); the body is checked later
    by the server's schema code."""
    where = f"line {number}" if number is not None else "the line"
    if isinstance(raw, dict):
        data: Any = raw
    else:
        try:
            data = parse_json(raw)
        except ApiError as exc:
            message = exc.message.replace("the request body", where)
            return Line(number, None, error=ApiError(400, "invalid_json_line", message))
    if not isinstance(data, dict):
        return Line(number, None, error=_line_error(f"{where} is not a JSON object"))
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Line(
            number,
            None,
            error=_line_error(f"{where} has no custom_id (a non-empty string)", "custom_id"),
        )
    unknown = [k for k in data if k not in LINE_FIELDS]
    if unknown:
        return Line(
            number,
            custom_id,
            error=_line_error(
                f"{where} has an unknown field {unknown[0]!r} "
                f"(a line holds {', '.join(LINE_FIELDS)})",
                unknown[0],
            ),
        )
    if data.get("method") != "POST":
        return Line(
            number,
            custom_id,
            error=_line_error(f'{where}: method must be "POST"', "method", "invalid_method"),
        )
    url = data.get("url")
    route = CHAT_URLS.get(url) if isinstance(url, str) else None
    if route is None:
        return Line(
            number,
            custom_id,
            error=_line_error(
                f"{where}: url must be one of {', '.join(CHAT_URLS)} (this runtime answers "
                "chat completions only)",
                "url",
                "invalid_url",
            ),
        )
    return Line(number, custom_id, route, data.get("body"))


def _line_error(message: str, param: str | None = None, code: str = "invalid_line") -> ApiError:
    return ApiError(400, code, message, param)


# ----------------------------------------------------------------------------- checks up front


@dataclass
class Scan:
    """What one pass over the input found: its custom_ids and the model its bodies name."""

    ids: dict[str, int]  # custom_id -> the line it is on
    lines: int = 0  # non-blank lines
    bad_lines: int = 0  # lines with a line-level error
    model: str | None = None


def scan(lines: Iterable[Raw], adapters: Sequence[str] = ()) -> Scan:
    """Read every line once, keeping only the custom_ids (and the model name); raise
    ``BatchInputError`` for duplicate ids or bodies naming different models (``adapters``:
    the names that select a LoRA adapter instead, which lines may mix)."""
    result = Scan(ids={})
    model_line = 0
    for number, raw in _numbered(lines):
        result.lines += 1
        line = read_line(raw, number)
        if line.error is not None:
            result.bad_lines += 1
        if line.custom_id is None:
            continue
        if line.custom_id in result.ids:
            raise BatchInputError(
                f"custom_id {line.custom_id!r} is on line {result.ids[line.custom_id]} and "
                f"line {number}; custom_ids must be unique (nothing was run)"
            )
        result.ids[line.custom_id] = number
        model = _deployment_name(line, adapters)
        if model is not None:
            if result.model is None:
                result.model, model_line = model, number
            elif model != result.model:
                raise BatchInputError(
                    f"line {model_line} asks for model {result.model!r} and line {number} for "
                    f"{model!r}; a batch runs one model (nothing was run)"
                )
    return result


def _deployment_name(line: Line, adapters: Sequence[str]) -> str | None:
    """The model a line's body names, unless that name selects one of ``adapters``: the cloud
    deployment the file was written for, which every line must share."""
    model = line.body.get("model") if isinstance(line.body, dict) else None
    if not isinstance(model, str) or not model or adapter_named(adapters, model):
        return None
    return model


def served_adapters(model: str | Path | Any) -> tuple[str, ...]:
    """The LoRA adapters of ``model`` (a folder's manifest, or a loaded service's); () when the
    folder cannot be read (loading it reports why)."""
    if isinstance(model, (str, Path)):
        try:
            return tuple(Manifest.read(model).adapters)
        except (OSError, ExportError):
            return ()
    service = _given_service(model)
    return tuple(service.adapter_names) if service is not None else ()


def read_file(path: str | Path) -> Iterator[bytes]:
    """The lines of a JSONL file, read as they are needed."""
    with open(path, "rb") as handle:
        yield from handle


def _numbered(lines: Iterable[Raw]) -> Iterator[tuple[int, Raw]]:
    """(1-based line number, line) for every line that is not blank."""
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, (str, bytes)) and not raw.strip():
            continue
        yield number, raw


# ----------------------------------------------------------------------------- output lines


def response_line(custom_id: str | None, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An output line holding the HTTP answer the server would have sent."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }


def error_line(line: Line) -> dict[str, Any]:
    """An output line for a line that is not a request (no response, a line-level error)."""
    assert line.error is not None
    error: dict[str, Any] = {"code": line.error.code, "message": line.error.message}
    if line.number is not None:
        error["line"] = line.number
    if line.error.param is not None:
        error["param"] = line.error.param
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": None,
        "error": error,
    }


def completion_tokens(output: dict[str, Any]) -> int:
    """Tokens generated for an output line (0 for errors): for progress figures."""
    body = (output.get("response") or {}).get("body") or {}
    return int((body.get("usage") or {}).get("completion_tokens", 0))


# ----------------------------------------------------------------------------- the job


def prepare(
    line: Line, extra_parameters: str | None = None, adapters: Sequence[str] = ()
) -> ChatRequest:
    """The line's body validated by the server's schema code for its route (``ApiError`` as the
    server would answer), ready for a model that plays the file's named model: the ``model``
    stays only when it selects one of ``adapters``."""
    assert line.route is not None
    request = parse_request(
        line.body,
        route=line.route,
        extra_parameters=extra_parameters if line.route == "azure" else None,
    )
    if request.stream:
        raise bad_request("a batch job cannot stream; leave stream out or false", "stream")
    return request.model_copy(update={"model": adapter_named(adapters, request.model)})


def run(
    model: str | Path | Any,
    requests: str | Path | Iterable[Raw],
    *,
    skip_ids: Iterable[str] = (),
    skip_lines: Iterable[int] = (),
    extra_parameters: str | None = None,
    threads: int | None = None,
    window: int = WINDOW,
    limits: Limits | None = None,
) -> Iterator[dict[str, Any]]:
    """Answer a Batch API input; yield one output dict per request, in the order they finish.

    ``model``: an exported model folder (loaded here, closed at the end), or a ``ChatService``
    or ``ChatCompletionsClient`` to use. ``requests``: a JSONL path, or lines (text, bytes or
    dicts). ``skip_ids`` / ``skip_lines``: custom_ids, and line numbers of lines without one,
    already answered (resumption). ``extra_parameters``: the Azure route's policy for
    ``/chat/completions`` lines (None: ``error``, as without the header). ``window``: requests
    in flight at once; the engine batches them.

    A path or a sequence is scanned first (``BatchInputError`` is raised by this call, before
    the model loads); a one-pass iterator raises it when the offending line comes.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    adapters = served_adapters(model)
    if isinstance(requests, (str, Path)):
        path = requests
        scan(read_file(path), adapters)
        lines: Iterable[Raw] = read_file(path)
    elif isinstance(requests, Sequence):
        scan(requests, adapters)
        lines = requests
    else:
        lines = requests
    return _run(
        model, lines, set(skip_ids), set(skip_lines), extra_parameters, threads, window, limits
    )


def _run(
    model: str | Path | Any,
    lines: Iterable[Raw],
    skip_ids: set[str],
    skip_lines: set[int],
    extra_parameters: str | None,
    threads: int | None,
    window: int,
    limits: Limits | None,
) -> Iterator[dict[str, Any]]:
    service, owned = _service(model, threads, limits or job_limits(window))
    window = min(window, service.limits.max_queue)
    try:
        yield from _Job(service, extra_parameters, window).answer(lines, skip_ids, skip_lines)
    finally:
        if owned:
            service.close()


def _given_service(model: Any) -> ChatService | None:
    """``model`` when it is a ``ChatService``, a ``ChatCompletionsClient``'s service, else None."""
    if isinstance(model, ChatService):
        return model
    inner = getattr(model, "_service", None)  # a ChatCompletionsClient
    return inner if isinstance(inner, ChatService) else None


def _service(model: Any, threads: int | None, limits: Limits) -> tuple[ChatService, bool]:
    given = _given_service(model)
    if given is not None:
        return given, False
    return ChatService(model, threads=threads, limits=limits), True


class _Job:
    """Keeps up to ``window`` requests in flight; each waits for its answer on a worker thread
    (the threads only wait: the engine thread does the work)."""

    def __init__(self, service: ChatService, extra_parameters: str | None, window: int) -> None:
        self.service = service
        self.extra_parameters = extra_parameters
        self.window = window
        self.seen: set[str] = set()
        self.model_name: str | None = None
        self.adapters = service.adapter_names

    def answer(
        self, lines: Iterable[Raw], skip_ids: set[str], skip_lines: set[int]
    ) -> Iterator[dict[str, Any]]:
        pending: dict[Future[dict[str, Any]], PendingCompletion] = {}
        pool = ThreadPoolExecutor(self.window, thread_name_prefix="phi3edge-batch")
        try:
            for number, raw in _numbered(lines):
                line = read_line(raw, number)
                if self._skip(line, skip_ids, skip_lines):
                    continue
                if line.error is not None:
                    yield error_line(line)
                    continue
                try:
                    request = prepare(line, self.extra_parameters, self.adapters)
                except ApiError as exc:
                    yield response_line(line.custom_id, exc.status, exc.as_dict())
                    continue
                while True:
                    while len(pending) >= self.window:
                        yield from self._collect(pending, block=True)
                    try:
                        submitted = self.service.submit(request)
                    except ApiError as exc:
                        if exc.status != 429:  # the engine stopped: nothing more can run
                            raise
                        if pending:  # the queue is shared with other users: wait for a slot
                            yield from self._collect(pending, block=True)
                        else:
                            time.sleep(0.5)
                        continue
                    future = pool.submit(_result, line.custom_id, submitted)
                    pending[future] = submitted
                    break
                yield from self._collect(pending, block=False)
            while pending:
                yield from self._collect(pending, block=True)
        finally:
            for submitted in pending.values():  # abandoned (the caller stopped reading)
                submitted.cancel()
            pool.shutdown(wait=True)

    def _skip(self, line: Line, skip_ids: set[str], skip_lines: set[int]) -> bool:
        """Already answered, or refused: duplicates and a second model (one-pass inputs)."""
        if line.custom_id is None:
            return line.number in skip_lines
        if line.custom_id in self.seen:
            raise BatchInputError(
                f"custom_id {line.custom_id!r} appears twice (again on line {line.number})"
            )
        self.seen.add(line.custom_id)
        model = _deployment_name(line, self.adapters)
        if model is not None:
            if self.model_name is None:
                self.model_name = model
            elif model != self.model_name:
                raise BatchInputError(
                    f"line {line.number} asks for model {model!r} after {self.model_name!r}; "
                    "a batch runs one model"
                )
        return line.custom_id in skip_ids

    @staticmethod
    def _collect(
        pending: dict[Future[dict[str, Any]], PendingCompletion], block: bool
    ) -> Iterator[dict[str, Any]]:
        done, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            del pending[future]
            yield future.result()


def _result(custom_id: str | None, submitted: PendingCompletion) -> dict[str, Any]:
    """Wait for one answer (on a worker thread) and make its output line."""
    try:
        completion = submitted.result()
    except ApiError as exc:
        if exc.code in _NOT_ANSWERED:
            raise  # not an answer to write: a rerun must try this request again
        return response_line(custom_id, exc.status, exc.as_dict())
    except Exception:
        log.exception("error while answering custom_id %r", custom_id)
        error = internal_error()
        return response_line(custom_id, error.status, error.as_dict())
    return response_line(custom_id, 200, completion.as_dict())
