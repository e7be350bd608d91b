"""The engine thread: the one owner of a loaded model, its KV caches and its sampler states.

Input: jobs (one or more validated ``ChatRequest``) from any thread, through ``EngineCore.submit``.
Output: each job's events on its own channel (``Ticket``), read blocking (``events``) or from an
event loop (``aevents``): ``Started`` (a request entered a batch), ``Steps`` (what a unit of work
produced), then ``Finished`` or ``Failed``.
Errors: ``submit`` raises 429 when ``max_queue`` jobs are already in; a request the model cannot
answer (context, logit_bias ids, limits) ends its job with ``Failed`` before anything runs; a bug
while generating ends the affected jobs with a 500 and the engine goes on.

Nothing but this thread calls onnxruntime-genai for the model: it loads the model, tokenizes
prompts and runs every generator, so no lock is held across a ``yield`` and no generator is
resumed on another thread (vLLM's engine core at our scale).

Scheduling (onnxruntime-genai cannot add rows to a running generator on CPU):
- A request is tokenized and checked as soon as it arrives, so a bad one is answered at once even
  while the model is busy.
- Waiting requests form a batch when one of ``max_active_batches`` slots is free and the oldest
  has waited ``BATCH_WINDOW_S`` (50 ms, so requests sent together arrive together): the oldest
  waiting request plus the others that fit with it (``engine.fits_in_batch``: rows, context,
  ``Limits.batch_prefill_tokens`` of batched prefill, ``Limits.batch_padding_pct`` of waste),
  those of the most alike lengths first. A request with a prompt too long to share runs alone
  and its prefill goes in 64-token chunks.
- A batch starts only if the KV cache it reserves fits beside the live generators' in the memory
  free at load (``runtime.KvLedger``; kept conversations it cannot reuse are dropped first);
  otherwise the oldest waiting request, and everything behind it, waits for a batch to end.
- Active batches take turns one unit of work at a time (a prefill chunk or a decode step); the
  batch that has used the least engine time goes next. A short request arriving behind a long one
  therefore starts at once and shares the engine, instead of waiting for the long one to end.
- Cancellation and each request's time budget are checked between units of work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3edge import engine, runtime
from phi3edge.engine import ChoiceStep
from phi3edge.errors import ApiError, client_closed, engine_stopped, in_batch, internal_error
from phi3edge.limits import Limits
from phi3edge.prompt import Prompt, build_prompt
from phi3edge.schema import ChatRequest, SamplingConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Started:
    """Request ``request`` of the job entered a batch; its prompt has ``prompt_tokens``."""

    request: int
    prompt_tokens: int


@dataclass(frozen=True)
class Steps:
    """What one unit of work produced for request ``request`` (one step per open choice)."""

    request: int
    steps: list[ChoiceStep]


@dataclass(frozen=True)
class Finished:
    """Every request of the job is done (last event)."""


@dataclass(frozen=True)
class Failed:
    """The job ended without an answer (last event)."""

    error: ApiError


Event = Started | Steps | Finished | Failed


BATCH_WINDOW_S = 0.05  # how long the oldest waiting request waits for others to batch with


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs its model (what one request may ask for is ``Limits``)."""

    threads: int | None = None  # ONNX Runtime intra-op threads; None: the physical cores
    kv_cache_entries: int = 1  # conversations whose KV cache is kept for the next turn (0: off)
    speculative: bool = True  # prompt-lookup speculative decoding of requests that run alone


# ----------------------------------------------------------------------------- jobs


_job_ids = itertools.count()


class _Job:
    """Requests submitted together, the caller's channel and the flags both threads read."""

    def __init__(
        self,
        requests: list[ChatRequest],
        batch: bool,
        deliver: Callable[[Event], None],
        time_budget_s: float | None,
    ) -> None:
        self.id = next(_job_ids)
        self.requests = requests
        self.batch = batch  # errors name the request index (complete_batch)
        self.deliver = deliver
        self.time_budget_s = time_budget_s
        self.arrived = time.monotonic()
        self.deadline = None if time_budget_s is None else self.arrived + time_budget_s
        self.cancelled = threading.Event()
        self.ended = False  # a last event was delivered (engine thread only)
        self.started = False
        self.open_requests = len(requests)

    def halt(self) -> str | None:
        if self.cancelled.is_set() or self.ended:
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "length"
        return None


