"""Messages -> prompt text -> token ids, within the model's context.

Input: validated messages, the loaded model, the requested max_tokens.
Output: ``Prompt`` (token ids and the number of tokens the completion may use).
Errors: ``ApiError`` 400 when the prompt plus max_tokens does not fit, naming both numbers.

System messages: the Phi-3 / 3.5 deployments of the cloud endpoint do not take ``role="system"``;
they fold it into the user turn. We do the same for every catalog member that does not accept it.

Message text is text: control tokens (``<|user|>``, ``<|end|>``, ``<s>``... every added token of
the tokenizer) come only from the chat template. The tokenizer would turn such strings typed into
a message into the control ids (a forged turn), so content that contains one is tokenized as plain
text: the template is rendered with a placeholder per content to locate it, and from the template's
control token before that content to the one after it the text is encoded without added-token
parsing (``tokenizers`` when installed, else the runtime tokenizer around the control text and
that text character by character). Prompts whose messages hold no control-token text keep the
whole-string encoding, token for token.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from phi3edge.errors import bad_request
from phi3edge.schema import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_new_tokens: int

    @property
    def kv_tokens(self) -> int:
        """Positions its KV cache holds at most: the prompt and every token it may add."""
        return len(self.ids) + self.max_new_tokens


def fold_system_messages(messages: list[Message], accepts_system: bool) -> list[dict[str, str]]:
    """Plain role/content dicts; system (and developer) text moved into the next user turn."""
    plain = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]
    if accepts_system:
        return plain
    folded: list[dict[str, str]] = []
    pending: list[str] = []
    for message in plain:
        if message["role"] == "system":
            pending.append(message["content"])
            continue
        if pending and message["role"] == "user":
            message = {"role": "user", "content": "\n\n".join([*pending, message["content"]])}
            pending = []
        folded.append(message)
    if pending:
        folded.append({"role": "user", "content": "\n\n".join(pending)})
    if len(folded) != len(plain):
        log.debug("system message(s) folded into the user turn: %s", folded)
    return folded


def build_prompt(
    model: Any,
    messages: list[Message],
    max_tokens: int | None,
    *,
    default_max_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
) -> Prompt:
    """Render the chat template, tokenize, and check the context budget.

    ``default_max_tokens``: the completion budget when the request gives no max_tokens (still
    capped by the room left in the context); None means the whole room.
    ``max_prompt_tokens``: an operator's limit below the context length.
    """
    turns = fold_system_messages(messages, model.manifest.accepts_system_role)
    ids = encode_turns(model, turns)
    return fit_context(
        ids,
        model.context_length,
        max_tokens,
        default_max_tokens,
        max_prompt_tokens,
        memory_tokens=model.kv_tokens_in_memory,
    )


def fit_context(
    ids: list[int],
    context_length: int,
    max_tokens: int | None,
    default_max_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    memory_tokens: int | None = None,
) -> Prompt:
    """Check the prompt and completion budget; errors say both numbers. ``memory_tokens``: how
    many tokens' KV cache the machine's memory holds (``LoadedModel.kv_tokens_in_memory``),
    which bounds prompt + max_tokens as the context does (a 128k context takes about 100 GB)."""
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise bad_request(
            f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}",
            param="messages",
            code="context_length_exceeded",
        )
    limit, bound = context_length, f"this model's context of {context_length} tokens"
    if memory_tokens is not None and memory_tokens < context_length:
        limit = memory_tokens
        bound = (
            f"the {memory_tokens} tokens of KV cache that the memory this machine had free "
            "when the model loaded can hold"
        )
    room = limit - len(ids)
    if max_tokens is None:
        if room < 1:
            raise bad_request(
                f"the prompt has {len(ids)} tokens, which fills {bound}",
                param="messages",
                code="context_length_exceeded",
            )
        return Prompt(ids, room if default_max_tokens is None else min(room, default_max_tokens))
    if max_tokens > room:
        raise bad_request(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds {bound}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return Prompt(ids, max_tokens)


# ----------------------------------------------------------------------------- message text is text

# Whitespace a control token with rstrip / lstrip swallows beside it, as onnxruntime-genai's
# tokenizer does it (HF tokenizers also swallow \v, \f and Unicode spaces; og does not).
_STRIP_WHITESPACE = " \t\n\r"
_SPACE_MARK = "\u2581"  # SentencePiece's space
# Tests turn this off to exercise the fallback that needs nothing beyond onnxruntime-genai.
_USE_TOKENIZERS = True


@dataclass(frozen=True)
class _Controls:
    """The tokenizer's added tokens: strings it encodes as their own id wherever they appear."""

    pattern: re.Pattern[str] | None  # longest first: a scan finds what the tokenizer finds
    tokens: dict[str, tuple[int, bool, bool]]  # text -> (id, lstrip, rstrip)
    ids: frozenset[int]
    vocab: dict[str, int]
    pieces: dict[int, str]
    plain: Any  # ``tokenizers.Tokenizer`` of the same model without added tokens, or None


