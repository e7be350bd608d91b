"""The decode loop: prompt ids in, per-step text deltas out.

Input: a ``LoadedModel`` and one request (``generate``: a ``Prompt`` and its ``SamplingConfig``)
or many (``generate_batch``). Output: an iterator of steps; each lists, per choice still running,
the text it may emit now, the token it accepted (with logprobs) and, when it ends, its finish
reason. Errors: ``ApiError`` 400 for a logit_bias id outside the vocabulary; anything else is a bug.

onnxruntime-genai runs the model; every token is chosen by our C++ sampler (``phi3edge._sampling``),
one call per step for all rows. onnxruntime-genai refuses a second ``append_tokens`` on a batch, so
each step writes a logits tensor that keeps only the chosen tokens (``force_logits``) and lets its
greedy search take them.
"""

from __future__ import annotations

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
    prefill only the new suffix, as llama.cpp's server does. Logits equal a cold prefill's up to
    float rounding (about 1e-6; the tests check the same tokens and logprobs). Not thread-safe:
    the service serialises requests.
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
            del self._kept[self.entries - 1 :]  # make room before allocating another KV cache
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


KV_PREALLOCATE_BYTES = 2 << 30


def _new_generator(model: LoadedModel, max_length: int, batch: int) -> Any:
    """A generator for ``batch`` rows of up to ``max_length`` tokens.

    With a shared past/present buffer onnxruntime-genai allocates the KV cache for ``max_length``
    up front: fastest, but a request without max_tokens would reserve the whole context (3.2 GB
    for Phi-3-mini-4k, about 100 GB for the 128k members). Above ``KV_PREALLOCATE_BYTES`` the
    cache grows step by step instead (measured: about 8% slower decode, same logits).
    """
    import onnxruntime_genai as og

    preallocate = max_length * batch * model.kv_bytes_per_token <= KV_PREALLOCATE_BYTES
    search = og.GeneratorParams(model.model)
    search.set_search_options(
        max_length=max_length, batch_size=batch, past_present_share_buffer=preallocate
    )
    return og.Generator(model.model, search)


def generate(
    model: LoadedModel,
    prompt: Prompt,
    cfg: SamplingConfig,
    cancelled: Callable[[], bool] | None = None,
    cache: PrefixCache | None = None,
) -> Iterator[list[ChoiceStep]]:
    """One request: prefill once, then decode each of its ``n`` choices; yield per step.

    onnxruntime-genai cannot fork a prefilled KV cache into a batch, and a batch of ``n`` copies
    of the prompt pays the prefill ``n`` times (3.9x for n=4 here). So the choices share one
    prefill: after choice ``i`` ends, the generator is rewound to the prompt and choice ``i+1``
    re-runs only the prompt's last token (the same logits up to float rounding). Decoding of the
    choices is sequential; each choice keeps its own RNG stream ``(seed, i)``.
    """
    vocab = model.vocab_size
    params = sampler_params(cfg, vocab)
    need = len(prompt.ids) + prompt.max_new_tokens
    if cache is not None and cache.entries > 0:
        # allocate room for the next turns too, so the next request can reuse this KV
        allocate = min(model.context_length, need + CACHE_HEADROOM)
        generator, start, capacity = cache.take(model, prompt.ids, need, allocate)
    else:
        generator, start, capacity = _new_generator(model, need, 1), 0, need
    healthy = False
    try:
        for index in range(cfg.n):
            if index > 0:
                start = len(prompt.ids) - 1
                generator.rewind_to(start)
            generator.append_tokens(np.asarray([prompt.ids[start:]], dtype=np.int32))
            row = _Row(
                0,
                _Choice(index, IncrementalDecoder(model.table), StopFilter(cfg.stop)),
                params,
                _sampling.RowState(vocab, cfg.seed, index),
                prompt.max_new_tokens,
                cfg.logprobs,
            )
            for steps in _decode(model, generator, [row], cancelled):
                yield [step for _, step in steps]
            if cancelled and cancelled():
                break
        healthy = True
    finally:
        if cache is not None and cache.entries > 0 and healthy:
            cache.put(generator, capacity)
        del generator


