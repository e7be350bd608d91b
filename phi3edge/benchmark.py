"""Timing of the engine: time to first token, prefill and decode rates (``phi3edge bench``).

Input: a loaded model, prompt length, tokens to decode, sampling config.
Output: ``Timing`` (seconds to first token, prefill tok/s, decode tok/s).
Speed does not depend on weight values, so a random-weight model of the exact architecture gives
the real figures of that architecture on this machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from phi3edge import engine
from phi3edge.prompt import Prompt
from phi3edge.runtime import LoadedModel
from phi3edge.schema import SamplingConfig

# Keeps a random-weight model from ending early: Phi-3's end tokens banned.
NO_END = {32000: -100.0, 32001: -100.0, 32007: -100.0}


@dataclass(frozen=True)
class Timing:
    first_token_s: float
    prefill_tok_s: float
    decode_tok_s: float


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    """A chat-shaped prompt of exactly ``length`` tokens (random ordinary ids inside)."""
    rng = np.random.default_rng(seed)
    return [32010, *rng.integers(300, 32000, size=length - 3).tolist(), 32007, 32001]


def time_generation(
    model: LoadedModel,
    ids: list[int],
    new_tokens: int,
    cfg: SamplingConfig,
    cache: engine.PrefixCache | None = None,
    adapter: str | None = None,
) -> Timing:
    """Run one request through the engine and time it (decode rate per choice).

    This calls the engine directly on this thread: a benchmark owns its model; a service hands
    it to an engine thread (``phi3edge.core``). ``adapter``: a LoRA adapter of the model."""
    started = time.perf_counter()
    first = 0.0
    for steps in engine.generate(model, Prompt(ids, new_tokens), cfg, None, cache, adapter=adapter):
        if steps and not first:  # an empty list is a prefill chunk, not a token
            first = time.perf_counter()
    end = time.perf_counter()
    decode = (new_tokens * cfg.n - 1) / (end - first) if new_tokens * cfg.n > 1 else 0.0
    return Timing(first - started, len(ids) / (first - started), decode)
