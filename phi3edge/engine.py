"""The decode loop: prompt ids in, per-step text deltas out, for all choices of a request at once.

Input: a ``LoadedModel``, a ``Prompt`` and the request's ``SamplingConfig``.
Output: an iterator of steps; each step lists, per choice still running, the text it may emit now,
the tokens it accepted (with logprobs) and, when it ends, its finish reason.
Errors: ``ApiError`` 400 for a logit_bias id outside the vocabulary; anything else is our bug.

onnxruntime-genai runs the model; every token is chosen by our C++ sampler (``phi3edge._sampling``).
With batch > 1 onnxruntime-genai refuses a second ``append_tokens``, so each step writes a logits
tensor that keeps only the chosen tokens (``force_logits``) and lets its greedy search take them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi3edge import _sampling
from phi3edge.detokenize import IncrementalDecoder, StopFilter
from phi3edge.errors import bad_request
from phi3edge.prompt import Prompt
from phi3edge.runtime import LoadedModel
from phi3edge.schema import SamplingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass
class ChoiceStep:
    """What one choice produced in one decode step."""

    index: int
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Choice:
    index: int
    decoder: IncrementalDecoder
    stop: StopFilter
    generated: int = 0
    finish_reason: str | None = None


def sampler_params(cfg: SamplingConfig, vocab_size: int) -> _sampling.SamplingParams:
    for token in cfg.logit_bias:
        if token >= vocab_size:
            raise bad_request(
                f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
    return _sampling.SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        presence_penalty=cfg.presence_penalty,
        frequency_penalty=cfg.frequency_penalty,
        logit_bias=cfg.logit_bias,
        top_logprobs=cfg.top_logprobs,
    )


CACHE_HEADROOM = 1024  # tokens of KV allocated beyond a cached request's own need


class PrefixCache:
    """Keeps the KV cache of the most recent single-choice conversations for reuse.

    A chat resends its whole history every turn. When a new prompt extends what a kept generator
    already holds, we rewind that generator to the shared prefix (``Generator.rewind_to``) and
    prefill only the new suffix, as llama.cpp's server does. Logits are bit-identical to a cold
    prefill (checked by the tests). Not thread-safe: the service serialises requests.
    """

    def __init__(self, entries: int = 1) -> None:
        self.entries = entries
        self._kept: list[tuple[Any, list[int], int]] = []  # (generator, tokens in KV, max_length)
        self.hits = 0
        self.reused_tokens = 0

    def take(
        self, model: LoadedModel, ids: list[int], need: int, allocate: int
    ) -> tuple[Any, int, int]:
        """A generator holding a prefix of ``ids``, how long that prefix is, and the generator's
        capacity; or a fresh generator of ``allocate`` tokens. ``need``: tokens the request uses."""
        best, best_len = None, 0
        for entry in self._kept:
            generator, tokens, capacity = entry
            if capacity < need:
                continue
            common = _common_prefix(tokens, ids)
            if common > best_len:
                best, best_len = entry, common
        if best is None:
            return _new_generator(model, allocate, 1), 0, allocate
        self._kept.remove(best)
        keep = min(best_len, len(ids) - 1)  # at least one token must run to give logits
        best[0].rewind_to(keep)
        self.hits += 1
        self.reused_tokens += keep
        return best[0], keep, best[2]

    def put(self, generator: Any, max_length: int) -> None:
        tokens = [int(t) for t in generator.get_sequence(0)]
        self._kept.insert(0, (generator, tokens, max_length))
        del self._kept[self.entries :]

    def clear(self) -> None:
        self._kept.clear()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _new_generator(model: LoadedModel, max_length: int, batch: int) -> Any:
    import onnxruntime_genai as og

    search = og.GeneratorParams(model.model)
    search.set_search_options(max_length=max_length, batch_size=batch)
    return og.Generator(model.model, search)


def generate(
    model: LoadedModel,
    prompt: Prompt,
    cfg: SamplingConfig,
    cancelled: Callable[[], bool] | None = None,
    cache: PrefixCache | None = None,
) -> Iterator[list[ChoiceStep]]:
    """Run prefill and decode; yield one list of ``ChoiceStep`` per decode step."""
    n = cfg.n
    vocab = model.vocab_size
    params = sampler_params(cfg, vocab)
    sample_params = [params] * n
    states = [_sampling.RowState(vocab, cfg.seed, i) for i in range(n)]
    choices = [_Choice(i, IncrementalDecoder(model.table), StopFilter(cfg.stop)) for i in range(n)]
    filler = np.int32(min(model.eos_ids))

    max_length = len(prompt.ids) + prompt.max_new_tokens
    cached = cache is not None and cache.entries > 0 and n == 1
    if cached:
        # allocate room for the next turns too, so the next request can reuse this KV
        allocate = min(model.context_length, max_length + CACHE_HEADROOM)
        generator, start, max_length = cache.take(model, prompt.ids, max_length, allocate)
    else:
        generator, start = _new_generator(model, max_length, n), 0
    finished = False
    try:
        generator.append_tokens(np.tile(np.asarray(prompt.ids[start:], dtype=np.int32), (n, 1)))
        while True:
            logits = generator.get_logits()
            step = _sampling.sample(logits, sample_params, states)
            yield [
                _advance(model, choice, step, row, prompt.max_new_tokens, cfg.logprobs)
                for row, choice in enumerate(choices)
                if choice.finish_reason is None
            ]
            if all(c.finish_reason for c in choices) or (cancelled and cancelled()):
                finished = True
                return
            chosen = np.where([c.finish_reason is None for c in choices], step.tokens, filler)
            generator.set_logits(_sampling.force_logits(chosen.astype(np.int32), vocab))
            generator.generate_next_token()
    finally:
        if cached and finished:
            cache.put(generator, max_length)
        del generator


def _advance(
    model: LoadedModel,
    choice: _Choice,
    step: _sampling.StepOutput,
    row: int,
    max_new_tokens: int,
    want_logprobs: bool,
) -> ChoiceStep:
    token = int(step.tokens[row])
    choice.generated += 1
    out = ChoiceStep(choice.index)
    if token in model.eos_ids:
        choice.finish_reason = "stop"
    else:
        if want_logprobs:
            k = int(np.count_nonzero(step.top_ids[row] >= 0))
            top = tuple(
                (int(step.top_ids[row, j]), float(step.top_logprobs[row, j])) for j in range(k)
            )
            out.tokens.append(TokenLogprob(token, float(step.logprobs[row]), top))
        out.text = choice.stop.push(choice.decoder.push(token))
        if choice.stop.stopped:
            choice.finish_reason = "stop"
        elif choice.generated >= max_new_tokens:
            choice.finish_reason = "length"
    if choice.finish_reason and not choice.stop.stopped:
        out.text += choice.stop.push(choice.decoder.flush()) + choice.stop.flush()
    out.finish_reason = choice.finish_reason
    return out
