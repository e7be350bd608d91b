"""phi3edge's C++ sampling kernel (csrc/, private).

One call samples one token for every row of a batch. Per row, in order: logit_bias -> presence and
frequency penalties over the row's generated tokens -> the allowed-token mask, if any -> reported
logprobs (log-softmax at temperature 1) -> temperature (0 = argmax, ties to the lowest id) ->
top_k -> top_p -> one draw from the row's RNG. Bad input raises ValueError (TypeError for
objects of the wrong type).
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__version__: str

class SamplingParams:
    """Immutable per-request parameters; the constructor validates every range."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        top_logprobs: int = 0,
        logprobs: bool = True,
    ) -> None:
        """logprobs False: the chosen token's logprob is not computed (StepOutput.logprobs
        holds NaN for the row), which spares a greedy row an exp pass over the vocabulary."""
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> dict[int, float]: ...
    @property
    def top_logprobs(self) -> int: ...
    @property
    def logprobs(self) -> bool: ...

class RowState:
    """Per-choice state: counts of generated tokens and the RNG of stream (seed, row_index).

    seed None draws a nondeterministic seed; any int that fits int64 is accepted. Not safe to
    share between threads, nor between rows of one call.
    """

    def __init__(self, vocab_size: int, seed: int | None = None, row_index: int = 0) -> None: ...
    def accept(self, token: int) -> None:
        """Counts one generated token (sample() does this for the token it chooses)."""

    def count(self, token: int) -> int: ...
    def reset(self) -> None:
        """Clears the counts and restarts the RNG stream from its beginning."""

    @property
    def vocab_size(self) -> int: ...

class StepOutput:
    tokens: npt.NDArray[np.int32]
    """[B] the chosen token of each row."""
    logprobs: npt.NDArray[np.float32]
    """[B] logprob of the chosen token (after bias and penalties, at temperature 1); NaN for a
    row whose params have logprobs False and top_logprobs 0."""
    top_ids: npt.NDArray[np.int32]
    """[B, K], K = max top_logprobs; row i fills its first params[i].top_logprobs slots, rest -1."""
    top_logprobs: npt.NDArray[np.float32]
    """[B, K] logprobs of top_ids (logprob desc, then id asc); unused slots -inf."""
    def alternatives(self, row: int) -> tuple[tuple[int, float], ...]:
        """Row ``row``'s used slots of top_ids / top_logprobs as (id, logprob) pairs."""

def sample(
    logits: npt.NDArray[np.float32],
    params: Sequence[SamplingParams],
    states: Sequence[RowState],
    allowed: npt.NDArray[np.int32] | npt.NDArray[np.uint32] | None = None,
) -> StepOutput:
    """One step for every row of float32 logits [B, V] or [B, 1, V] (read in place when
    C-contiguous, else copied; never written; other dtypes raise ValueError).

    allowed: an optional constraint bitmask [B, ceil(V / 32)] (llguidance's layout: bit j of
    word j // 32 set = token j allowed; a row of all ones is unconstrained). After logit_bias
    and penalties the tokens it clears get -inf: they are never chosen nor reported, and the
    logprobs are those of the allowed tokens. A row that allows no token raises ValueError.

    len(params) == len(states) == B, every state has vocab_size V and no state appears twice.
    Each row's state then counts the chosen token and advances its RNG by one draw; a call that
    raises changes no state. The GIL is released while the kernel runs. Which alternatives a row
    reports (logprobs, top_logprobs) never changes the token its RNG draws, as long as a top_k
    in use is at least top_logprobs.
    """

def force_logits(
    tokens: npt.NDArray[np.int32] | npt.NDArray[np.int64], vocab_size: int
) -> npt.NDArray[np.float32]:
    """New float32 [B, vocab_size]: 0 at tokens[b] in row b, the lowest finite float elsewhere."""
