"""Token ids -> text, one token at a time, never emitting half a character or part of a stop string.

Input: ``tokenizer.json`` of an exported model (Phi-3's SentencePiece-style BPE with byte
fallback, or Phi-3-small's byte-level BPE), then generated token ids one by one. Output: text
deltas that concatenate to the full decoded text (as the tokenizer's own decoder renders it), with
stop strings removed.

Phi-3 pieces map to text directly (``▁`` = space), so detokenizing is a table lookup: O(1) per
token. Byte-fallback tokens (``<0xNN>``) are gathered while they run and decoded as one group, as
the tokenizer's ByteFallback decoder does: valid UTF-8 becomes its characters, an invalid group
becomes one U+FFFD per byte. A character is therefore never emitted in parts.

Byte-level BPE (Phi-3-small's cl100k-style vocabulary) spells every byte as one printable
character (GPT-2's table): a token maps to bytes, and an incremental UTF-8 decoder holds back the
first bytes of a character split across tokens (invalid bytes become U+FFFD, as the tokenizer's
ByteLevel decoder renders them). Nothing is stripped: that decoder strips no leading space.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path

_SPACE_MARK = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level table, character -> byte: printable bytes stand for themselves, the
    others are shifted to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _is_byte_level(tokenizer: dict) -> bool:
    decoder = tokenizer.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


class TokenTable:
    """The bytes each token id stands for; special tokens render as nothing."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        data = json.loads(Path(tokenizer_json).read_text("utf-8"))
        vocab: dict[str, int] = data["model"]["vocab"]
        added = {t["id"]: t for t in data.get("added_tokens", [])}
        size = max([*vocab.values(), *added.keys()]) + 1
        self.byte_level = _is_byte_level(data)
        alphabet = _byte_level_alphabet() if self.byte_level else {}
        self._bytes: list[bytes] = [b""] * size
        self._text: list[str] = [""] * size
        for piece, token_id in vocab.items():
            self._text[token_id] = piece.replace(_SPACE_MARK, " ")
            if self.byte_level:
                self._bytes[token_id] = b"".join(
                    bytes([alphabet[c]]) if c in alphabet else c.encode() for c in piece
                )
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self._bytes[token_id] = bytes([int(piece[3:5], 16)])
            else:
                self._bytes[token_id] = self._text[token_id].encode("utf-8")
        self.byte_ids = frozenset(
            () if self.byte_level else (i for i, p in enumerate(self._text) if p.startswith("<0x"))
        )
        self.special_ids = frozenset(i for i, t in added.items() if t.get("special"))
        for token_id, token in added.items():
            self._text[token_id] = token["content"]
            self._bytes[token_id] = b"" if token.get("special") else token["content"].encode()

    def __len__(self) -> int:
        return len(self._bytes)

    def token_bytes(self, token_id: int) -> bytes:
        """What the token adds to the output (empty for special tokens and unused ids)."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_text(self, token_id: int) -> str:
        """The token as shown in logprobs (special tokens by name, bytes escaped)."""
        if 0 <= token_id < len(self._bytes):
            if token_id in self.special_ids:
                return self._text[token_id]
            return self._bytes[token_id].decode("utf-8", errors="backslashreplace")
        return ""


class IncrementalDecoder:
    """Turns token ids into text deltas; a run of byte tokens waits until it ends."""

    def __init__(self, table: TokenTable) -> None:
        self._table = table
        self._run = bytearray()
        self._started = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if table.byte_level else None

    def push(self, token_id: int) -> str:
        if self._utf8 is not None:
            return self._utf8.decode(self._table.token_bytes(token_id))
        if token_id in self._table.byte_ids:
            self._run += self._table.token_bytes(token_id)
            return ""
        return self._emit(self._end_run() + self._table.token_bytes(token_id).decode("utf-8"))

    def flush(self) -> str:
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        return self._emit(self._end_run())

    def _end_run(self) -> str:
        run, self._run = bytes(self._run), bytearray()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)

    def _emit(self, text: str) -> str:
        if not self._started and text:
            self._started = True
            if text.startswith(" "):  # the tokenizer's decoder strips one leading space
                text = text[1:]
        return text


@dataclass
class StopFilter:
    """Holds back text that could still turn into a stop string; reports when one appears."""

    stops: tuple[str, ...]
    _pending: str = ""
    stopped: bool = field(default=False, init=False)

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit now."""
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._longest_stop_prefix_suffix()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """At the end of generation nothing more can complete a stop string: release the rest."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:size]):
                    best = size
                    break
        return best