@dataclass
class _Unit:
    """One request of a job, tokenized and checked, waiting for or running in a batch."""

    job: _Job
    index: int
    cfg: SamplingConfig
    prompt: Prompt
    adapter: str | None = None  # the LoRA adapter the request's ``model`` names
    held_for_memory: bool = False  # it has waited for a running batch's KV cache to go

    def item(self) -> engine.BatchItem:
        return engine.BatchItem(self.prompt, self.cfg, self.job.halt, self.adapter)


class Ticket:
    """The caller's side of a job: its events, and ``cancel``.

    Made for a thread that blocks (``events``) or for an asyncio event loop (``aevents``): the
    engine thread hands each event over with ``call_soon_threadsafe``, so the loop never blocks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._sync: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if loop else None
        self._cancel: Callable[[], None] | None = None

    def _deliver(self, event: Event) -> None:
        if self._async is None:
            self._sync.put(event)
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody will read this job
            self.cancel()

    def cancel(self) -> None:
        """Stop the job at the engine's next unit of work (safe from any thread, any time)."""
        if self._cancel is not None:
            self._cancel()

    def events(self) -> Iterator[Event]:
        while True:
            event = self._sync.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def aevents(self) -> AsyncIterator[Event]:
        assert self._async is not None, "this ticket was made for a blocking reader"
        while True:
            event = await self._async.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


# ----------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    """Units running as one onnxruntime-genai generator; advanced one unit of work at a time."""

    units: list[_Unit]
    work: Iterator[Any]
    used_s: float = 0.0
    open_choices: int = 0

    def __post_init__(self) -> None:
        self.open_choices = sum(u.cfg.n for u in self.units)

    def advance(self) -> bool:
        """Run one unit of work and deliver what it produced; False when the batch is done.

        When the last choice has ended, the work is run to its end at once (the generator goes
        back to the prefix cache), not on a later turn: the answer is complete now."""
        try:
            produced = next(self.work)
        except StopIteration:
            return False
        if len(self.units) == 1:  # engine.generate: a list of ChoiceStep, [] after a chunk
            produced = [(0, step) for step in produced]
        by_unit: dict[int, list[ChoiceStep]] = {}
        for number, step in produced:
            by_unit.setdefault(number, []).append(step)
            self.open_choices -= step.finish_reason is not None
        for number, steps in by_unit.items():
            unit = self.units[number]
            if not unit.job.ended:
                unit.job.deliver(Steps(unit.index, steps))
        if self.open_choices == 0:
            for _ in self.work:  # nothing is left to compute; this runs the cleanup
                pass
            return False
        return True


@dataclass
class EngineStats:
    """Counters the engine thread keeps (read them anywhere; only it writes them)."""

    batches: int = 0  # batches started
    batched_requests: int = 0  # requests that ran in a batch with others
    largest_batch_rows: int = 0
    work_units: int = 0  # prefill chunks and decode steps run
    prefix_hits: int = 0  # requests that reused a kept KV cache (multi-turn)
    prefix_reused_tokens: int = 0
    held_for_memory: int = 0  # requests that waited for memory for their KV cache


class _Shared:
    """The caller side's state: how many jobs are in (the queue limit), and the engine's stats.

    Neither the engine thread nor the engine process reference it, so the handle that owns it
    can be garbage collected."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.idle = threading.Condition()
        self.jobs = 0  # submitted and not yet ended
        self.closing = False
        self.stats = EngineStats()

    def admit(self) -> None:
        with self.idle:
            if self.closing:
                raise engine_stopped()
            if self.jobs >= self.limits.max_queue:
                raise ApiError(
                    429,
                    "too_many_requests",
                    f"{self.jobs} requests are already running or waiting for the model "
                    f"(the limit is {self.limits.max_queue}); retry shortly",
                )
            self.jobs += 1

    def releasing(self, deliver: Callable[[Event], None]) -> Callable[[Event], None]:
        """``deliver`` that also frees the job's queue slot with its last event."""

        def deliver_and_release(event: Event) -> None:
            deliver(event)
            if isinstance(event, (Finished, Failed)):
                with self.idle:
                    self.jobs -= 1
                    self.idle.notify_all()

        return deliver_and_release


