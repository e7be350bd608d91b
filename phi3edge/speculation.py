"""Prompt-lookup drafting for speculative decoding: guesses of the next tokens, and how many.

Input: the tokens of a choice so far (prompt, then each token as it is chosen).
Output: ``PromptLookup.draft(k)``: up to ``k`` tokens that followed the latest earlier occurrence of
the longest recent n-gram (3 or 2 tokens), as in llama.cpp's and vLLM's prompt lookup;
``DraftLength``: how many to draft next, from how the last drafts fared.

Why it pays: rewriting, quoting, code edits and continuing a given passage repeat long runs of the
prompt. The engine appends the drafts together with the last chosen token in one model call and
checks every position with our own sampler (``engine._decode_one``); a model call on CPU
costs little more for a few tokens than for one, so each accepted draft token is nearly free.
No model, no randomness: drafts are a deterministic function of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_NGRAM = 3
# A single repeated token predicts what follows it too poorly to be worth verifying.
MIN_NGRAM = 2
# On CPU a k-token call costs about 1 + 0.37 (k - 1) one-token calls (full-size Phi-3-mini INT4,
# README): a draft token pays only when it is likely to be accepted, so drafts stay short.
MAX_DRAFT = 4


class PromptLookup:
    """An index from each n-gram (n = 2..3) to the position after its latest occurrence."""

    def __init__(self, tokens: list[int]) -> None:
        self._tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Add the next token. The n-grams ending just before it are indexed now (they are
        followed by it), so a lookup of the current suffix never finds the suffix itself."""
        tokens = self._tokens
        end = len(tokens)
        for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
            self._after[tuple(tokens[end - n : end])] = end
        tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest suffix n-gram's latest earlier
        occurrence; [] when no suffix occurred before."""
        tokens = self._tokens
        if k <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(tokens)), MIN_NGRAM - 1, -1):
            start = self._after.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


class DraftLength:
    """How many tokens to draft: doubles while whole drafts are accepted, drops to what was
    accepted plus one on a partial one, and after repeated total misses pauses drafting for
    2, 4, ... 32 tokens, so a request whose text never repeats pays almost nothing."""

    def __init__(self, start: int = 4, most: int = MAX_DRAFT) -> None:
        self.k = start
        self.most = most
        self._misses = 0
        self._paused = 0

    def next(self) -> int:
        if self._paused:
            self._paused -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.most, self.k * 2)
            self._misses = 0
        elif accepted == 0:
            self.k = max(1, self.k // 2)
            self._misses += 1
            if self._misses >= 2:
                self._paused = min(32, 2 ** (self._misses - 1))
        else:
            self.k = max(1, accepted + 1)
            self._misses = 0


@dataclass
class SpeculationStats:
    """Counters of speculative decoding (for benchmarks and tests)."""

    model_calls: int = 0  # appends after the prompt (each gives one or more positions)
    drafted: int = 0  # draft tokens appended
    accepted: int = 0  # of those, the ones the sampler chose too
    tokens: int = 0  # tokens chosen

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / self.model_calls if self.model_calls else 0.0