@lru_cache(maxsize=8)
def _load_controls(tokenizer_json: str, mtime_ns: int, use_tokenizers: bool) -> _Controls:
    data = json.loads(Path(tokenizer_json).read_text("utf-8"))
    tokens = {
        t["content"]: (int(t["id"]), bool(t.get("lstrip")), bool(t.get("rstrip")))
        for t in data.get("added_tokens", [])
        if t.get("content")
    }
    texts = sorted(tokens, key=len, reverse=True)
    vocab: dict[str, int] = data["model"]["vocab"]
    plain = None
    if use_tokenizers:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            pass
        else:
            plain = Tokenizer.from_str(json.dumps({**data, "added_tokens": []}))
    return _Controls(
        pattern=re.compile("|".join(map(re.escape, texts))) if texts else None,
        tokens=tokens,
        ids=frozenset(token_id for token_id, _, _ in tokens.values()),
        vocab=vocab,
        pieces={token_id: piece for piece, token_id in vocab.items()},
        plain=plain,
    )


def _controls(model: Any) -> _Controls:
    path = Path(model.folder) / "tokenizer.json"
    return _load_controls(str(path), path.stat().st_mtime_ns, _USE_TOKENIZERS)


def encode_turns(model: Any, turns: list[dict[str, str]]) -> list[int]:
    """The chat template over ``turns``, tokenized; control tokens come only from the template.

    Content without control-token text (nearly all) keeps the whole-string encoding of the
    rendered text; only content that has some is encoded as plain text."""
    tokenizer = model.tokenizer
    text = tokenizer.apply_chat_template(json.dumps(turns), add_generation_prompt=True)
    controls = _controls(model)
    if controls.pattern is None:
        return _encode(tokenizer, text)
    layout = _layout(tokenizer, turns, text)
    if layout is None:  # the template does not insert content verbatim: judge the content alone
        if any(controls.pattern.search(turn["content"]) for turn in turns):
            raise bad_request(
                "message content contains control-token text (such as <|end|>) that this "
                "model's chat template cannot keep as plain text",
                param="messages",
            )
        return _encode(tokenizer, text)
    spans, template = layout[0], _template_matches(controls, *layout)
    expected = [controls.tokens[match][0] for _, _, match in template]
    dirty = _dirty_spans(controls, text, spans)
    if not dirty:
        ids = _encode(tokenizer, text)
        if [i for i in ids if i in controls.ids] == expected:
            return ids
        dirty = spans  # the tokenizer saw a control token we did not: trust no content
    ids = _encode_guarded(tokenizer, controls, text, template, dirty)
    if [i for i in ids if i in controls.ids] != expected:
        raise RuntimeError("a control token outside the chat template reached the prompt")
    return ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text)] if text else []


def _layout(
    tokenizer: Any, turns: list[dict[str, str]], text: str
) -> tuple[list[tuple[int, int]], list[str]] | None:
    """Render with a unique placeholder per non-empty content: each content's (start, end) in
    ``text`` and the template pieces around them, or None if ``text`` is not those pieces with
    the contents inserted verbatim."""
    nonce = secrets.token_hex(8)
    while any(nonce in turn["content"] for turn in turns):
        nonce = secrets.token_hex(8)
    marked = [
        {**turn, "content": f"[phi3edge:{nonce}:{i}]" if turn["content"] else ""}
        for i, turn in enumerate(turns)
    ]
    rendered = tokenizer.apply_chat_template(json.dumps(marked), add_generation_prompt=True)
    parts = re.split(rf"\[phi3edge:{nonce}:(\d+)\]", rendered)
    order = [int(i) for i in parts[1::2]]
    if order != [i for i, turn in enumerate(turns) if turn["content"]]:
        return None
    pieces = parts[0::2]
    spans: list[tuple[int, int]] = []
    position = len(pieces[0])
    for index, piece in zip(order, pieces[1:], strict=True):
        end = position + len(turns[index]["content"])
        spans.append((position, end))
        position = end + len(piece)
    if position != len(text):
        return None
    for (start, end), index in zip(spans, order, strict=True):
        if text[start:end] != turns[index]["content"]:
            return None
    starts = [0, *(end for _, end in spans)]
    if any(text[s : s + len(p)] != p for s, p in zip(starts, pieces, strict=True)):
        return None
    return spans, pieces