class EngineCore:
    """The caller's handle on the engine that loads a model and answers jobs.

    ``process=False``: the engine is a thread of this process. ``process=True``: it is a thread
    of a child process (``phi3edge.engine_process``). onnxruntime-genai 0.18 keeps the GIL while
    it computes (seconds for a prefill chunk of full Phi-3-mini), which stalls every other Python
    thread of the process that runs it: an HTTP server's event loop, an app's UI thread. In its
    own process the engine stalls nothing but itself.

    Neither the engine thread nor the child references this handle: when the handle is closed or
    garbage collected, the engine stops and frees the model. ``model`` here is the loaded model's
    metadata only (manifest, token table, sizes); its onnxruntime-genai objects stay with the
    engine.
    """

    def __init__(
        self,
        model_dir: str | Path,
        options: EngineOptions | None = None,
        limits: Limits | None = None,
        process: bool = False,
    ) -> None:
        self.limits = limits or Limits()
        self._shared = _Shared(self.limits)
        options = options or EngineOptions()
        link: _ThreadLink | Any
        if process:
            from phi3edge.engine_process import ProcessLink

            link = ProcessLink(self._shared, model_dir, options)
        else:
            link = _ThreadLink(self._shared, model_dir, options)
        self._link = link
        self.model: runtime.LoadedModel = link.model
        self._finalizer = weakref.finalize(self, link.shut_down)

    @property
    def alive(self) -> bool:
        return bool(self._link.alive)

    @property
    def stats(self) -> EngineStats:
        return self._shared.stats

    @property
    def jobs(self) -> int:
        """Jobs submitted and not yet ended (running or waiting): the queue the limit bounds."""
        return self._shared.jobs

    def submit(
        self,
        requests: list[ChatRequest],
        batch: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Ticket:
        """Queue ``requests`` as one job; read its events from the returned ticket.

        ``loop``: the event loop that will read the events (``Ticket.aevents``), or None for a
        blocking reader. Raises 429 when ``max_queue`` jobs are already in, 503 when the engine
        has stopped.
        """
        if not self.alive:
            raise engine_stopped()
        ticket = Ticket(loop)
        deliver = self._shared.releasing(ticket._deliver)
        job = _Job(requests, batch, deliver, self.limits.time_budget_s)
        ticket._cancel = functools.partial(self._link.cancel, job)
        self._shared.admit()
        self._link.send(job)
        return ticket

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is running or waiting; False on timeout (tests, shutdown)."""
        with self._shared.idle:
            return self._shared.idle.wait_for(lambda: self._shared.jobs == 0, timeout)

    def close(self) -> None:
        """Cancel every job, stop the engine and free the model (also at exit or when this
        handle is garbage collected)."""
        with self._shared.idle:
            self._shared.closing = True
        self._finalizer()


def metadata(model: runtime.LoadedModel) -> runtime.LoadedModel:
    """``model`` without its onnxruntime-genai objects: what callers of the engine may read."""
    return dataclasses.replace(model, model=None, tokenizer=None, adapters=None, kv_ledger=None)


class _ThreadLink:
    """An engine thread in this process."""

    def __init__(self, shared: _Shared, model_dir: str | Path, options: EngineOptions) -> None:
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        loaded: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=run_engine,
            args=(model_dir, options, shared.limits, self._inbox),
            kwargs={"stats": shared.stats, "on_loaded": loaded.put},
            name="phi3edge-engine",
            daemon=True,
        )
        self._thread.start()
        result = loaded.get()
        if isinstance(result, BaseException):
            raise result
        self.model = metadata(result)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def send(self, job: _Job) -> None:
        self._inbox.put(job)

    def cancel(self, job: _Job) -> None:
        job.cancelled.set()

    def shut_down(self) -> None:
        self._inbox.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(30)


def _raising(exc: Exception) -> Iterator[Any]:
    """Work that fails at its first unit (where ``_EngineLoop.run`` ends a batch's requests)."""
    raise exc
    yield


def run_engine(
    model_dir: str | Path,
    options: EngineOptions,
    limits: Limits,
    inbox: Any,
    stats: EngineStats,
    on_loaded: Callable[[Any], None],
    on_stats: Callable[[EngineStats], None] | None = None,
) -> None:
    """The engine: load the model (``on_loaded`` gets it or the error), then answer the jobs
    that ``inbox.get(block, timeout)`` hands over until it hands over None."""
    try:
        holders = limits.max_active_batches + options.kv_cache_entries
        model = runtime.load(model_dir, options.threads, kv_holders=holders)
        cache = engine.PrefixCache(options.kv_cache_entries)
        cache.warm(model)  # the KV cache comes with the model, as llama.cpp allocates its own
    except BaseException as exc:
        on_loaded(exc)
        return
    on_loaded(model)
    _EngineLoop(inbox, limits, model, cache, stats, on_stats, options.speculative).run()


class _EngineLoop:
    """The engine thread's state and loop: waiting requests, active batches, the prefix cache."""

    def __init__(
        self,
        inbox: Any,
        limits: Limits,
        model: runtime.LoadedModel,
        prefix_cache: engine.PrefixCache,
        stats: EngineStats,
        on_stats: Callable[[EngineStats], None] | None,
        speculative: bool,
    ) -> None:
        self.inbox = inbox
        self.speculative = speculative
        self.limits = limits
        self.model = model
        self.prefix_cache = prefix_cache
        self.stats = stats
        self.on_stats = on_stats
        self.running = True  # False once ``close`` has been asked for

    def run(self) -> None:
        waiting: deque[_Unit] = deque()
        batches: list[_Batch] = []
        while self.running or waiting or batches:
            try:
                self._turn(waiting, batches)
            except Exception:  # a bug outside a unit of work: the engine must not stop with it
                log.exception("engine error; ending every request it held")
                for unit in [*waiting, *(u for b in batches for u in b.units)]:
                    self._end(unit.job, Failed(internal_error()))
                waiting.clear()
                batches.clear()
        self.prefix_cache.clear()
        while True:  # jobs that arrived while closing
            try:
                job = self.inbox.get(block=False)
            except queue.Empty:
                return
            if job is not None:
                self._end(job, Failed(engine_stopped()))

    def _turn(self, waiting: deque[_Unit], batches: list[_Batch]) -> None:
        """Take arrivals, start the batches that may start, run one unit of work."""
        if batches:
            wait: float | None = 0.0
        elif waiting:  # let requests sent at the same moment arrive and batch together
            wait = max(0.0, waiting[0].job.arrived + BATCH_WINDOW_S - time.monotonic())
        else:
            wait = None
        self.running = self.running and self._take_arrivals(waiting, wait)
        if not self.running:  # closing: whatever is left ends at its next unit of work
            for unit in [*waiting, *(u for b in batches for u in b.units)]:
                unit.job.cancelled.set()
        self._drop_halted(waiting)
        while (
            waiting
            and len(batches) < self.limits.max_active_batches
            and (not self.running or waiting[0].job.arrived + BATCH_WINDOW_S <= time.monotonic())
        ):
            batch = self._start_batch(waiting, batches)
            if batch is None:  # its KV cache waits for a running batch to end
                break
            batches.insert(0, batch)  # ties: newest first
        if not batches:
            return
        batch = min(batches, key=lambda b: b.used_s)
        started = time.perf_counter()
        try:
            more = batch.advance()
        except Exception:
            log.exception("engine error; ending the requests of this batch")
            more = False
            for unit in batch.units:
                self._end(unit.job, Failed(internal_error()))
        batch.used_s += time.perf_counter() - started
        self.stats.work_units += 1
        if not more:
            batches.remove(batch)
            self._close_batch(batch)

    def _take_arrivals(self, waiting: deque[_Unit], wait: float | None) -> bool:
        """Prepare every job in the inbox, waiting up to ``wait`` seconds (None: until one
        comes) for the first; False after ``close``."""
        while True:
            try:
                job = self.inbox.get(block=wait != 0, timeout=wait)
            except queue.Empty:
                return True
            if job is None:
                return False
            wait = 0
            try:
                waiting.extend(self._prepare(job))
            except ApiError as exc:
                self._end(job, Failed(exc))
            except Exception:
                log.exception("error while preparing a request")
                self._end(job, Failed(internal_error()))

    def _prepare(self, job: _Job) -> list[_Unit]:
        """Tokenize and check every request of ``job``; the first error fails the whole job."""
        units = []
        for index, request in enumerate(job.requests):
            try:
                cfg = request.sampling()
                engine.sampler_params(cfg, self.model.vocab_size)  # logit_bias ids in range
                if cfg.grammar is not None:  # this vocabulary can produce it
                    cfg.grammar.checked(self.model.grammar_tokenizer.get())
                prompt = build_prompt(
                    self.model,
                    request.messages,
                    cfg.max_tokens,
                    default_max_tokens=self.limits.default_max_tokens(request.n),
                    max_prompt_tokens=self.limits.max_prompt_tokens,
                )
                self.limits.check(request)
            except ApiError as exc:
                raise in_batch(exc, index) if job.batch else exc from None
            adapter = self.model.adapter_named(request.model)
            units.append(_Unit(job, index, cfg, prompt, adapter))
        if not units:
            self._end(job, Finished())
        return units

    def _drop_halted(self, waiting: deque[_Unit]) -> None:
        """Waiting requests whose caller left go; a job out of time before it began fails."""
        for unit in list(waiting):
            reason = unit.job.halt()
            if reason is None or (reason == "length" and unit.job.started):
                continue  # a started job's late requests run and end at once with "length"
            waiting.remove(unit)
            if reason == "cancelled":
                self._end_unit(unit)
            else:
                self._end(
                    unit.job,
                    Failed(
                        ApiError(
                            503,
                            "timeout",
                            f"the request waited its whole time budget "
                            f"({self.limits.time_budget_s} s) for the model; retry later",
                        )
                    ),
                )

    def _start_batch(self, waiting: deque[_Unit], batches: list[_Batch]) -> _Batch | None:
        """The oldest waiting unit plus the others that fit in one batch with it, the most alike
        first (``engine.padding_cost``), so a batch wastes little on padding and filler steps.
        None when the oldest one's KV cache does not fit beside the running batches' (it waits
        for one of them to end; requests behind it wait too, so it is not passed over)."""
        anchor = waiting[0].item()
        if batches and not self._kv_fits([anchor]):
            self._held_for_memory(waiting[0])
            return None
        chosen = [waiting.popleft()]
        cap, padding = self.limits.batch_prefill_tokens, self.limits.batch_padding_pct
        for unit in sorted(waiting, key=lambda u: engine.padding_cost(anchor, u.item())):
            items = [u.item() for u in [*chosen, unit]]
            fits = engine.fits_in_batch(self.model, items, cap, padding)
            if fits and self._kv_fits(items, drop_kept=False):
                chosen.append(unit)
                waiting.remove(unit)
        stats = self.stats
        stats.batches += 1
        stats.batched_requests += len(chosen) if len(chosen) > 1 else 0
        stats.largest_batch_rows = max(stats.largest_batch_rows, sum(u.cfg.n for u in chosen))
        self._publish()
        for unit in chosen:
            unit.job.started = True
            if not unit.job.ended:
                unit.job.deliver(Started(unit.index, len(unit.prompt.ids)))
        try:
            work = self._work(chosen)
        except Exception as exc:  # ends these requests at their first unit of work (500)
            work = _raising(exc)
        # A new batch starts level with the least-served one, so it goes next but cannot
        # claim the time the others have already used.
        used = min((b.used_s for b in batches), default=0.0)
        log.debug(
            "batch of %d request(s), %d rows, prompts %s, adapter %s; %d waiting, %d other batches",
            len(chosen),
            sum(u.cfg.n for u in chosen),
            [len(u.prompt.ids) for u in chosen],
            chosen[0].adapter,
            len(waiting),
            len(batches),
        )
        return _Batch(chosen, work, used)

    def _work(self, chosen: list[_Unit]) -> Iterator[Any]:
        """The batch's units of work; its generator is claimed now (``engine.generate``)."""
        if len(chosen) > 1:
            return engine.generate_batch(self.model, [u.item() for u in chosen])
        unit = chosen[0]
        return engine.generate(
            self.model,
            unit.prompt,
            unit.cfg,
            unit.job.halt,
            self.prefix_cache,
            speculative=self.speculative,
            adapter=unit.adapter,
        )

    def _kv_fits(self, items: list[engine.BatchItem], drop_kept: bool = True) -> bool:
        """Whether the KV cache that starting ``items`` adds fits beside the live generators'
        (``runtime.KvLedger``) in the memory free at load. ``drop_kept``: kept conversations the
        start cannot use are dropped if that makes room (not to add a request to a batch: the
        batch's first request then runs alone, and may reuse one).

        A lone request, or a batch, never takes more than that memory by itself
        (``prompt.fit_context``, ``engine.fits_in_batch``), so a request that waits starts at
        the latest when the batches before it have ended."""
        budget, ledger = self.model.memory_free_at_load, self.model.kv_ledger
        if budget is None or ledger is None:
            return True
        cache = self.prefix_cache
        if ledger.in_use + engine.kv_bytes_to_start(self.model, items, cache) <= budget:
            return True
        if not drop_kept:
            return False
        lone = items[0] if len(items) == 1 else None
        if lone is None:
            cache.drop()
        else:
            cache.drop(lone.prompt.kv_tokens, lone.adapter)
        return ledger.in_use + engine.kv_bytes_to_start(self.model, items, cache) <= budget

    def _held_for_memory(self, unit: _Unit) -> None:
        if unit.held_for_memory:
            return
        unit.held_for_memory = True
        self.stats.held_for_memory += 1
        self._publish()
        log.info(
            "request %d of job %d waits for memory: its KV cache (%d MB) does not fit beside "
            "the running requests' (%d MB) in the %d MB free at load",
            unit.index,
            unit.job.id,
            engine.kv_bytes_to_start(self.model, [unit.item()], self.prefix_cache) >> 20,
            self.model.kv_ledger.in_use >> 20 if self.model.kv_ledger else 0,
            (self.model.memory_free_at_load or 0) >> 20,
        )

    def _close_batch(self, batch: _Batch) -> None:
        close = getattr(batch.work, "close", None)
        if close is not None:
            close()  # frees the generator now, not when the garbage collector gets to it
        self.stats.prefix_hits = self.prefix_cache.hits
        self.stats.prefix_reused_tokens = self.prefix_cache.reused_tokens
        self._publish()
        for unit in batch.units:
            self._end_unit(unit)

    def _publish(self) -> None:
        if self.on_stats is not None:
            self.on_stats(dataclasses.replace(self.stats))

    def _end_unit(self, unit: _Unit) -> None:
        """One request of its job is done; the last one ends the job (499 if it was cancelled)."""
        job = unit.job
        job.open_requests -= 1
        if job.open_requests == 0:
            self._end(job, Failed(client_closed()) if job.cancelled.is_set() else Finished())

    def _end(self, job: _Job, event: Finished | Failed) -> None:
        """Deliver the job's last event (once)."""
        if job.ended:
            return
        job.ended = True
        log.debug("job %d ends: %s", job.id, type(event).__name__)
        job.deliver(event)
