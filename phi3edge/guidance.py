"""Structured output: grammars that decide which tokens a choice may generate next.

Input: a request's ``response_format`` (json_object / json_schema), ``guided_regex`` or
``guided_grammar`` (Lark), turned into a ``Grammar`` by ``schema.py`` (compiled and checked there,
off the engine thread); on the engine thread, the loaded model's ``GrammarTokenizer``.
Output: per choice a ``Constraint`` that writes the row's allowed-token bitmask before each step
(``phi3edge._sampling.sample(..., allowed=)``) and follows the tokens chosen.
Errors: ``ApiError`` 400 naming the request parameter, with llguidance's reason, for a grammar
that does not compile or that this model's vocabulary cannot produce.

The masks come from llguidance (the grammar engine behind Guidance and several servers).
onnxruntime-genai's own ``set_guidance`` cannot be used: it masks inside ``generate_next_token``,
after our sampler has chosen, and would replace our forced token. So the bitmask enters our C++
sampler after logit_bias and penalties (DESIGN.md): masked tokens get -inf, and the reported
logprobs are those of the constrained distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from phi3edge.errors import ApiError, bad_request

GrammarKind = Literal["json_schema", "regex", "lark"]

# JSON compile options: whitespace between JSON tokens stays free (a model's natural tokens carry
# spaces and newlines, as in pretty-printed JSON), but a run of it is bounded, so that a model
# cannot spend its whole max_tokens on blanks without ever closing the object. 32 characters
# hold a newline and the indentation of 15 nesting levels at two spaces. A schema's own
# "x-guidance" options (llguidance's documented extension, e.g. {"whitespace_flexible": false})
# override these.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


# Appended to every Lark grammar (the last directive wins over a user's own). llguidance 1.9
# "forces" bytes the grammar leaves no choice about, and then refuses a token lexeme ``<[id]>``
# whose token is a single byte even though its mask allowed it (a grammar ``start: <[339]>``
# failed mid-answer). We never use forced tokens, only the mask, so turning forcing off costs
# nothing here.
NO_FORCING = '\n%llguidance {"no_forcing": true}\n'


@dataclass(frozen=True)
class Grammar:
    """A compiled llguidance grammar and the request parameter it came from (for errors).

    Plain strings only: it travels with the request to the engine thread or process."""

    kind: GrammarKind
    text: str  # llguidance's grammar (JSON text)
    param: str

    @staticmethod
    def from_json_schema(schema: dict[str, Any], param: str) -> Grammar:
        import llguidance

        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as exc:
            raise bad_request(
                f"invalid JSON schema in {param}: {exc}", param, code="invalid_parameter"
            ) from None
        return Grammar("json_schema", text, param).checked()

    @staticmethod
    def from_regex(regex: str, param: str) -> Grammar:
        import llguidance

        return Grammar("regex", llguidance.LLMatcher.grammar_from_regex(regex), param).checked()

    @staticmethod
    def from_lark(lark: str, param: str) -> Grammar:
        import llguidance

        text = llguidance.LLMatcher.grammar_from_lark(lark) + NO_FORCING
        return Grammar("lark", text, param).checked()

    def checked(self, tokenizer: Any = None) -> Grammar:
        """This grammar, or a 400 with llguidance's reason (``tokenizer``: also check that the
        model's vocabulary can produce it)."""
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(self.text, tokenizer)
        if error:
            raise _unusable(self.param, error)
        return self


def _unusable(param: str, reason: str) -> ApiError:
    """400 naming ``param``, with (the start of) llguidance's reason."""
    return bad_request(
        f"{param} cannot be used: {reason.strip()[:600]}", param, code="invalid_parameter"
    )


class GrammarTokenizer:
    """llguidance's view of a model's vocabulary: built on first use (0.2-0.5 s from the model's
    tokenizer.json), then kept for every constrained request. Engine thread only."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._path = tokenizer_json
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._built: Any = None

    def get(self) -> Any:
        if self._built is None:
            import llguidance

            self._built = llguidance.LLTokenizer(
                self._path.read_text("utf-8"), n_vocab=self._vocab_size, eos_token=self._eos_ids
            )
        return self._built

    def __getstate__(self) -> dict[str, Any]:  # metadata crosses to the caller's process
        return {**self.__dict__, "_built": None}


def mask_words(vocab_size: int) -> int:
    """32-bit words of one row's bitmask."""
    return (vocab_size + 31) // 32


class Constraint:
    """One choice's grammar state: the allowed tokens now, and the tokens chosen so far."""

    def __init__(self, grammar: Grammar, tokenizer: GrammarTokenizer) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(tokenizer.get(), grammar.text, log_level=0)
        if self._matcher.is_error():
            raise _unusable(grammar.param, self._matcher.get_error())

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask into ``row`` (int32 [words], C-contiguous)."""
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> None:
        """Follow the chosen token (one the mask allowed: anything else is our bug)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(
                f"the grammar rejected token {token} that its mask allowed: "
                f"{self._matcher.get_error()}"
            )

    def allowed_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens``, in a row from here, the grammar would accept (speculative
        drafts beyond that cannot be chosen, so they are not worth verifying)."""
        return int(self._matcher.validate_tokens(tokens))

    @property
    def complete(self) -> bool:
        """Nothing can follow but the end: the grammar is satisfied and closed."""
        return bool(self._matcher.is_stopped())
