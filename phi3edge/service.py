"""One loaded model answering validated chat requests, as whole responses or as chunk streams.

Input: a ``ChatRequest`` (already validated by ``schema.parse_request``).
Output: ``ChatCompletions`` or an iterator of ``StreamingChatCompletionsUpdate``.
Errors: ``ApiError`` (404 for a model name that is not this model, 400 for context overflow, ...).

Both the in-process client and the HTTP shim go through here, so their answers are identical.
The model itself belongs to the engine thread (``core.EngineCore``): this module submits jobs and
turns their events into responses, blocking (``complete``, ``stream``) or on an event loop
(``acomplete``, ``astream``). Leaving a stream, or cancelling the awaiting task, cancels the job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phi3edge.catalog import get as catalog_member
from phi3edge.core import EngineCore, EngineOptions, Event, Failed, Started, Steps, Ticket
from phi3edge.detokenize import TokenTable
from phi3edge.engine import TokenLogprob
from phi3edge.errors import ApiError, in_batch
from phi3edge.limits import Limits
from phi3edge.schema import (
    ChatChoice,
    ChatCompletions,
    ChatRequest,
    ChatResponseMessage,
    ChoiceLogprobs,
    CompletionsUsage,
    ModelInfo,
    StreamingChatChoiceUpdate,
    StreamingChatCompletionsUpdate,
    StreamingChatResponseMessageUpdate,
    TopLogprob,
)
from phi3edge.schema import TokenLogprob as WireTokenLogprob


class ChatService:
    """A loaded model (owned by its engine thread) plus the request/response plumbing."""

    def __init__(
        self,
        model_dir: str | Path,
        threads: int | None = None,
        kv_cache_entries: int = 1,
        limits: Limits | None = None,
        engine_process: bool = False,
        speculative: bool = True,
    ) -> None:
        """``engine_process``: run the model in a child process (see ``core.EngineCore``);
        the rest: ``core.EngineOptions``."""
        options = EngineOptions(threads, kv_cache_entries, speculative)
        self.core = EngineCore(model_dir, options, limits, engine_process)
        self.model = self.core.model  # read-only metadata here; only the engine thread runs it
        member = catalog_member(self.model.manifest.catalog_id)
        self.model_name = member.hf_id.split("/")[1]
        self._aliases = {a.lower() for a in (self.model_name, member.id, member.hf_id, "phi3edge")}

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA fine-tunes of the model, served by name."""
        return self.model.adapter_names

    def served_name(self, request: ChatRequest) -> str:
        """The ``model`` a response names: the adapter the request chose, else the base."""
        return self.model.adapter_named(request.model) or self.model_name

    @property
    def limits(self) -> Limits:
        return self.core.limits

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running or waiting; False on timeout (tests, shutdown)."""
        return self.core.wait_idle(timeout)

    def close(self) -> None:
        """Cancel what is running and free the model."""
        self.core.close()

    def model_info(self) -> ModelInfo:
        return ModelInfo(model_name=self.model_name)

    # ------------------------------------------------------------------ whole responses

    def complete(self, request: ChatRequest) -> ChatCompletions:
        return self._collect(self._submit([request]), [request])[0]

    async def acomplete(self, request: ChatRequest) -> ChatCompletions:
        """``complete`` for an event loop: waits without blocking it; cancelling the awaiting
        task cancels the generation."""
        ticket = self._submit([request], loop=asyncio.get_running_loop())
        answer = _Answer([request])
        try:
            async for event in ticket.aevents():
                answer.add(event)
        finally:
            ticket.cancel()
        return self._completions(request, answer, 0)

    def complete_batch(self, requests: list[ChatRequest]) -> list[ChatCompletions]:
        """Answer many requests; the engine runs those that fit together as one batch.

        Everything is validated (model name, context budget, logit_bias ids, limits) before any
        runs; an ``ApiError`` names the request by index in ``param``.
        """
        for index, request in enumerate(requests):
            try:
                self._check_model(request)
            except ApiError as exc:
                raise in_batch(exc, index) from None
        return self._collect(self.core.submit(list(requests), batch=True), requests)

    def submit(self, request: ChatRequest) -> PendingCompletion:
        """Queue ``request`` and return at once; ``result()`` waits for its answer.

        For callers that keep many requests in flight (batch jobs) so that the engine can batch
        them, and that must be able to abandon them (``cancel``). Raises 429 when the engine's
        queue is full, 404 for another model's name.
        """
        return PendingCompletion(self, request, self._submit([request]))

    def _collect(self, ticket: Ticket, requests: list[ChatRequest]) -> list[ChatCompletions]:
        answer = _Answer(requests)
        try:
            for event in ticket.events():
                answer.add(event)
        finally:
            ticket.cancel()
        return [self._completions(r, answer, i) for i, r in enumerate(requests)]

    def _completions(self, request: ChatRequest, answer: _Answer, index: int) -> ChatCompletions:
        part = answer.parts[index]
        choices = [
            ChatChoice(
                index=i,
                finish_reason=part.finish[i],
                message=ChatResponseMessage(content="".join(part.texts[i])),
                logprobs=_logprobs(self.model.table, part.tokens[i]) if request.logprobs else None,
            )
            for i in range(request.n)
        ]
        return ChatCompletions(
            id=_new_id(),
            created=_now(),
            model=self.served_name(request),
            choices=choices,
            usage=_usage(part.prompt_tokens, part.completion_tokens),
        )

    # ------------------------------------------------------------------ streams

    def stream(
        self, request: ChatRequest, usage_chunk: bool = False
    ) -> Iterator[StreamingChatCompletionsUpdate]:
        """Chunks: role first, then content deltas, then each choice's finish_reason.

        The last chunk with a finish_reason carries ``usage`` (what the Azure endpoint sends);
        with ``usage_chunk`` (OpenAI's ``stream_options.include_usage``) usage comes in an extra
        chunk with no choices instead. Errors before the first chunk raise ``ApiError``; closing
        the iterator (or dropping it) cancels the generation.
        """
        ticket = self._submit([request])
        chunks = _ChunkWriter(request, self, usage_chunk)
        try:
            for event in ticket.events():
                yield from chunks.add(event)
        finally:
            ticket.cancel()

    async def astream(
        self, request: ChatRequest, usage_chunk: bool = False
    ) -> AsyncIterator[StreamingChatCompletionsUpdate]:
        """``stream`` for an event loop."""
        ticket = self._submit([request], loop=asyncio.get_running_loop())
        chunks = _ChunkWriter(request, self, usage_chunk)
        try:
            async for event in ticket.aevents():
                for chunk in chunks.add(event):
                    yield chunk
        finally:
            ticket.cancel()

    # ------------------------------------------------------------------ shared

    def _submit(
        self, requests: list[ChatRequest], loop: asyncio.AbstractEventLoop | None = None
    ) -> Ticket:
        for request in requests:
            self._check_model(request)
        return self.core.submit(requests, loop=loop)

    def _check_model(self, request: ChatRequest) -> None:
        """The base model answers its own names; a LoRA adapter's name selects it."""
        if not request.model or request.model.lower() in self._aliases:
            return
        if self.model.adapter_named(request.model):
            return
        adapters = (
            f" and its adapters {', '.join(self.adapter_names)}" if self.adapter_names else ""
        )
        raise ApiError(
            404,
            "model_not_found",
            f"model '{request.model}' is not served here; this server runs "
            f"{self.model_name}{adapters}",
            "model",
        )


@dataclass
class PendingCompletion:
    """A submitted request (``ChatService.submit``): wait for its answer, or abandon it."""

    service: ChatService
    request: ChatRequest
    ticket: Ticket

    def result(self) -> ChatCompletions:
        """Block until the answer is complete; raises the request's ``ApiError`` (499 once it
        was cancelled)."""
        return self.service._collect(self.ticket, [self.request])[0]

    def cancel(self) -> None:
        """Stop the request at the engine's next unit of work (safe from any thread)."""
        self.ticket.cancel()


class _ChunkWriter:
    """Engine events of one streamed request -> chat.completion.chunk objects."""

    def __init__(self, request: ChatRequest, service: ChatService, usage_chunk: bool) -> None:
        self.request = request
        self.service = service
        self.usage_chunk = usage_chunk
        self.id, self.created = _new_id(), _now()
        self.prompt_tokens = self.completion_tokens = 0
        self.open_choices = request.n

    def add(self, event: Event) -> list[StreamingChatCompletionsUpdate]:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Started):
            self.prompt_tokens = event.prompt_tokens
            role = StreamingChatResponseMessageUpdate(role="assistant", content="")
            return [
                self._chunk(
                    [StreamingChatChoiceUpdate(index=i, delta=role) for i in range(self.request.n)]
                )
            ]
        if not isinstance(event, Steps):
            return []
        logprobs = self.request.logprobs
        updates = [
            StreamingChatChoiceUpdate(
                index=s.index,
                delta=StreamingChatResponseMessageUpdate(content=s.text or None),
                finish_reason=s.finish_reason,
                logprobs=_logprobs(self.service.model.table, s.tokens) if logprobs else None,
            )
            for s in event.steps
            if s.text or s.finish_reason or (logprobs and s.tokens)
        ]
        self.completion_tokens += sum(1 for s in event.steps if s.sampled)
        self.open_choices -= sum(1 for s in event.steps if s.finish_reason)
        done = self.open_choices == 0
        usage = _usage(self.prompt_tokens, self.completion_tokens) if done else None
        out = []
        if updates:
            out.append(self._chunk(updates, None if self.usage_chunk else usage))
        if done and self.usage_chunk:
            out.append(self._chunk([], usage))
        return out

    def _chunk(
        self, choices: list[StreamingChatChoiceUpdate], usage: CompletionsUsage | None = None
    ) -> StreamingChatCompletionsUpdate:
        return StreamingChatCompletionsUpdate(
            id=self.id,
            created=self.created,
            model=self.service.served_name(self.request),
            choices=choices,
            usage=usage,
        )


