"""Check a chat fine-tuning file (JSONL) before it goes to a fine-tuning job.

Input: a JSONL file, one training example per line in the chat format that Phi-3 fine-tuning
takes (the cloud's and PEFT trainers' alike)::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

and optionally an exported model, whose own tokenizer and chat template count each example's
tokens (the whole conversation as training sees it: the template without a generation prompt,
through transformers, as a fine-tuning job tokenizes).
Output: ``Report``: per line the problems found (line numbers from 1) and, with a model, the
token count; ``phi3edge data check`` prints it and exits 1 when anything is wrong.

The rules: every line is a JSON object whose only key is ``messages``, a non-empty list of
``{"role", "content"}`` objects (``name`` is allowed; ``weight``, 0 or 1, on assistant turns);
roles are system, user, assistant; one optional system message comes first, then user and
assistant alternate starting with user, and the last message is the assistant's answer; every
content is a non-empty string. With a model, an example longer than its context is an error
(training would cut it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name", "weight"}


@dataclass
class Example:
    """One line of the file: its problems, and its messages and tokens when it is valid."""

    line: int
    problems: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None
    tokens: int | None = None


@dataclass
class Report:
    path: Path
    examples: list[Example]
    context_length: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.examples) and not any(e.problems for e in self.examples)

    def lines(self, counts: bool = True) -> Iterator[str]:
        """What ``phi3edge data check`` prints: one line per problem (and per example's token
        count when counted), then a summary."""
        for example in self.examples:
            where = f"{self.path}:{example.line}"
            for problem in example.problems:
                yield f"{where}: error: {problem}"
            if counts and example.tokens is not None and not example.problems:
                yield f"{where}: {example.tokens} tokens"
        yield self.summary()

    def summary(self) -> str:
        if not self.examples:
            return f"{self.path}: no examples (the file is empty)"
        bad = sum(1 for e in self.examples if e.problems)
        text = f"{self.path}: {len(self.examples)} examples, {bad} with errors"
        counted = [e.tokens for e in self.examples if e.tokens is not None]
        if counted:
            over = sum(1 for t in counted if t > (self.context_length or t))
            text += (
                f"; tokens per example min {min(counted)}, mean {sum(counted) / len(counted):.0f},"
                f" max {max(counted)}, total {sum(counted)} (context {self.context_length}, "
                f"{over} over it)"
            )
        return text


def check_messages(value: Any) -> tuple[list[dict[str, str]] | None, list[str]]:
    """The conversation of one parsed line, or None, and the rules it breaks."""
    if not isinstance(value, dict):
        return None, [f"the line is a JSON {_kind(value)}, not an object with 'messages'"]
    problems = [
        f"unknown key '{key}' (an example holds only 'messages')"
        for key in value
        if key != "messages"
    ]
    messages = value.get("messages")
    if messages is None:
        return None, [*problems, "no 'messages' key"]
    if not isinstance(messages, list) or not messages:
        return None, [*problems, "'messages' must be a non-empty list of messages"]
    roles: list[str | None] = []
    for number, message in enumerate(messages, 1):
        role, found = _check_message(number, message)
        roles.append(role)
        problems += found
    problems += _check_order(roles)
    if problems:
        return None, problems
    return [{"role": m["role"], "content": m["content"]} for m in messages], []


def _check_message(number: int, message: Any) -> tuple[str | None, list[str]]:
    if not isinstance(message, dict):
        return None, [f"message {number} is a JSON {_kind(message)}, not an object"]
    problems = [
        f"message {number}: unknown key '{key}' (a message has role and content)"
        for key in message
        if key not in MESSAGE_KEYS
    ]
    role = message.get("role")
    if role not in ROLES:
        shown = "no role" if role is None else f"role {json.dumps(role)}"
        problems.append(f"message {number}: {shown}; roles are {', '.join(ROLES)}")
        role = None
    content = message.get("content")
    if not isinstance(content, str):
        shown = "no content" if content is None else f"content is a JSON {_kind(content)}"
        problems.append(f"message {number}: {shown}, not text")
    elif not content.strip():
        problems.append(f"message {number} ({role or 'no role'}): empty content")
    if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)):
        problems.append(f"message {number}: 'weight' is 0 or 1, on assistant messages only")
    return role, problems


def _check_order(roles: list[str | None]) -> list[str]:
    """System first (optional), then user / assistant alternating from user, ending assistant."""
    if None in roles:
        return []  # already reported; the order of unknown roles says nothing more
    problems = []
    start = 1 if roles[0] == "system" else 0
    for number, role in enumerate(roles[start:], start + 1):
        expected = "user" if (number - start) % 2 == 1 else "assistant"
        if role == "system":
            problems.append(f"message {number}: a system message may only come first")
        elif role != expected:
            problems.append(
                f"message {number}: {role} where the {expected} turn is due "
                "(turns alternate user, assistant, starting with user)"
            )
    if roles[-1] != "assistant":
        problems.append(
            f"the last message is a {roles[-1]} message; "
            "an example ends with the assistant's answer"
        )
    return problems


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def check_file(
    path: str | os.PathLike[str],
    count: Callable[[list[dict[str, str]]], int] | None = None,
    context_length: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Check every line of ``path``; ``count`` (with ``context_length``) tokenizes each valid
    example, and one longer than the context is an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    examples = []
    for number, data in enumerate(lines, 1):
        example = Example(number)
        examples.append(example)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            example.problems.append(f"not UTF-8 (byte {exc.start + 1})")
            continue
        if not text.strip():
            example.problems.append("empty line (JSONL has one example per line)")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            example.problems.append(f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        example.messages, example.problems = check_messages(value)
        if count is not None and example.messages is not None:
            example.tokens = count(example.messages)
            if context_length is not None and example.tokens > context_length:
                example.problems.append(
                    f"{example.tokens} tokens, longer than the model's context of "
                    f"{context_length} (training would cut it)"
                )
        if progress is not None and number % 1000 == 0:
            progress(f"checked {number} of {len(lines)} lines")
    return Report(path, examples, context_length)


def token_counter(model_dir: str | os.PathLike[str]) -> Callable[[list[dict[str, str]]], int]:
    """Tokens of a whole training conversation with the exported model's own tokenizer files and
    chat template, through transformers (what a fine-tuning job tokenizes with).

    phi3edge's runtime tokenizer (onnxruntime-genai) reads the same tokenizer.json but may split a
    few strings differently (it splits digits one by one), so served prompt counts can differ by
    a few tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def count(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
