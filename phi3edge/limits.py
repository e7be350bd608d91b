"""What one loaded model will take on: the limits a serving operator sets.

Input: the operator's choices (``phi3edge serve`` flags, ``ChatCompletionsClient`` arguments).
Output: ``Limits``; ``Limits.check`` applies the per-request ones to a validated request.
Errors: ``ApiError`` 400 naming the parameter and the limit; ``ValueError`` for nonsense limits.

The defaults keep one request from holding the model for minutes or answering with tens of MB:
a request without max_tokens gets at most ``max_tokens`` per choice (never a KV cache sized to a
128k context), and ``n`` x max_tokens is bounded by ``max_output_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3edge.errors import bad_request
from phi3edge.schema import MAX_N, ChatRequest


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096  # largest max_tokens accepted; also the default per choice
    max_output_tokens: int = 8192  # n x max_tokens of one request
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_n: int = MAX_N
    max_queue: int = 16  # requests running or waiting for the model; more are refused (429)
    max_active_batches: int = 2  # batches that take turns on the engine
    # Padded prompt tokens of one batched prefill (rows x longest prompt): one model call that
    # nothing else can interrupt (engine.BATCH_PREFILL_TOKENS).
    batch_prefill_tokens: int = 256
    # What a batch may waste on padding and filler steps, in percent of its real work
    # (engine.padded_work); None: no cap (a server's requests rarely use their whole max_tokens).
    batch_padding_pct: int | None = None
    time_budget_s: float | None = None  # per request, queueing included; None: no limit

    def __post_init__(self) -> None:
        for name in (
            "max_tokens",
            "max_output_tokens",
            "max_n",
            "max_queue",
            "max_active_batches",
            "batch_prefill_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, not {self.max_prompt_tokens}")
        if self.batch_padding_pct is not None and self.batch_padding_pct < 0:
            raise ValueError(f"batch_padding_pct must be >= 0, not {self.batch_padding_pct}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, not {self.time_budget_s}")
        if self.max_n > MAX_N:
            raise ValueError(f"max_n must be <= {MAX_N}, not {self.max_n}")

    def default_max_tokens(self, n: int) -> int:
        """The completion budget per choice of a request that gives no max_tokens."""
        return max(1, min(self.max_tokens, self.max_output_tokens // n))

    def check(self, request: ChatRequest) -> None:
        """Refuse a request over the limits (400 naming the parameter and the limit)."""
        if request.n > self.max_n:
            raise bad_request(
                f"n is {request.n}; this server allows at most {self.max_n}",
                "n",
                "invalid_parameter",
            )
        if request.max_tokens is not None and request.max_tokens > self.max_tokens:
            raise bad_request(
                f"max_tokens is {request.max_tokens}; this server allows at most {self.max_tokens}",
                "max_tokens",
                "invalid_parameter",
            )
        if (
            request.max_tokens is not None
            and request.n * request.max_tokens > self.max_output_tokens
        ):
            raise bad_request(
                f"n x max_tokens is {request.n} x {request.max_tokens} = "
                f"{request.n * request.max_tokens} tokens; this server allows at most "
                f"{self.max_output_tokens} per request",
                "max_tokens",
                "invalid_parameter",
            )
