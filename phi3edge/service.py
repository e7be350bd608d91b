"""One loaded model answering validated chat requests, as whole responses or as chunk streams.

Input: a ``ChatRequest`` (already validated by ``schema.parse_request``).
Output: ``ChatCompletions`` or an iterator of ``StreamingChatCompletionsUpdate``.
Errors: ``ApiError`` (404 for a model name that is not this model, 400 for context overflow, ...).

Both the in-process client and the HTTP shim go through here, so their answers are identical.
Requests are served one at a time per model (a lock); the HTTP layer bounds how many wait.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phi3edge import engine, runtime
from phi3edge.catalog import get as catalog_member
from phi3edge.engine import ChoiceStep, TokenLogprob
from phi3edge.errors import ApiError, in_batch
from phi3edge.prompt import build_prompt
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
    """A loaded model plus the request/response plumbing around the engine."""

    def __init__(
        self, model_dir: str | Path, threads: int | None = None, kv_cache_entries: int = 1
    ) -> None:
        self.model = runtime.load(model_dir, threads)
        self.prefix_cache = engine.PrefixCache(kv_cache_entries)
        member = catalog_member(self.model.manifest.catalog_id)
        self.model_name = member.hf_id.split("/")[1]
        self._aliases = {a.lower() for a in (self.model_name, member.id, member.hf_id, "phi3edge")}
        # Reentrant: a thread that keeps a half-read stream open can still make another request
        # (other threads queue until the stream ends or is closed).
        self._lock = threading.RLock()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request holds the model; False on timeout (tests, shutdown)."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def model_info(self) -> ModelInfo:
        return ModelInfo(model_name=self.model_name)

    # ------------------------------------------------------------------ whole responses

    def complete(
        self, request: ChatRequest, cancelled: Callable[[], bool] | None = None
    ) -> ChatCompletions:
        answer = _Answer(request.n)
        for steps, prompt_tokens, completion_tokens in self._run(request, cancelled):
            answer.add(steps)
            answer.prompt_tokens, answer.completion_tokens = prompt_tokens, completion_tokens
        if not answer.done():  # only when cancelled: nobody is waiting for an answer
            raise ApiError(499, "client_closed_request", "the client closed the request")
        return self._completions(request, answer)

    def complete_batch(self, requests: list[ChatRequest]) -> list[ChatCompletions]:
        """Answer many requests as one onnxruntime-genai batch (see ``engine.generate_batch``).

        Everything is validated (model name, context budget, logit_bias ids) before any runs;
        an ``ApiError`` names the request by index in ``param``.
        """
        items = []
        for index, request in enumerate(requests):
            try:
                self._check_model(request)
                cfg = request.sampling()
                engine.sampler_params(cfg, self.model.vocab_size)
                prompt = build_prompt(self.model, request.messages, cfg.max_tokens)
            except ApiError as exc:
                raise in_batch(exc, index) from None
            items.append(engine.BatchItem(prompt, cfg))
        answers = [
            _Answer(r.n, prompt_tokens=len(i.prompt.ids))
            for r, i in zip(requests, items, strict=True)
        ]
        with self._lock:
            for steps in engine.generate_batch(self.model, items):
                for request_index, step in steps:
                    answers[request_index].add([step])
                    answers[request_index].completion_tokens += 1
        return [self._completions(r, a) for r, a in zip(requests, answers, strict=True)]

    def _completions(self, request: ChatRequest, answer: _Answer) -> ChatCompletions:
        choices = [
            ChatChoice(
                index=i,
                finish_reason=answer.finish[i],
                message=ChatResponseMessage(content="".join(answer.texts[i])),
                logprobs=self._logprobs(answer.tokens[i]) if request.logprobs else None,
            )
            for i in range(request.n)
        ]
        return ChatCompletions(
            id=_new_id(),
            created=_now(),
            model=self.model_name,
            choices=choices,
            usage=_usage(answer.prompt_tokens, answer.completion_tokens),
        )

    # ------------------------------------------------------------------ streams

    def stream(
        self,
        request: ChatRequest,
        cancelled: Callable[[], bool] | None = None,
        usage_chunk: bool = False,
    ) -> Iterator[StreamingChatCompletionsUpdate]:
        """Chunks: role first, then content deltas, then each choice's finish_reason.

        The last chunk with a finish_reason carries ``usage`` (what the Azure endpoint sends);
        with ``usage_chunk`` (OpenAI's ``stream_options.include_usage``) usage comes in an extra
        chunk with no choices instead.
        """
        chunk_id, created = _new_id(), _now()

        def chunk(
            choices: list[StreamingChatChoiceUpdate], usage: CompletionsUsage | None = None
        ) -> StreamingChatCompletionsUpdate:
            return StreamingChatCompletionsUpdate(
                id=chunk_id, created=created, model=self.model_name, choices=choices, usage=usage
            )

        runs = self._run(request, cancelled)
        first = next(runs, None)  # validation and prefill happen before the first chunk
        if first is None:
            return  # cancelled before it started
        yield chunk(
            [
                StreamingChatChoiceUpdate(
                    index=i, delta=StreamingChatResponseMessageUpdate(role="assistant", content="")
                )
                for i in range(request.n)
            ]
        )
        open_choices = request.n
        for steps, prompt_tokens, completion_tokens in itertools.chain([first], runs):
            updates = [
                StreamingChatChoiceUpdate(
                    index=s.index,
                    delta=StreamingChatResponseMessageUpdate(content=s.text or None),
                    finish_reason=s.finish_reason,
                    logprobs=self._logprobs(s.tokens) if request.logprobs else None,
                )
                for s in steps
                if s.text or s.finish_reason or (request.logprobs and s.tokens)
            ]
            open_choices -= sum(1 for s in steps if s.finish_reason)
            done = open_choices == 0
            usage = _usage(prompt_tokens, completion_tokens) if done else None
            if updates:
                yield chunk(updates, None if usage_chunk else usage)
            if done and usage_chunk:
                yield chunk([], usage)

    # ------------------------------------------------------------------ shared

    def _run(
        self, request: ChatRequest, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[tuple[list[ChoiceStep], int, int]]:
        """Validate against this model, then yield (steps, prompt_tokens, completion_tokens)."""
        self._check_model(request)
        cfg = request.sampling()
        with self._lock:
            if cancelled and cancelled():
                return  # the client left while waiting for the model
            prompt = build_prompt(self.model, request.messages, cfg.max_tokens)
            completion_tokens = 0
            for steps in engine.generate(self.model, prompt, cfg, cancelled, self.prefix_cache):
                completion_tokens += len(steps)
                yield steps, len(prompt.ids), completion_tokens

    def _check_model(self, request: ChatRequest) -> None:
        if request.model and request.model.lower() not in self._aliases:
            raise ApiError(
                404,
                "model_not_found",
                f"model '{request.model}' is not served here; this server runs {self.model_name}",
                "model",
            )

    def _logprobs(self, tokens: list[TokenLogprob]) -> ChoiceLogprobs:
        table = self.model.table
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


@dataclass
class _Answer:
    """What the steps of one request add up to."""

    n: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    texts: dict[int, list[str]] = field(default_factory=dict)
    tokens: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)

    def add(self, steps: list[ChoiceStep]) -> None:
        for step in steps:
            self.texts.setdefault(step.index, []).append(step.text)
            self.tokens.setdefault(step.index, []).extend(step.tokens)
            if step.finish_reason:
                self.finish[step.index] = step.finish_reason

    def done(self) -> bool:
        return len(self.finish) == self.n


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
