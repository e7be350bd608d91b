"""Messages -> prompt text -> token ids, within the model's context.

Input: validated messages, the loaded model, the requested max_tokens.
Output: ``Prompt`` (token ids and the number of tokens the completion may use).
Errors: ``ApiError`` 400 when the prompt plus max_tokens does not fit, naming both numbers.

System messages: the Phi-3 / 3.5 deployments of the cloud endpoint do not take ``role="system"``;
they fold it into the user turn. We do the same for every catalog member that does not accept it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from phi3edge.errors import bad_request
from phi3edge.schema import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_new_tokens: int


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


def build_prompt(model: Any, messages: list[Message], max_tokens: int | None) -> Prompt:
    """Render the chat template, tokenize, and check the context budget."""
    turns = fold_system_messages(messages, model.manifest.accepts_system_role)
    text = model.tokenizer.apply_chat_template(json.dumps(turns), add_generation_prompt=True)
    ids = [int(t) for t in model.tokenizer.encode(text)]
    room = model.context_length - len(ids)
    if max_tokens is None:
        if room < 1:
            raise bad_request(
                f"the prompt has {len(ids)} tokens, which fills this model's context of "
                f"{model.context_length} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        return Prompt(ids, room)
    if max_tokens > room:
        raise bad_request(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
            f"context of {model.context_length} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return Prompt(ids, max_tokens)
