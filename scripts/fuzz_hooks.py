"""Schemathesis hooks for scripts/fuzz_server.py (loaded through SCHEMATHESIS_HOOKS).

- ``before_call``: bound the completion length. Chat bodies that are JSON objects get
  ``max_tokens`` (and ``max_completion_tokens``) lowered to PHI3EDGE_FUZZ_MAX_TOKENS when larger
  but still inside the context (larger values answer 400 without generating, so they stay and the
  context check keeps being exercised), and set to it when the body gives neither (absent or
  null). Schema-invalid values (0, negative, non-integers) are left alone, so negative cases stay
  negative; schemathesis re-checks a case after this hook changes it.
- ``after_call``: count response statuses and content types per operation into
  PHI3EDGE_FUZZ_STATS (JSON, written at exit) for the script's summary.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections import Counter
from typing import Any

import schemathesis

MAX_TOKENS = int(os.environ.get("PHI3EDGE_FUZZ_MAX_TOKENS", "16"))
CONTEXT_LENGTH = int(os.environ.get("PHI3EDGE_FUZZ_CONTEXT_LENGTH", "4096"))
STATS_PATH = os.environ.get("PHI3EDGE_FUZZ_STATS")
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")

_stats: Counter[str] = Counter()
_lock = threading.Lock()


def _bounded(value: Any) -> bool:
    """An integer the schema accepts and the context could hold: safe to lower."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < CONTEXT_LENGTH


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if not case.path.endswith("/chat/completions") or not isinstance(case.body, dict):
        return
    body = case.body
    for name in _LENGTH_FIELDS:
        if _bounded(body.get(name)) and body[name] > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if all(body.get(name) is None for name in _LENGTH_FIELDS):  # null means "not given"
        body["max_tokens"] = MAX_TOKENS


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    content_type = response.headers.get("content-type", [""])
    if isinstance(content_type, list):
        content_type = content_type[0] if content_type else ""
    media_type = content_type.split(";")[0].strip() or "-"
    key = f"{case.method} {case.path} {response.status_code} {media_type}"
    with _lock:
        _stats[key] += 1


def _write_stats() -> None:
    if STATS_PATH:
        with open(STATS_PATH, "w", encoding="utf-8") as f:
            json.dump(dict(_stats), f, indent=1, sort_keys=True)


atexit.register(_write_stats)