def _template_matches(
    controls: _Controls, spans: list[tuple[int, int]], pieces: list[str]
) -> list[tuple[int, int, str]]:
    """The template's own control tokens: (start, end, text) in the rendered text."""
    assert controls.pattern is not None
    found: list[tuple[int, int, str]] = []
    for offset, piece in zip([0, *(end for _, end in spans)], pieces, strict=True):
        found += [
            (offset + m.start(), offset + m.end(), m.group())
            for m in controls.pattern.finditer(piece)
        ]
    return found


def _dirty_spans(
    controls: _Controls, text: str, spans: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Contents that hold (or, with the template text beside them, make) control-token text."""
    assert controls.pattern is not None
    starts = [start for start, _ in spans]
    dirty: set[int] = set()
    for match in controls.pattern.finditer(text):
        k = max(bisect.bisect_right(starts, match.start()) - 1, 0)
        while k < len(spans) and spans[k][0] < match.end():
            if spans[k][1] > match.start() and spans[k][1] > spans[k][0]:
                dirty.add(k)
            k += 1
    return [spans[k] for k in sorted(dirty)]


def _encode_guarded(
    tokenizer: Any,
    controls: _Controls,
    text: str,
    template: list[tuple[int, int, str]],
    dirty: list[tuple[int, int]],
) -> list[int]:
    """Whole-string encoding except around dirty content: from the template control token before
    it (and the whitespace that token swallows) to the one after it, the text is one plain-text
    segment, exactly the segment the tokenizer would make there if the content held no control
    text. So clean content and the template encode as before."""
    ends = [end for _, end, _ in template]
    starts = [start for start, _, _ in template]
    regions: list[tuple[int, int]] = []
    for start, end in dirty:
        k = bisect.bisect_right(ends, start) - 1
        left = template[k][1] if k >= 0 else 0
        if k >= 0 and controls.tokens[template[k][2]][2]:  # rstrip
            while left < end and text[left] in _STRIP_WHITESPACE:
                left += 1
        k = bisect.bisect_left(starts, end)
        right = template[k][0] if k < len(template) else len(text)
        if k < len(template) and controls.tokens[template[k][2]][1]:  # lstrip
            while right > max(left, start) and text[right - 1] in _STRIP_WHITESPACE:
                right -= 1
        if regions and left <= regions[-1][1]:
            regions[-1] = (regions[-1][0], max(right, regions[-1][1]))
        else:
            regions.append((left, right))
    ids: list[int] = []
    position = 0
    for left, right in regions:
        ids += _encode(tokenizer, text[position:left])
        ids += _encode_plain(tokenizer, controls, text[left:right])
        position = right
    return ids + _encode(tokenizer, text[position:])


def _encode_plain(tokenizer: Any, controls: _Controls, segment: str) -> list[int]:
    """``segment`` as the tokenizer encodes a stretch of text between control tokens, with any
    control-token text in it encoded as ordinary text."""
    if controls.plain is not None:
        return list(controls.plain.encode(segment, add_special_tokens=False).ids)
    # Without ``tokenizers``: the runtime's tokenizer on the stretches between control-token
    # text, which it renders with the "▁" (space) prefix of a segment start. Every stretch after
    # the first loses that prefix again; the control-token text goes in character by character.
    assert controls.pattern is not None
    ids: list[int] = []
    position = 0
    for match in controls.pattern.finditer(segment):
        ids += _plain_piece(tokenizer, controls, segment[position : match.start()], position == 0)
        if match.start() == 0:  # the segment starts with control-token text: it gets its "▁"
            ids += _char_ids(controls, _SPACE_MARK)
        ids += _char_ids(controls, match.group())
        position = match.end()
    return ids + _plain_piece(tokenizer, controls, segment[position:], position == 0)


def _plain_piece(tokenizer: Any, controls: _Controls, piece: str, first: bool) -> list[int]:
    if not piece:
        return []
    ids = _encode(tokenizer, piece)
    if not first and ids:
        head = controls.pieces.get(ids[0], "")
        if head.startswith(_SPACE_MARK):
            rest = head[len(_SPACE_MARK) :]
            ids[:1] = (
                [controls.vocab[rest]] if rest in controls.vocab else _char_ids(controls, rest)
            )
    if any(i in controls.ids for i in ids):  # the tokenizer matched something our scan did not
        return _char_ids(controls, (_SPACE_MARK if first else "") + piece)
    return ids


def _char_ids(controls: _Controls, text: str) -> list[int]:
    """One token per character (its byte tokens when it has none): valid, if not the shortest."""
    ids: list[int] = []
    for char in text.replace(" ", _SPACE_MARK):
        if char in controls.vocab:
            ids.append(controls.vocab[char])
        else:
            ids += [controls.vocab.get(f"<0x{b:02X}>", 0) for b in char.encode("utf-8")]
    return ids
