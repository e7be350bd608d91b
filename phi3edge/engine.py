"""The decode loop: prompt ids in, per-step text deltas out.

Input: a ``LoadedModel`` and one request (``generate``: a ``Prompt`` and its ``SamplingConfig``)
or several that fit together (``generate_batch``), each with an optional ``halt`` check.
Output: an iterator with one item per unit of work (a prefill chunk or a decode step); each lists,
per choice still running, the text it may emit now, the token it accepted (with logprobs) and,
when it ends, its finish reason. Errors: ``ApiError`` 400 for a logit_bias id outside the
vocabulary; anything else is a bug.

These functions are not thread-safe and need not be: only the engine thread (``core``) runs them
for a served model, advancing several iterators in turn.

onnxruntime-genai runs the model; every token is chosen by our C++ sampler (``phi3edge._sampling``),
one call per step for all rows. A single row appends its chosen token (``append_tokens`` runs the
model at once, the next ``get_logits`` only copies). onnxruntime-genai refuses a second
``append_tokens`` on a batch, so a batch's step writes a logits tensor that keeps only the chosen
tokens (``force_logits``) and lets its greedy search take them: about 0.05 ms more per step.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from phi3edge import _sampling
from phi3edge.detokenize import IncrementalDecoder, StopFilter
from phi3edge.errors import bad_request
from phi3edge.guidance import Constraint, mask_words
from phi3edge.prompt import Prompt
from phi3edge.runtime import LoadedModel
from phi3edge.schema import SamplingConfig
from phi3edge.speculation import DraftLength, PromptLookup, SpeculationStats


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
    sampled: bool = False  # a token was chosen (counts in usage.completion_tokens)


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
        logprobs=cfg.logprobs,  # without them a greedy step skips the logprob normaliser
    )


def search_can_pick(cfg: SamplingConfig) -> bool:
    """Whether onnxruntime-genai's own greedy search may pick a lone choice's tokens: greedy,
    with nothing for our sampler to do (no logit_bias, penalties, logprobs or grammar).

    Its search reads the logits in place, where our kernel needs them copied to a numpy array
    first (``get_output``): on a short model step the copy alone is 2-3% of it (README, #12 part
    3). Both take the highest logit, ties to the lowest id, so the tokens are the same."""
    return (
        cfg.temperature == 0
        and not cfg.logit_bias
        and cfg.presence_penalty == 0
        and cfg.frequency_penalty == 0
        and not cfg.logprobs
        and cfg.top_logprobs == 0
        and cfg.grammar is None
    )


CACHE_HEADROOM = 1024  # tokens of KV allocated beyond a cached request's own need


class _Kept(NamedTuple):
    generator: Any
    tokens: list[int]  # what its KV cache holds
    capacity: int  # its max_length
    adapter: str | None


class PrefixCache:
    """Keeps the KV cache of the most recent single-choice conversations for reuse.

    A chat resends its whole history every turn. When a new prompt extends what a kept generator
    already holds, we rewind that generator to the shared prefix (``Generator.rewind_to``) and
    prefill only the new suffix, as llama.cpp's server does. Logits equal a cold prefill's up to
    float rounding (about 1e-6; the tests check the same tokens and logprobs). Owned by the
    engine thread, like every generator it keeps.

    A generator runs under one LoRA adapter (or none) for its whole life, and its KV depends on
    it, so a kept generator serves only requests for the same adapter.
    """

    def __init__(self, entries: int = 1) -> None:
        self.entries = entries
        self._kept: list[_Kept] = []
        self.hits = 0
        self.reused_tokens = 0

    def can_serve(self, need: int, adapter: str | None) -> bool:
        """Whether ``take`` would hand a request of ``need`` tokens a kept generator."""
        return any(_serves(entry, need, adapter) for entry in self._kept)

    def drop(self, need: int | None = None, adapter: str | None = None) -> None:
        """Free the kept generators (their KV caches) that cannot serve a request of ``need``
        tokens under ``adapter``; every one when ``need`` is None."""
        self._kept = [e for e in self._kept if need is not None and _serves(e, need, adapter)]

    def take(
        self, model: LoadedModel, ids: list[int], need: int, adapter: str | None = None
    ) -> tuple[Any, int, int]:
        """A generator holding a prefix of ``ids``, how long that prefix is, and the generator's
        capacity. ``need``: tokens the request uses; ``adapter``: the LoRA adapter it runs under
        (None: the base model).

        A kept generator with room is reused even when it shares nothing with ``ids`` (rewound
        to the start): creating one with a preallocated KV cache costs 0.15 s on full Phi-3-mini
        here, 2.3 s the first time (scripts/bench_model_calls.py), while rewinding is free.
        Otherwise the oldest kept one goes and a new one gets room for the next turns too
        (``CACHE_HEADROOM``), within the context and the memory the live generators leave."""
        best = self._best(ids, need, adapter)
        if best is None:
            del self._kept[self.entries - 1 :]  # frees its KV cache before allocating another
            free = model.kv_tokens_free
            room = model.context_length if free is None else min(model.context_length, free)
            allocate = max(need, min(room, need + CACHE_HEADROOM))
            return _new_generator(model, allocate, 1, adapter), 0, allocate
        self._kept.remove(best.entry)
        keep = min(best.common, len(ids) - 1)  # at least one token must run to give logits
        best.entry.generator.rewind_to(keep)
        if keep:
            self.hits += 1
            self.reused_tokens += keep
        return best.entry.generator, keep, best.entry.capacity

    def _best(self, ids: list[int], need: int, adapter: str | None) -> _Match | None:
        """The kept generator that can serve the request and shares the longest prefix."""
        best: _Match | None = None
        for entry in self._kept:
            if _serves(entry, need, adapter):
                common = _common_prefix(entry.tokens, ids)
                if best is None or common > best.common:
                    best = _Match(entry, common)
        return best

    def warm(self, model: LoadedModel) -> None:
        """Keep a generator for the base model as long as the context (or as the longest KV
        cache that may be preallocated) before any request: ``take`` hands it to the first
        conversation, which then does not wait for the allocation (onnxruntime-genai zeroes
        it: 3.2 GB for Phi-3-mini-4k took 6.49 s the first time here, 2.40 s after;
        ``scripts/bench_model_calls.py``)."""
        if self.entries == 0:
            return
        capacity = min(model.context_length, model.kv_preallocate_bytes // model.kv_bytes_per_token)
        if model.shared_kv_limit is not None:
            capacity = min(capacity, model.shared_kv_limit)
        self._kept.insert(0, _Kept(_new_generator(model, capacity, 1), [], capacity, None))

    def put(self, generator: Any, max_length: int, adapter: str | None = None) -> None:
        tokens = [int(t) for t in generator.get_sequence(0)]
        self._kept.insert(0, _Kept(generator, tokens, max_length, adapter))
        del self._kept[self.entries :]

    def clear(self) -> None:
        self._kept.clear()


class _Match(NamedTuple):
    entry: _Kept
    common: int  # tokens of the prompt its KV cache already holds


def _serves(entry: _Kept, need: int, adapter: str | None) -> bool:
    return entry.capacity >= need and entry.adapter == adapter


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _new_generator(
    model: LoadedModel, max_length: int, batch: int, adapter: str | None = None
) -> Any:
    """A generator for ``batch`` rows of up to ``max_length`` tokens, under LoRA ``adapter``
    (one of ``model.adapter_names``; None for the base model).

    With a shared past/present buffer onnxruntime-genai allocates the KV cache for ``max_length``
    up front: fastest, but resident for the whole reservation (a request without max_tokens
    reserves up to prompt + 4096 tokens: Phi-3-mini-4k's whole context, 3.2 GB). Otherwise the
    cache grows step by step: same logits, but every step copies it (0.27x the decode speed at
    2000 tokens of context on full Phi-3-mini, ``runtime.kv_preallocate_bytes``) and the process
    holds 2.7-3.8x the KV (the old and the new cache, and what the heap keeps of earlier ones;
    ``scripts/bench_kv_memory.py``, README). So a lone
    request, whose reservation ``prompt.fit_context`` has checked against the memory free at
    load, always preallocates; a batch, whose rows rarely all use their max_tokens, up to
    ``model.kv_preallocate_bytes``. Past ``model.shared_kv_limit`` (older exports of models with
    a sliding window) it grows. Either way ``model.kv_ledger`` counts its final size until it is
    freed.
    """
    import onnxruntime_genai as og

    limit = model.shared_kv_limit
    lone = batch == 1 and model.memory_free_at_load is not None
    reserved = max_length * batch * model.kv_bytes_per_token
    preallocate = (lone or reserved <= model.kv_preallocate_bytes) and (
        limit is None or max_length <= limit
    )
    search = og.GeneratorParams(model.model)
    search.set_search_options(
        max_length=max_length,
        batch_size=batch,
        past_present_share_buffer=preallocate,
        # its search only ever takes the best logit (of forced logits in a batch, of a lone
        # plain-greedy choice's own): whatever genai_config.json says, nothing else alters them
        do_sample=False,
        min_length=0,
        repetition_penalty=1.0,
    )
    generator = og.Generator(model.model, search)
    if model.kv_ledger is not None:
        model.kv_ledger.hold(generator, reserved)
    if adapter is not None:
        generator.set_active_adapter(model.adapters, adapter)
    return generator


PREFILL_CHUNK = 64  # prompt tokens per append: the engine can stop or switch batches between them

Halt = Callable[[], "str | None"]
"""Asked between units of work: None to go on, ``"length"`` when the request's time budget ran
out (its choices end with finish_reason length), ``"cancelled"`` when nobody is listening."""


def generate(
    model: LoadedModel,
    prompt: Prompt,
    cfg: SamplingConfig,
    halt: Halt | None = None,
    cache: PrefixCache | None = None,
    speculative: bool = False,
    stats: SpeculationStats | None = None,
    adapter: str | None = None,
) -> Iterator[list[ChoiceStep]]:
    """One request: prefill once, then decode each of its ``n`` choices; yield per unit of work.
    ``adapter``: the LoRA adapter to run under (None: the base model).

    Each item is one decode step's ``ChoiceStep`` list, or ``[]`` after a prefill chunk: the
    prompt goes in ``PREFILL_CHUNK`` tokens at a time, so a caller can stop (``halt``) or serve
    another request between chunks instead of waiting for a long prompt.

    onnxruntime-genai cannot fork a prefilled KV cache into a batch, and a batch of ``n`` copies
    of the prompt pays the prefill ``n`` times (3.9x for n=4 here). So the choices share one
    prefill: after choice ``i`` ends, the generator is rewound to the prompt and choice ``i+1``
    re-runs only the prompt's last token (the same logits up to float rounding). Decoding of the
    choices is sequential; each choice keeps its own RNG stream ``(seed, i)``.

    The generator (a kept one from ``cache`` or a new one) is claimed when this is called, not
    at the first step, so the engine's ``KvLedger`` counts it as soon as the request starts.

    ``speculative``: decode with prompt-lookup drafts (``_decode_one``): the same tokens,
    fewer model calls when the answer repeats text from the prompt or from itself (counted in
    ``stats``).
    """
    params = sampler_params(cfg, model.vocab_size)
    need = prompt.kv_tokens
    if cache is not None and cache.entries > 0:
        claim = cache.take(model, prompt.ids, need, adapter)
    else:
        claim = _new_generator(model, need, 1, adapter), 0, need
    return _generate_steps(
        model, prompt, cfg, params, halt, cache, speculative, stats, adapter, *claim
    )


def _generate_steps(
    model: LoadedModel,
    prompt: Prompt,
    cfg: SamplingConfig,
    params: _sampling.SamplingParams,
    halt: Halt | None,
    cache: PrefixCache | None,
    speculative: bool,
    stats: SpeculationStats | None,
    adapter: str | None,
    generator: Any,
    start: int,
    capacity: int,
) -> Iterator[list[ChoiceStep]]:
    """``generate``'s units of work on the generator it claimed (holding ``start`` tokens of the
    prompt already)."""
    vocab = model.vocab_size
    healthy = False
    try:
        prefilled = False
        for index in range(cfg.n):
            reason = halt() if halt else None
            if reason is None:
                if prefilled:
                    start = len(prompt.ids) - 1
                    generator.rewind_to(start)
                reason = yield from _prefill(generator, prompt.ids[start:], halt)
                prefilled = reason is None
            if reason == "cancelled":
                break
            if reason == "length":  # out of time before this choice began
                yield [ChoiceStep(index, finish_reason="length")]
                continue
            row = _Row(
                0,
                _Choice(index, IncrementalDecoder(model.table), StopFilter(cfg.stop)),
                params,
                _sampling.RowState(vocab, cfg.seed, index),
                prompt.max_new_tokens,
                cfg.logprobs,
                halt,
                _constraint(model, cfg),
                search_picks=search_can_pick(cfg),
            )
            spec = (stats or SpeculationStats()) if speculative else None
            yield from _decode_one(model, generator, row, prompt.ids, capacity, spec)
        healthy = True
    finally:
        if cache is not None and cache.entries > 0 and healthy:
            cache.put(generator, capacity, adapter)
        del generator


def _prefill(
    generator: Any, ids: list[int], halt: Halt | None
) -> Generator[list[ChoiceStep], None, str | None]:
    """Append ``ids`` in ``PREFILL_CHUNK``-token pieces, yielding ``[]`` between them; return the
    halt reason if asked to stop before the end."""
    for offset in range(0, len(ids), PREFILL_CHUNK):
        if offset:
            yield []
            reason = halt() if halt else None
            if reason:
                return reason
        piece = ids[offset : offset + PREFILL_CHUNK]
        generator.append_tokens(np.asarray([piece], dtype=np.int32))
    return None


@dataclass
class BatchItem:
    """One request of a batch: its prompt, sampling parameters, when to stop early and the LoRA
    adapter it runs under (None: the base model)."""

    prompt: Prompt
    cfg: SamplingConfig
    halt: Halt | None = None
    adapter: str | None = None


MAX_BATCH_ROWS = 16
# Padded prompt tokens of one batched prefill: a single append the engine cannot pause, so it
# stays short (Limits.batch_prefill_tokens; padding costs as much as real tokens, README).
BATCH_PREFILL_TOKENS = 256


def fits_in_batch(
    model: LoadedModel,
    items: list[BatchItem],
    prefill_tokens: int = BATCH_PREFILL_TOKENS,
    padding_pct: int | None = None,
) -> bool:
    """Whether ``items`` can run as one onnxruntime-genai batch (rows, context, memory for
    their KV caches, prefill size).

    The one batching policy: the engine thread forms its batches with it. A single item always
    fits (its own prefill is chunked when it runs alone). A generator runs one adapter, so a
    batch's requests share theirs. ``prefill_tokens``: the cap on the batched prefill's padded
    tokens (rows x longest prompt). ``padding_pct``: the cap on what the batch wastes
    (``padded_work``), in percent of its real work; None: no cap.
    """
    if len(items) <= 1:
        return True
    if len({i.adapter for i in items}) > 1:
        return False
    rows, need = _batch_shape(items)
    longest = max(len(i.prompt.ids) for i in items)
    if padding_pct is not None:
        padded, real = padded_work(items)
        if padded * 100 > real * (100 + padding_pct):
            return False
    memory = model.kv_tokens_in_memory
    return (
        rows <= MAX_BATCH_ROWS
        and need <= model.context_length
        and (memory is None or rows * need <= memory)
        and rows * (longest - 1) <= prefill_tokens
    )


def _batch_shape(items: list[BatchItem]) -> tuple[int, int]:
    """A batch's rows and the length of each (``generate_batch``'s generator)."""
    rows = sum(i.cfg.n for i in items)
    return rows, max(len(i.prompt.ids) for i in items) + max(i.prompt.max_new_tokens for i in items)


def kv_bytes_to_start(
    model: LoadedModel, items: list[BatchItem], cache: PrefixCache | None = None
) -> int:
    """The KV cache bytes that starting ``items`` adds to the live generators'
    (``runtime.KvLedger``): none for a lone request that a kept generator of ``cache`` can
    serve; otherwise what its generator reserves (a lone request's room for later turns is
    taken only from what is left free, ``PrefixCache.take``, so it is not counted)."""
    if len(items) == 1:
        item = items[0]
        need = item.prompt.kv_tokens
        if cache is not None and cache.entries > 0 and cache.can_serve(need, item.adapter):
            return 0
        return need * model.kv_bytes_per_token
    rows, need = _batch_shape(items)
    return rows * need * model.kv_bytes_per_token


def padded_work(items: list[BatchItem]) -> tuple[int, int]:
    """A batch's token positions as run and as asked: every row is as long as the longest
    prompt plus the largest max_tokens (a static batch steps until its last row ends), against
    the rows' own prompt plus max_tokens. Both cost alike, as prefill and batched decode run
    at about the same tokens/s here (README, batch step costs)."""
    rows, length = _batch_shape(items)
    real = sum(i.cfg.n * i.prompt.kv_tokens for i in items)
    return rows * length, real


def padding_cost(a: BatchItem, b: BatchItem) -> int:
    """What running ``a`` and ``b`` in one batch wastes: the shorter prompt's padding plus the
    filler steps of the row that ends first (the ends of a static batch differ by that much)."""
    return abs(len(a.prompt.ids) - len(b.prompt.ids)) + abs(
        a.prompt.max_new_tokens - b.prompt.max_new_tokens
    )


def generate_batch(
    model: LoadedModel, items: list[BatchItem]
) -> Iterator[list[tuple[int, ChoiceStep]]]:
    """Requests decoded together as one batch; yield per step ``(item index, ChoiceStep)`` pairs.

    Requests of different lengths share one onnxruntime-genai batch: prompts minus their last
    token are right-padded with the pad id (masked), then every row's last prompt token is fed in
    one forced step, so each row's KV and positions are exactly its own (logits match single runs
    to float rounding, see the tests). A request with ``n`` choices takes ``n`` rows. The caller
    checks ``fits_in_batch`` first. onnxruntime-genai refuses a second ``append_tokens`` on a
    batch, so the prefill is not chunked (``fits_in_batch`` caps its size). The generator is
    made when this is called (``generate``).
    """
    vocab = model.vocab_size
    rows: list[_Row] = []
    prompts: list[list[int]] = []
    halted: list[tuple[int, ChoiceStep]] = []
    for number, item in enumerate(items):
        reason = item.halt() if item.halt else None
        if reason == "length":  # out of time before it began
            halted += [(number, ChoiceStep(i, finish_reason="length")) for i in range(item.cfg.n)]
            continue
        if reason == "cancelled":
            continue
        params = sampler_params(item.cfg, vocab)
        for index in range(item.cfg.n):
            choice = _Choice(index, IncrementalDecoder(model.table), StopFilter(item.cfg.stop))
            state = _sampling.RowState(vocab, item.cfg.seed, index)
            rows.append(
                _Row(
                    number,
                    choice,
                    params,
                    state,
                    item.prompt.max_new_tokens,
                    item.cfg.logprobs,
                    item.halt,
                    _constraint(model, item.cfg),
                )
            )
            prompts.append(item.prompt.ids)
    generator = None
    if rows:
        max_length = max(len(p) for p in prompts) + max(r.max_new_tokens for r in rows)
        generator = _new_generator(model, max_length, len(rows), items[0].adapter)
    return _batch_steps(model, generator, rows, prompts, halted)


def _batch_steps(
    model: LoadedModel,
    generator: Any,
    rows: list[_Row],
    prompts: list[list[int]],
    halted: list[tuple[int, ChoiceStep]],
) -> Iterator[list[tuple[int, ChoiceStep]]]:
    """``generate_batch``'s steps: the requests that ended before they began (``halted``), then
    the batched prefill and the decode of ``rows`` on ``generator``."""
    if halted:
        yield halted
    if not rows:
        return
    vocab = model.vocab_size
    width = max(len(p) for p in prompts) - 1
    try:
        padded = [p[:-1] + [model.pad_id] * (width - len(p) + 1) for p in prompts]
        generator.append_tokens(np.asarray(padded, dtype=np.int32))
        last = np.asarray([p[-1] for p in prompts], dtype=np.int32)
        generator.set_logits(_sampling.force_logits(last, vocab))
        generator.generate_next_token()
        yield from _decode(model, generator, rows)
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
    halt: Halt | None = None
    constraint: Constraint | None = None  # structured output: the tokens it allows
    search_picks: bool = False  # a lone row: onnxruntime-genai's greedy search picks its tokens

    @property
    def open(self) -> bool:
        return self.choice.finish_reason is None


def _constraint(model: LoadedModel, cfg: SamplingConfig) -> Constraint | None:
    return Constraint(cfg.grammar, model.grammar_tokenizer) if cfg.grammar else None


def _decode(
    model: LoadedModel, generator: Any, rows: list[_Row]
) -> Iterator[list[tuple[int, ChoiceStep]]]:
    """The decode loop for rows whose prompts are in the generator and whose logits are ready.

    Before each step every open row's ``halt`` is asked: a cancelled row ends silently, a row out
    of time ends with finish_reason ``length`` (its held-back text released). Ended rows are fed
    a filler token until the whole batch ends. Rows with a constraint get their allowed-token
    bitmask each step (the others allow everything); one ends with ``stop`` as soon as its
    grammar is complete.
    """
    vocab = model.vocab_size
    filler = np.int32(min(model.eos_ids))
    params = [r.params for r in rows]
    states = [r.state for r in rows]
    constrained = any(r.constraint for r in rows)
    masks = np.full((len(rows), mask_words(vocab)), -1, dtype=np.int32) if constrained else None
    while True:
        ended = [(r.request, _halt(r)) for r in rows if r.open]
        reported = [(request, s) for request, s in ended if s is not None and s.finish_reason]
        if not any(r.open for r in rows):
            if reported:
                yield reported
            return
        if masks is not None:
            for i, r in enumerate(rows):
                if r.constraint is not None:
                    if r.open:
                        r.constraint.fill(masks[i])
                    else:  # an ended row's grammar may allow nothing; its token is a filler
                        masks[i] = -1
        step = _sampling.sample(generator.get_logits(), params, states, masks)
        yield reported + [
            (r.request, _advance(model, r, int(step.tokens[i]), step, i))
            for i, r in enumerate(rows)
            if r.open
        ]
        if not any(r.open for r in rows):
            return
        active = [r.open for r in rows]
        chosen = np.where(active, step.tokens, filler).astype(np.int32)
        generator.set_logits(_sampling.force_logits(chosen, vocab))
        generator.generate_next_token()


def _decode_one(
    model: LoadedModel,
    generator: Any,
    row: _Row,
    history: list[int],
    capacity: int,
    speculation: SpeculationStats | None,
) -> Iterator[list[ChoiceStep]]:
    """The decode loop of one choice running alone; ``history``: the tokens in the generator (the
    prompt), ``capacity``: its max_length. With ``speculation`` (its counters), prompt-lookup
    drafts (``speculation.py``) ride along with each model call.

    Each model call appends the last chosen token, plus up to k drafted tokens, and gives the
    logits of every position (``get_output("logits")``; the first access after a call costs the
    same as ``get_logits``, and a lone row needs no forced logits as a batch does). Our sampler
    then chooses position by position exactly as without speculation: each position's logits
    follow the tokens chosen before it, penalty counts and the constraint follow every chosen
    token, and each choice takes one draw of the row's RNG. While the chosen token equals the
    draft, the next position is valid too; the first that differs ends the round, and the
    generator is rewound past the rejected drafts. So the output, greedy or seeded, is the one
    decoding without speculation gives (up to the float rounding of a k-token call, about 1e-6 in
    the logits), and for deterministic drafts this is speculative sampling's accept/resample rule:
    the output distribution is unchanged.

    A plain-greedy row (``search_can_pick``) lets onnxruntime-genai's own search pick whenever a
    call gave one position (``generate_next_token``, which reads the logits in place, no copy and
    no kernel): the same tokens, a few percent faster on a short model step. Its pick is added
    without the model running on it, so drafts are never appended after it: when drafts follow,
    the pick is rewound and appended together with them; otherwise the next ``generate_next_token``
    runs it. A pick left unrun when the choice ends is rewound, so the generator holds only tokens
    the model ran (the prefix cache reuses them).
    """
    lookup = PromptLookup(history) if speculation is not None else None
    length = DraftLength()
    masks = np.full((1, mask_words(model.vocab_size)), -1, np.int32) if row.constraint else None
    held = len(history)  # tokens the model has run, rejected drafts included
    pending = False  # the search's last pick is in the generator, not yet run by the model
    drafts: list[int] = []  # appended with the last chosen token in the last model call
    logits = None if row.search_picks else generator.get_logits()  # [1, 1, V]: after the prompt
    try:
        while True:
            accepted, token = 0, -1
            positions = 1 if logits is None else logits.shape[1]
            for j in range(positions):  # position j follows the appended token j
                halted = _halt(row)
                if halted is not None:
                    if halted.finish_reason:
                        yield [halted]
                    return
                if logits is None:  # one position: the search picks, reading the logits in place
                    generator.generate_next_token()  # runs the model on its last pick first
                    if pending:
                        held += 1
                    token, pending = int(generator.get_next_tokens()[0]), True
                    step: _sampling.StepOutput | None = None
                else:
                    if masks is not None and row.constraint is not None:
                        row.constraint.fill(masks[0])
                    step = _sampling.sample(logits[:, j], [row.params], [row.state], masks)
                    token = int(step.tokens[0])
                if speculation is not None:
                    speculation.tokens += 1
                yield [_advance(model, row, token, step)]
                if not row.open:
                    return
                if lookup is not None:
                    lookup.append(token)
                if j < len(drafts) and token == drafts[j]:
                    accepted += 1
                else:
                    break
            keep = held - len(drafts) + accepted
            if lookup is not None and speculation is not None:
                speculation.accepted += accepted
                length.update(len(drafts), accepted)
                if keep < held:
                    generator.rewind_to(keep)
                room = min(capacity - keep - 1, row.max_new_tokens - row.choice.generated - 1)
                drafts = lookup.draft(min(length.next(), room))
                if drafts and row.constraint is not None:  # what the grammar forbids is not chosen
                    drafts = drafts[: row.constraint.allowed_prefix(drafts)]
                speculation.model_calls += 1
                speculation.drafted += len(drafts)
            if pending and drafts:  # the search's pick runs together with the drafts instead
                generator.rewind_to(held)
                pending = False
            if not pending:
                generator.append_tokens(np.asarray([[token, *drafts]], dtype=np.int32))
                held = keep + 1 + len(drafts)
            # one position and nothing for our kernel: the next round's search call picks (and
            # first runs the model on a pending pick)
            logits = None if row.search_picks and not drafts else generator.get_output("logits")
    finally:
        if pending:  # the generator keeps only tokens the model ran (PrefixCache reads them)
            generator.rewind_to(held)


def _halt(row: _Row) -> ChoiceStep | None:
    """End ``row`` if its request says so: a final step for ``length``, an empty one for
    ``cancelled`` (never sent: nobody listens), None to go on."""
    reason = row.halt() if row.halt else None
    if reason is None:
        return None
    choice = row.choice
    if reason == "cancelled":
        choice.finish_reason = "cancelled"
        return ChoiceStep(choice.index)
    choice.finish_reason = "length"
    out = ChoiceStep(choice.index, finish_reason="length")
    out.text = choice.stop.push(choice.decoder.flush()) + choice.stop.flush()
    if choice.stop.stopped:
        out.finish_reason = choice.finish_reason = "stop"
    return out


def _advance(
    model: LoadedModel,
    row: _Row,
    token: int,
    step: _sampling.StepOutput | None = None,
    i: int = 0,
) -> ChoiceStep:
    """Take ``token`` as row ``row``'s next: text, logprobs (from ``step``, the kernel's output
    in which the row is the ``i``-th; a row that reports none needs no ``step``), and whether the
    choice ends (EOS, a stop string, a complete grammar, max_tokens)."""
    choice = row.choice
    choice.generated += 1
    out = ChoiceStep(choice.index, sampled=True)
    if row.constraint is not None:
        row.constraint.accept(token)
    if token in model.eos_ids:
        choice.finish_reason = "stop"
    else:
        if row.logprobs:
            assert step is not None, "a row that reports logprobs is sampled by our kernel"
            out.tokens.append(TokenLogprob(token, float(step.logprobs[i]), step.alternatives(i)))
        out.text = choice.stop.push(choice.decoder.push(token))
        if choice.stop.stopped:
            choice.finish_reason = "stop"
        elif row.constraint is not None and row.constraint.complete:
            choice.finish_reason = "stop"  # nothing but the end can follow
        elif choice.generated >= row.max_new_tokens:
            choice.finish_reason = "length"
    if choice.finish_reason and not choice.stop.stopped:
        out.text += choice.stop.push(choice.decoder.flush()) + choice.stop.flush()
        if choice.stop.stopped:  # the flushed bytes completed a stop string
            choice.finish_reason = "stop"
    out.finish_reason = choice.finish_reason
    return out