@dataclass
class BatchItem:
    """One request of a batch: its prompt and sampling parameters."""

    prompt: Prompt
    cfg: SamplingConfig


MAX_BATCH_ROWS = 16


def generate_batch(
    model: LoadedModel, items: list[BatchItem]
) -> Iterator[list[tuple[int, ChoiceStep]]]:
    """Many requests decoded together; yield per step ``(request index, ChoiceStep)`` pairs.

    Requests of different lengths share one onnxruntime-genai batch: prompts minus their last
    token are right-padded with the pad id (masked), then every row's last prompt token is fed in
    one forced step, so each row's KV and positions are exactly its own (logits match single runs
    to float rounding, see the tests). Requests are grouped by length so padding stays small and
    each group fits the context; a request with ``n`` choices takes ``n`` rows.
    """
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt.ids))
    group: list[int] = []
    for index in [*order, None]:
        if index is not None:
            trial = [*group, index]
            rows = sum(items[i].cfg.n for i in trial)
            longest = max(len(items[i].prompt.ids) for i in trial)
            need = longest + max(items[i].prompt.max_new_tokens for i in trial)
            if not group or (rows <= MAX_BATCH_ROWS and need <= model.context_length):
                group = trial
                continue
        if group:
            yield from _generate_group(model, items, group)
        group = [index] if index is not None else []


def _generate_group(
    model: LoadedModel, items: list[BatchItem], group: list[int]
) -> Iterator[list[tuple[int, ChoiceStep]]]:
    vocab = model.vocab_size
    rows: list[_Row] = []
    prompts: list[list[int]] = []
    for request in group:
        item = items[request]
        params = sampler_params(item.cfg, vocab)
        for index in range(item.cfg.n):
            choice = _Choice(index, IncrementalDecoder(model.table), StopFilter(item.cfg.stop))
            state = _sampling.RowState(vocab, item.cfg.seed, index)
            rows.append(
                _Row(request, choice, params, state, item.prompt.max_new_tokens, item.cfg.logprobs)
            )
            prompts.append(item.prompt.ids)
    width = max(len(p) for p in prompts) - 1
    max_length = width + 1 + max(r.max_new_tokens for r in rows)
    generator = _new_generator(model, max_length, len(rows))
    try:
        padded = [p[:-1] + [model.pad_id] * (width - len(p) + 1) for p in prompts]
        generator.append_tokens(np.asarray(padded, dtype=np.int32))
        last = np.asarray([p[-1] for p in prompts], dtype=np.int32)
        generator.set_logits(_sampling.force_logits(last, vocab))
        generator.generate_next_token()
        yield from _decode(model, generator, rows, None)
    finally:
        del generator


@dataclass
class _Row:
    """One choice being generated in a batch row."""

    request: int
    choice: _Choice
    params: _sampling.SamplingParams
    state: _sampling.RowState
    max_new_tokens: int
    logprobs: bool


def _decode(
    model: LoadedModel, generator: Any, rows: list[_Row], cancelled: Callable[[], bool] | None
) -> Iterator[list[tuple[int, ChoiceStep]]]:
    """The decode loop for rows whose prompts are in the generator and whose logits are ready."""
    vocab = model.vocab_size
    filler = np.int32(min(model.eos_ids))
    params = [r.params for r in rows]
    states = [r.state for r in rows]
    while True:
        step = _sampling.sample(generator.get_logits(), params, states)
        yield [
            (r.request, _advance(model, r.choice, step, i, r.max_new_tokens, r.logprobs))
            for i, r in enumerate(rows)
            if r.choice.finish_reason is None
        ]
        if all(r.choice.finish_reason for r in rows) or (cancelled and cancelled()):
            return
        active = [r.choice.finish_reason is None for r in rows]
        chosen = np.where(active, step.tokens, filler).astype(np.int32)
        generator.set_logits(_sampling.force_logits(chosen, vocab))
        generator.generate_next_token()


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
        if choice.stop.stopped:  # the flushed bytes completed a stop string
            choice.finish_reason = "stop"
    out.finish_reason = choice.finish_reason
    return out