@dataclass
class _Part:
    """What the steps of one request add up to."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    texts: dict[int, list[str]] = field(default_factory=dict)
    tokens: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)


class _Answer:
    """Engine events of a job -> one ``_Part`` per request; raises the job's error."""

    def __init__(self, requests: list[ChatRequest]) -> None:
        self.parts = [_Part() for _ in requests]

    def add(self, event: Event) -> None:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Started):
            self.parts[event.request].prompt_tokens = event.prompt_tokens
        elif isinstance(event, Steps):
            part = self.parts[event.request]
            for step in event.steps:
                part.completion_tokens += step.sampled
                part.texts.setdefault(step.index, []).append(step.text)
                part.tokens.setdefault(step.index, []).extend(step.tokens)
                if step.finish_reason:
                    part.finish[step.index] = step.finish_reason


def _logprobs(table: TokenTable, tokens: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            WireTokenLogprob(
                token=table.token_text(t.token_id),
                logprob=t.logprob,
                bytes=list(table.token_bytes(t.token_id)),
                top_logprobs=[
                    TopLogprob(
                        token=table.token_text(i), logprob=lp, bytes=list(table.token_bytes(i))
                    )
                    for i, lp in t.top
                ],
            )
            for t in tokens
        ]
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> CompletionsUsage:
    return CompletionsUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
