"""Soak test of ``phi3edge serve``: concurrent mixed load, then a 429 flood, with exact checks.

Usage::

    python scripts/soak_server.py [--model DIR] [--clients 8] [--requests 400] [--max-queue 16]
                                  [--threads 1] [--seed 0] [--out results/soak_server.json]

Starts ``phi3edge serve`` (``sys.executable -m phi3edge.cli serve``, a free loopback port) on the
built-in tiny random-weight int4 model (or ``--model DIR``), warms it up (sequential requests of
every kind, then one concurrent burst, so thread pools and allocator arenas exist before the
baseline), and reads the server's RSS (VmRSS of /proc/PID/status) as the baseline.

Load: ``--clients`` threads, one ``httpx.Client`` each, share ``--requests`` requests: ~30 %
streams, ~20 % n=2, ~20 % logprobs with top_logprobs, ~15 % disconnects (a stream closed after
its first 1-2 lines; not checked), ~5 % bad requests (must answer 400 with the error envelope
``{"error": {"code", "message", "param", "status"}}``), the rest plain (on both the OpenAI route
and the Azure one); max_tokens 4..16. A 429 is counted, then the request is retried after its
Retry-After seconds. Random weights produce noise, so each request forces its output: a token id T
unique in the run gets ``"logit_bias": {"T": 100}``, and every choice must then read exactly T's
text repeated max_tokens times (one leading space of the whole output is stripped by the decoder;
the warm-up checks that rule), finish with ``length``, and every logprobs token must be T's text.
Another text counts as "mixed_up" (the summary says whose request it belonged to, if any); a
stream without ``data: [DONE]`` or a choice without finish_reason counts as "lost".

After the load: /health is polled until no queue slot is in use (the drain time; more than 10 s
means a leaked slot), and RSS is read again. Then a flood: 4 x max_queue simultaneous non-stream
requests (max_tokens 16) are counted as 200 vs 429, one request right after must get a 200 within
5 s, and /health must come back to 0.

Prints a summary table and one JSON line (also written to ``--out``). Targets (exit status 1 when
one is missed): 0 mixed up, 0 lost, 0 5xx, 0 other unexpected outcomes (a good request refused, a
bad one not answered 400 with the envelope, transport errors), RSS growth < 5 %, every slot free
10 s after the load, the flood recovered. ERROR/Traceback lines of the server log are reported
(the log is kept with ``--server-log FILE``). The server is always terminated, also on Ctrl-C.
With the defaults the run takes about a minute or two on the tiny model (2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from benchlib import Server

ROUTE = "/v1/chat/completions"
AZURE_ROUTE = "/chat/completions"
ENVELOPE_KEYS = {"code", "message", "param", "status"}
RSS_GROWTH_LIMIT = 5.0  # percent
DRAIN_LIMIT = 10.0  # seconds
RECOVERY_LIMIT = 5.0  # seconds
_MESSAGES = [{"role": "user", "content": "Say one word, several times."}]
BAD_BODIES: list[dict | bytes] = [
    {"messages": "x"},
    {"messages": _MESSAGES, "max_tokens": 0},
    {"messages": _MESSAGES, "temperature": 5},
    {"messages": _MESSAGES, "n": 0},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": _MESSAGES, "logit_bias": {"5": 1000}},
    {"max_tokens": 4},
    {"messages": _MESSAGES, "max_tokens": 100000},
    {"messages": _MESSAGES, "logprobs": True, "top_logprobs": 50},
    {"messages": [], "max_tokens": 4},
    {"messages": _MESSAGES, "logit_bias": {"abc": 1}},
    {"messages": _MESSAGES, "stream": True, "max_tokens": "x"},
    b"{not json",
]


# ---------------------------------------------------------------------------------------------
# server


# ---------------------------------------------------------------------------------------------
# forced output


class Forcing:
    """Hands out token ids unique in the run and says what a forced choice must read."""

    def __init__(self, model: Path, seed: int) -> None:
        from phi3edge.detokenize import TokenTable

        table = TokenTable(model / "tokenizer.json")
        ids = []
        for token_id in range(1000, min(20000, len(table))):
            text = table.token_text(token_id)
            core = text.strip()
            if core.isascii() and core.isalpha() and text in (core, " " + core):
                ids.append(token_id)
        if len(ids) < 100:
            raise SystemExit(f"only {len(ids)} usable token ids in {model / 'tokenizer.json'}")
        random.Random(seed).shuffle(ids)
        self.text = {token_id: table.token_text(token_id) for token_id in ids}
        self.ids = ids
        self.by_text = {text: token_id for token_id, text in self.text.items()}
        self._next = itertools.count()
        self._lock = threading.Lock()
        self.strip_one_space = True  # settled by calibrate()
        self.owner: dict[int, str] = {}  # token id -> request label

    def take(self, label: str) -> int:
        with self._lock:
            token_id = self.ids[next(self._next) % len(self.ids)]
            self.owner[token_id] = label
            return token_id

    def expected(self, token_id: int, k: int) -> str:
        text = self.text[token_id] * k
        if self.strip_one_space and text.startswith(" "):
            text = text[1:]
        return text

    def whose(self, content: str) -> str:
        """Name the request whose forced token the content repeats (any count), if any."""
        with self._lock:
            owned = list(self.owner.items())
        for token_id, label in owned:
            text = self.text[token_id]
            for count in range(1, 65):
                if self.expected(token_id, count) == content:
                    return f"{count} x token {token_id} {text!r} of request {label}"
                if len(text) * count > len(content) + 1:
                    break
        return "no other request's token either"


# ---------------------------------------------------------------------------------------------
# requests and checks


@dataclass
class Spec:
    label: str
    kind: str  # plain, azure, stream, n2, logprobs, disconnect, bad
    body: dict | bytes
    token: int | None = None
    k: int = 0
    n: int = 1
    route: str = ROUTE
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    spec: Spec
    result: str  # completed, disconnected, rejected, mixed_up, lost, error
    status: int | None = None
    latency: float = 0.0
    statuses: list[int] = field(default_factory=list)  # every response status, 429s included
    retry_after: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def make_spec(rng: random.Random, forcing: Forcing, label: str, kind: str | None = None) -> Spec:
    if kind is None:
        roll = rng.random()
        kind = (
            "stream"
            if roll < 0.30
            else "n2"
            if roll < 0.50
            else "logprobs"
            if roll < 0.70
            else "disconnect"
            if roll < 0.85
            else "bad"
            if roll < 0.90
            else rng.choice(("plain", "azure"))
        )
    if kind == "bad":
        return Spec(label, kind, rng.choice(BAD_BODIES))
    k = rng.randint(4, 16)
    token = forcing.take(label)
    n = 2 if kind == "n2" or (kind == "stream" and rng.random() < 0.3) else 1
    body: dict = {
        "messages": [{"role": "user", "content": f"Request {label}: say one word {k} times."}],
        "max_tokens": k,
        "seed": rng.randint(0, 2**31 - 1),
        "temperature": rng.choice((0.0, 0.8, 1.0)),
        "logit_bias": {str(token): 100},
    }
    if n > 1:
        body["n"] = n
    if kind == "logprobs" or (kind == "stream" and rng.random() < 0.3):
        body["logprobs"] = True
        body["top_logprobs"] = rng.randint(1, 3)
    if kind in ("stream", "disconnect"):
        body["stream"] = True
    if kind == "azure":  # Azure refuses logit_bias unless extra parameters are passed through
        headers = {"extra-parameters": "pass-through"}
        return Spec(label, kind, body, token, k, n, AZURE_ROUTE, headers)
    return Spec(label, kind, body, token=token, k=k, n=n)


def _request(client: httpx.Client, spec: Spec) -> httpx.Request:
    if isinstance(spec.body, bytes):
        headers = {**spec.headers, "content-type": "application/json"}
        return client.build_request("POST", spec.route, content=spec.body, headers=headers)
    return client.build_request("POST", spec.route, json=spec.body, headers=spec.headers)


def _check_choice(
    forcing: Forcing, spec: Spec, index: int, content: str, finish, tokens: list[str] | None
) -> tuple[str | None, list[str]]:
    """Returns (worst result, problems) of one choice: None when it is right."""
    problems: list[str] = []
    result = None
    expected = forcing.expected(spec.token, spec.k)
    if content != expected:
        result = "mixed_up"
        problems.append(
            f"choice {index}: content {content!r} != expected {expected!r} "
            f"({spec.k} x {forcing.text[spec.token]!r}); it is {forcing.whose(content)}"
        )
    if tokens is not None:
        want = forcing.text[spec.token]
        wrong = [t for t in tokens if t != want]
        if wrong or len(tokens) != spec.k:
            result = "mixed_up"
            problems.append(
                f"choice {index}: {len(tokens)} logprob tokens, {len(wrong)} not {want!r} "
                f"(e.g. {wrong[:3]!r})"
            )
    if finish is None:
        result = "lost"
        problems.append(f"choice {index}: no finish_reason")
    elif finish != "length" and result is None:
        result = "mixed_up"
        problems.append(f"choice {index}: finish_reason {finish!r}, expected 'length'")
    return result, problems


def _worst(results: list[str | None]) -> str:
    for name in ("lost", "mixed_up", "error"):
        if name in results:
            return name
    return "completed"


def check_json(forcing: Forcing, spec: Spec, data: dict) -> tuple[str, list[str]]:
    problems: list[str] = []
    results: list[str | None] = []
    choices = data.get("choices") or []
    if sorted(c.get("index") for c in choices) != list(range(spec.n)):
        results.append("lost")
        problems.append(f"choice indexes {[c.get('index') for c in choices]}, n={spec.n}")
    wants_logprobs = isinstance(spec.body, dict) and spec.body.get("logprobs")
    for choice in choices:
        tokens = None
        if wants_logprobs:
            content_lp = (choice.get("logprobs") or {}).get("content") or []
            tokens = [entry.get("token") for entry in content_lp]
            top = spec.body["top_logprobs"]
            if any(len(entry.get("top_logprobs") or []) != top for entry in content_lp):
                results.append("error")
                problems.append(f"choice {choice.get('index')}: top_logprobs not {top} long")
        content = (choice.get("message") or {}).get("content")
        result, found = _check_choice(
            forcing, spec, choice.get("index"), content, choice.get("finish_reason"), tokens
        )
        results.append(result)
        problems += found
    usage = data.get("usage") or {}
    if usage.get("completion_tokens") != spec.n * spec.k:
        results.append("error")
        problems.append(f"usage.completion_tokens {usage.get('completion_tokens')} != n x k")
    return _worst(results), problems


def check_stream(forcing: Forcing, spec: Spec, lines: list[str]) -> tuple[str, list[str]]:
    problems: list[str] = []
    results: list[str | None] = []
    content: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    tokens: dict[int, list[str]] = {}
    ids = set()
    done = False
    for line in lines:
        if not line:
            continue
        if done:
            results.append("error")
            problems.append(f"line after [DONE]: {line[:100]!r}")
            continue
        if not line.startswith("data: "):
            results.append("error")
            problems.append(f"not a data line: {line[:100]!r}")
            continue
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            done = True
            continue
        chunk = json.loads(payload)
        if "error" in chunk:
            results.append("error")
            problems.append(f"error event: {payload[:300]}")
            continue
        ids.add(chunk.get("id"))
        for choice in chunk.get("choices") or []:
            index = choice.get("index")
            content[index] = content.get(index, "") + (
                (choice.get("delta") or {}).get("content") or ""
            )
            if choice.get("finish_reason") is not None:
                finish[index] = choice["finish_reason"]
            for entry in (choice.get("logprobs") or {}).get("content") or []:
                tokens.setdefault(index, []).append(entry.get("token"))
    if not done:
        results.append("lost")
        problems.append("stream ended without data: [DONE]")
    if len(ids) > 1:
        results.append("mixed_up")
        problems.append(f"chunks carry {len(ids)} different ids: {sorted(map(str, ids))[:4]}")
    wants_logprobs = spec.body.get("logprobs")
    for index in range(spec.n):
        result, found = _check_choice(
            forcing,
            spec,
            index,
            content.get(index, ""),
            finish.get(index),
            tokens.get(index, []) if wants_logprobs else None,
        )
        results.append(result)
        problems += found
    extra = set(content) - set(range(spec.n))
    if extra:
        results.append("mixed_up")
        problems.append(f"unexpected choice indexes {sorted(extra)}")
    return _worst(results), problems


def check_error_envelope(response: httpx.Response) -> list[str]:
    try:
        error = response.json().get("error")
    except ValueError:
        return [f"400 body is not JSON: {response.text[:200]!r}"]
    if not isinstance(error, dict) or not ENVELOPE_KEYS <= set(error):
        return [f"400 body lacks the error envelope: {response.text[:200]!r}"]
    if error.get("status") != 400:
        return [f"envelope status {error.get('status')!r} != 400"]
    return []


def run_one(client: httpx.Client, forcing: Forcing, spec: Spec, retry_429: bool = True) -> Outcome:
    outcome = Outcome(spec, "error")
    for _attempt in range(100):
        started = time.monotonic()
        try:
            streaming = isinstance(spec.body, dict) and bool(spec.body.get("stream"))
            response = client.send(_request(client, spec), stream=True)
            try:
                outcome.status = response.status_code
                outcome.statuses.append(response.status_code)
                if response.status_code == 429:
                    wait = float(response.headers.get("retry-after", "1"))
                    outcome.retry_after.append(wait)
                    response.read()
                    if retry_429:
                        time.sleep(min(wait, 30.0))
                        continue
                    outcome.result = "rejected_429"
                    return outcome
                if spec.kind == "bad":
                    response.read()
                    if response.status_code != 400:
                        outcome.problems.append(
                            f"bad request answered {response.status_code}: {response.text[:300]!r}"
                        )
                        return outcome
                    outcome.problems = check_error_envelope(response)
                    outcome.result = "error" if outcome.problems else "rejected"
                    return outcome
                if response.status_code != 200:
                    response.read()
                    outcome.problems.append(
                        f"answered {response.status_code}: {response.text[:300]!r}"
                    )
                    return outcome
                if spec.kind == "disconnect":
                    want = random.Random(spec.label).randint(1, 2)
                    seen = 0
                    for line in response.iter_lines():
                        if line:
                            seen += 1
                            if seen >= want:
                                break
                    outcome.result = "disconnected"
                    return outcome  # the finally closes the half-read stream
                if streaming:
                    lines = list(response.iter_lines())
                    outcome.latency = time.monotonic() - started
                    outcome.result, outcome.problems = check_stream(forcing, spec, lines)
                else:
                    response.read()
                    outcome.latency = time.monotonic() - started
                    outcome.result, outcome.problems = check_json(forcing, spec, response.json())
                return outcome
            finally:
                response.close()
        except (httpx.HTTPError, ValueError) as exc:
            outcome.result = "error"
            outcome.problems.append(f"{type(exc).__name__}: {exc}")
            return outcome
    outcome.problems.append("still 429 after 100 attempts")
    return outcome


# ---------------------------------------------------------------------------------------------
# phases


def health(client: httpx.Client) -> dict:
    return client.get("/health", timeout=10).json()


def wait_drained(client: httpx.Client, limit: float) -> tuple[float | None, int]:
    """Seconds until /health reports no slot in use (None: not within ``limit``), last count."""
    started = time.monotonic()
    count = -1
    while time.monotonic() - started <= limit:
        count = health(client)["requests"]
        if count == 0:
            return time.monotonic() - started, 0
        time.sleep(0.05)
    return None, count


def calibrate(client: httpx.Client, forcing: Forcing) -> None:
    """Learn whether the decoder strips one leading space, from a token that starts with one."""
    token = next(t for t in forcing.ids if forcing.text[t].startswith(" "))
    forcing.owner[token] = "calibration"
    k = 3
    body = {"messages": _MESSAGES, "max_tokens": k, "temperature": 0.0}
    body["logit_bias"] = {str(token): 100}
    response = client.post(ROUTE, json=body, timeout=120)
    response.raise_for_status()
    content = response.json()["choices"][0]["message"]["content"]
    text = forcing.text[token] * k
    if content == text[1:]:
        forcing.strip_one_space = True
    elif content == text:
        forcing.strip_one_space = False
        print("note: the server keeps the leading space of an output", flush=True)
    else:
        raise SystemExit(
            f"forcing does not work: logit_bias {{{token}: 100}} (text {forcing.text[token]!r}), "
            f"max_tokens {k} gave {content!r}, expected {text[1:]!r} or {text!r}"
        )


def warm_up(url: str, forcing: Forcing, clients: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    problems = []
    with httpx.Client(base_url=url, timeout=120) as client:
        calibrate(client, forcing)
        for kind in ("plain", "azure", "stream", "n2", "logprobs", "disconnect", "bad"):
            outcome = run_one(client, forcing, make_spec(rng, forcing, f"warm-{kind}", kind))
            problems += [f"warm-up {kind}: {p}" for p in outcome.problems]
    specs = [make_spec(rng, forcing, f"warm-burst-{i}") for i in range(clients)]
    outcomes = _parallel(url, forcing, specs)
    problems += [f"{o.spec.label}: {p}" for o in outcomes for p in o.problems]
    return problems


def _parallel(url: str, forcing: Forcing, specs: list[Spec], retry_429: bool = True) -> list:
    """Fires the specs at once, one thread and client each; returns their outcomes."""
    barrier = threading.Barrier(len(specs))
    outcomes: list[Outcome | None] = [None] * len(specs)

    def fire(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            barrier.wait()
            outcomes[i] = run_one(client, forcing, specs[i], retry_429=retry_429)

    threads = [threading.Thread(target=fire, args=(i,), daemon=True) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    return [o for o in outcomes if o is not None]


def load(
    args: argparse.Namespace,
    url: str,
    forcing: Forcing,
    server: Server,
    total: int,
    prefix: str = "req",
) -> tuple[list[Outcome], float, list[list[int]]]:
    """Runs ``total`` requests from ``args.clients`` threads; also samples the server's RSS every
    50 requests ([done, kB] pairs)."""
    outcomes: list[Outcome] = []
    samples: list[list[int]] = []
    lock = threading.Lock()
    counter = itertools.count()
    stop = threading.Event()

    def client_loop(worker: int) -> None:
        rng = random.Random(f"{args.seed}-{prefix}-{worker}")
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                index = next(counter)
                if index >= total:
                    return
                spec = make_spec(rng, forcing, f"{prefix}-{index}")
                outcome = run_one(client, forcing, spec)
                with lock:
                    outcomes.append(outcome)
                    done = len(outcomes)
                if done % 50 == 0:
                    rss = server.rss_kb()
                    samples.append([done, rss])
                    print(f"  {prefix}: {done}/{total} done; RSS {rss / 1024:.1f} MB", flush=True)

    started = time.monotonic()
    threads = [
        threading.Thread(target=client_loop, args=(w,), daemon=True) for w in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    finally:
        stop.set()
    return outcomes, time.monotonic() - started, samples


def flood(url: str, forcing: Forcing, max_queue: int) -> dict:
    rng = random.Random(4242)
    specs = [make_spec(rng, forcing, f"flood-{i}", "plain") for i in range(4 * max_queue)]
    for spec in specs:
        spec.k = spec.body["max_tokens"] = 16
    started = time.monotonic()
    outcomes = _parallel(url, forcing, specs, retry_429=False)
    seconds = time.monotonic() - started
    statuses = Counter(str(o.status) for o in outcomes)
    bad = [o for o in outcomes if o.result not in ("completed", "rejected_429")]
    retry_after = sorted({w for o in outcomes for w in o.retry_after})
    # right after the flood: one request must be served at once
    spec = make_spec(rng, forcing, "flood-recovery", "plain")
    started_recovery = time.monotonic()
    with httpx.Client(base_url=url, timeout=RECOVERY_LIMIT + 5) as client:
        recovery = run_one(client, forcing, spec, retry_429=False)
        recovery_seconds = time.monotonic() - started_recovery
        drained, left = wait_drained(client, DRAIN_LIMIT)
    recovered = (
        recovery.status == 200
        and recovery.result == "completed"
        and recovery_seconds <= RECOVERY_LIMIT
        and drained is not None
    )
    return {
        "requests": len(specs),
        "seconds": round(seconds, 2),
        "status_200": statuses.get("200", 0),
        "status_429": statuses.get("429", 0),
        "other": {s: c for s, c in statuses.items() if s not in ("200", "429")},
        "wrong_200s": len([o for o in bad if o.status == 200]),
        "retry_after": retry_after,
        "recovery_status": recovery.status,
        "recovery_seconds": round(recovery_seconds, 3),
        "drain_seconds": None if drained is None else round(drained, 3),
        "slots_left": left,
        "recovered": recovered,
        "problems": [f"{o.spec.label}: {p}" for o in [*bad, recovery] for p in o.problems],
    }


# ---------------------------------------------------------------------------------------------
# report


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(outcomes: list[Outcome], seconds: float) -> dict:
    results = Counter(o.result for o in outcomes)
    statuses = Counter(str(s) for o in outcomes for s in o.statuses)
    checked_ok = [o for o in outcomes if o.result == "completed"]
    latencies = [o.latency for o in outcomes if o.latency > 0]
    p50 = percentile(latencies, 0.50)
    p95 = percentile(latencies, 0.95)
    return {
        "requests": len(outcomes),
        "completed": len(latencies),
        "completed_ok": len(checked_ok),
        "disconnected": results["disconnected"],
        "rejected_400_ok": results["rejected"],
        "mixed_up": results["mixed_up"],
        "lost": results["lost"],
        "other_errors": results["error"],
        "status_counts": dict(sorted(statuses.items())),
        "status_5xx": sum(c for s, c in statuses.items() if s.startswith("5")),
        "retried_429": statuses.get("429", 0),
        "kinds": dict(sorted(Counter(o.spec.kind for o in outcomes).items())),
        "latency_p50_s": None if p50 is None else round(p50, 3),
        "latency_p95_s": None if p95 is None else round(p95, 3),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(outcomes) / seconds, 2) if seconds else None,
    }


def print_table(report: dict) -> None:
    load_ = report["load"]
    rss = report["rss"]
    fl = report["flood"]
    warm = report["warm_up_load"]
    rows = [
        ("requests (clients)", f"{load_['requests']} ({report['config']['clients']})"),
        ("completed (checked ok)", f"{load_['completed']} ({load_['completed_ok']})"),
        ("disconnected", load_["disconnected"]),
        ("bad -> 400 envelope", load_["rejected_400_ok"]),
        ("mixed_up / lost", f"{load_['mixed_up']} / {load_['lost']}"),
        ("other errors / 5xx", f"{load_['other_errors']} / {load_['status_5xx']}"),
        ("status counts", ", ".join(f"{s} x{c}" for s, c in load_["status_counts"].items())),
        ("latency p50 / p95 (s)", f"{load_['latency_p50_s']} / {load_['latency_p95_s']}"),
        ("requests/s (wall s)", f"{load_['requests_per_s']} ({load_['seconds']})"),
        (
            "server RSS MB",
            f"{rss['baseline_kb'] / 1024:.1f} -> {rss['after_kb'] / 1024:.1f} "
            f"({rss['growth_pct']:+.2f} %; 2nd half of the load "
            f"{rss['second_half_growth_pct']:+.2f} %)",
        ),
        (
            "RSS MB before warm-up load",
            f"{rss['fresh_kb'] / 1024:.1f} (then {warm['requests']} requests: "
            f"{warm['completed_ok']} checked ok, {warm['mixed_up']} mixed up, {warm['lost']} lost)",
        ),
        (
            "slot drain (s)",
            report["drain_seconds"]
            if report["drain_seconds"] is not None
            else f"NOT DRAINED ({report['slots_left']} left)",
        ),
        (
            f"flood {fl['requests']} at once",
            f"200 x{fl['status_200']}, 429 x{fl['status_429']}, other {fl['other']}, "
            f"Retry-After {fl['retry_after']}",
        ),
        (
            "flood recovery",
            f"{fl['recovery_status']} in {fl['recovery_seconds']} s, "
            f"drained in {fl['drain_seconds']} s",
        ),
        ("server log ERROR lines", len(report["server_errors"])),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n==== soak_server summary ====")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for target, ok in report["targets"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {target}")
    print("PASSED" if report["passed"] else "FAILED")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="exported model folder (default: the tiny int4 model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="model threads of the server")
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=1000,
        help="mixed requests (checked too) before the RSS baseline; the server's RSS climbs to "
        "a plateau (a high-water mark) over its first ~600-1200 requests",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/soak_server.json"))
    parser.add_argument("--server-log", type=Path, default=None, help="keep the server log here")
    args = parser.parse_args(argv)
    if args.warmup_requests < 0:
        parser.error("--warmup-requests must be >= 0")
    if min(args.clients, args.requests, args.max_queue, args.threads) < 1:
        parser.error("--clients, --requests, --max-queue and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model:
        model = Path(args.model)
    else:
        from phi3edge.cli import tiny_demo_model

        model = tiny_demo_model()
    forcing = Forcing(model, args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="phi3edge-soak-")
    log_path = args.server_log or Path(tmp.name) / "server.log"
    started = time.monotonic()
    flags = ["--threads", str(args.threads), "--max-queue", str(args.max_queue)]
    server = Server(model, log_path, flags)
    try:
        url = server.url
        print(f"server: {url} ({model})", flush=True)
        warm_problems = warm_up(url, forcing, args.clients, args.seed)
        for problem in warm_problems[:10]:
            print("warm-up problem: " + problem, flush=True)
        rss_fresh = server.rss_kb()
        print(f"server RSS after the first warm-up requests: {rss_fresh / 1024:.1f} MB")
        warm_outcomes: list[Outcome] = []
        warm_samples: list[list[int]] = []
        if args.warmup_requests:
            print(f"warm-up load: {args.warmup_requests} requests", flush=True)
            warm_outcomes, _, warm_samples = load(
                args, url, forcing, server, args.warmup_requests, "warm"
            )
        with httpx.Client(base_url=url) as client:
            wait_drained(client, DRAIN_LIMIT)
        time.sleep(0.5)
        rss_baseline = server.rss_kb()
        print(f"warm; server RSS {rss_baseline / 1024:.1f} MB; load starts", flush=True)
        outcomes, seconds, rss_samples = load(args, url, forcing, server, args.requests)
        with httpx.Client(base_url=url) as client:
            drain_seconds, slots_left = wait_drained(client, DRAIN_LIMIT)
        rss_after = server.rss_kb()
        print("flood ...", flush=True)
        flood_report = flood(url, forcing, args.max_queue)
    except KeyboardInterrupt:
        print("interrupted; stopping the server", flush=True)
        return 130
    finally:
        server.stop()
    server_errors = server.errors()
    tmp.cleanup()

    load_report = summarize(outcomes, seconds)
    warm_report = summarize(warm_outcomes, 1.0)
    growth = 100.0 * (rss_after - rss_baseline) / rss_baseline
    half = [kb for done, kb in rss_samples if done <= args.requests // 2]
    late_growth = 100.0 * (rss_after - half[-1]) / half[-1] if half else None
    problems = [
        f"{o.spec.label} ({o.spec.kind}): {p}"
        for o in [*warm_outcomes, *outcomes]
        for p in o.problems
    ]
    both = [load_report, warm_report]
    targets = {
        "0 mixed up": sum(r["mixed_up"] for r in both) == 0,
        "0 lost": sum(r["lost"] for r in both) == 0,
        "0 x 5xx": sum(r["status_5xx"] for r in both) == 0 and not flood_report["other"],
        "0 other errors": sum(r["other_errors"] for r in both) == 0
        and not flood_report["problems"]
        and not warm_problems,
        f"RSS growth < {RSS_GROWTH_LIMIT:g} %": growth < RSS_GROWTH_LIMIT,
        "all slots free after the load": drain_seconds is not None,
        "flood recovered": flood_report["recovered"],
    }
    report = {
        "config": {
            "model": str(model),
            "clients": args.clients,
            "requests": args.requests,
            "max_queue": args.max_queue,
            "threads": args.threads,
            "seed": args.seed,
            "warmup_requests": args.warmup_requests,
        },
        "load": load_report,
        "warm_up_load": {
            key: warm_report[key]
            for key in ("requests", "completed_ok", "mixed_up", "lost", "other_errors")
        },
        "rss": {
            "fresh_kb": rss_fresh,
            "baseline_kb": rss_baseline,
            "after_kb": rss_after,
            "growth_pct": round(growth, 2),
            "second_half_growth_pct": None if late_growth is None else round(late_growth, 2),
            "warm_up_samples": warm_samples,
            "samples": rss_samples,
        },
        "drain_seconds": None if drain_seconds is None else round(drain_seconds, 3),
        "slots_left": slots_left,
        "flood": flood_report,
        "server_errors": server_errors[:20],
        "warm_up_problems": warm_problems[:20],
        "problems": problems[:50],
        "targets": targets,
        "passed": all(targets.values()),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    for problem in problems[:15] + flood_report["problems"][:5]:
        print("problem: " + problem)
    for line in server_errors[:5]:
        print("server log: " + line[:300])
    print_table(report)
    line = json.dumps(report, sort_keys=True)
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(line + "\n", encoding="utf-8")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
