"""``phi3edge data check``: the chat fine-tuning format, rule by rule, and token counts with a
model's own tokenizer and chat template (checked against transformers' tokenizer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from phi3edge import data_check
from phi3edge.cli import main

SYSTEM = {"role": "system", "content": "You are a concise assistant for a bakery."}
USER = {"role": "user", "content": "When do you open on Sundays?"}
ASSISTANT = {"role": "assistant", "content": "At 8 am, and we close at 2 pm."}
VALID = [
    {"messages": [USER, ASSISTANT]},
    {"messages": [SYSTEM, USER, ASSISTANT]},
    {"messages": [SYSTEM, USER, ASSISTANT, USER, {**ASSISTANT, "weight": 1}]},
    {"messages": [USER, {**ASSISTANT, "name": "baker"}]},
]


def _write(tmp_path: Path, lines: list[Any]) -> Path:
    path = tmp_path / "train.jsonl"
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def test_valid_examples_pass(tmp_path: Path, capsys: Any) -> None:
    path = _write(tmp_path, VALID)
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{path}: 4 examples, 0 with errors"]


BROKEN = [
    ("not json", "not valid JSON: Expecting value (column 1)"),
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", "the line is a JSON array, not an object with 'messages'"),
    ({"conversation": [USER, ASSISTANT]}, "unknown key 'conversation'"),
    ({"conversation": [USER, ASSISTANT]}, "no 'messages' key"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [USER, ASSISTANT], "id": 3}, "unknown key 'id'"),
    ({"messages": ["hi", ASSISTANT]}, "message 1 is a JSON string, not an object"),
    ({"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}, 'message 1: role "bot"'),
    ({"messages": [{"content": "x"}, ASSISTANT]}, "message 1: no role"),
    ({"messages": [USER, {"role": "tool", "content": "x"}]}, "roles are system, user, assistant"),
    ({"messages": [USER, {"role": "assistant"}]}, "message 2: no content, not text"),
    ({"messages": [USER, {**ASSISTANT, "content": ["a"]}]}, "content is a JSON array, not text"),
    ({"messages": [USER, {**ASSISTANT, "content": "  \n"}]}, "message 2 (assistant): empty"),
    ({"messages": [{**USER, "content": ""}, ASSISTANT]}, "message 1 (user): empty content"),
    ({"messages": [USER, {**ASSISTANT, "tool_calls": []}]}, "message 2: unknown key 'tool_calls'"),
    ({"messages": [{**USER, "weight": 1}, ASSISTANT]}, "'weight' is 0 or 1, on assistant"),
    ({"messages": [USER, {**ASSISTANT, "weight": 0.5}]}, "'weight' is 0 or 1"),
    ({"messages": [ASSISTANT]}, "message 1: assistant where the user turn is due"),
    ({"messages": [SYSTEM, ASSISTANT]}, "message 2: assistant where the user turn is due"),
    ({"messages": [USER, USER, ASSISTANT]}, "message 2: user where the assistant turn is due"),
    ({"messages": [USER, ASSISTANT, ASSISTANT]}, "message 3: assistant where the user turn is"),
    ({"messages": [USER, SYSTEM, ASSISTANT]}, "message 2: a system message may only come first"),
    ({"messages": [SYSTEM, SYSTEM, USER, ASSISTANT]}, "a system message may only come first"),
    ({"messages": [USER]}, "the last message is a user message; an example ends with"),
    ({"messages": [SYSTEM]}, "the last message is a system message"),
    ({"messages": [USER, ASSISTANT, USER]}, "the last message is a user message"),
]


@pytest.mark.parametrize("line, words", BROKEN, ids=[w for _, w in BROKEN])
def test_each_rule_is_reported_with_its_line_number(
    tmp_path: Path, line: Any, words: str, capsys: Any
) -> None:
    path = _write(tmp_path, [VALID[0], VALID[1], line, VALID[2]])
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    errors = [o for o in out if ": error: " in o]
    assert errors and all(o.startswith(f"{path}:3: error: ") for o in errors), out
    assert any(words in o for o in errors), errors
    assert out[-1] == f"{path}: 4 examples, 1 with errors"


def test_file_level_problems(tmp_path: Path, capsys: Any) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "check", str(empty)]) == 1
    assert "no examples" in capsys.readouterr().out
    blank = _write(tmp_path, [VALID[0], "", VALID[1]])
    assert main(["data", "check", str(blank)]) == 1
    assert f"{blank}:2: error: empty line" in capsys.readouterr().out
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(VALID[0]).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    assert main(["data", "check", str(latin)]) == 1
    assert f"{latin}:2: error: not UTF-8" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_token_counts_use_the_models_tokenizer_and_template(
    tmp_path: Path, tiny_int4: Path, model_factory: Callable[..., Path], capsys: Any
) -> None:
    from transformers import AutoTokenizer

    long_answer = {"role": "assistant", "content": " ".join(["bread"] * 2100)}
    path = _write(tmp_path, [*VALID, {"messages": [USER, long_answer]}])
    assert main(["data", "check", str(path), "--model", str(tiny_int4)]) == 1
    out = capsys.readouterr().out.splitlines()

    # the reference: transformers' tokenizer and chat template of the source checkpoint
    tokenizer = AutoTokenizer.from_pretrained(model_factory("phi-3-mini-4k"))

    def expected(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        return len(ids)

    counts = [expected(e["messages"]) for e in VALID]
    # by hand: <|user|> + 9 text tokens + <|end|> + <|assistant|> + 11 + <|end|> + <|endoftext|>
    assert counts[0] == 25
    for number, count in enumerate(counts, 1):
        assert f"{path}:{number}: {count} tokens" in out
    long_count = expected([USER, long_answer])
    assert long_count > 2048
    assert (
        f"{path}:5: error: {long_count} tokens, longer than the model's context of 2048" in out[-2]
    )
    assert out[-1].startswith(f"{path}: 5 examples, 1 with errors; tokens per example min ")
    assert out[-1].endswith("(context 2048, 1 over it)")


def test_check_messages_returns_the_conversation() -> None:
    messages, problems = data_check.check_messages(VALID[2])
    assert problems == [] and messages is not None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
