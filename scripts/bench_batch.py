"""Batch jobs: 64 requests of mixed lengths, `phi3edge batch` against one request at a time.

Usage: python scripts/bench_batch.py [--model DIR | --layers N] [--windows 1,2,4,8,16,32]
                                     [--active-batches 2] [--prefill-caps 4096]
                                     [--paddings none,25]
                                     [--step-costs 1,2,4,8,16] [--step-prompt 128]
                                     [--requests 64] [--threads 2] [--repeats 1] [--out results]

The model: an exported folder (``--model``), or the full-width random Phi-3-mini-4k INT4 with
``--layers`` decoder layers (built once and cached, like the other benchmarks; 32 is the real
depth). The runs, side by side in one run:
- one at a time: ``ChatService.complete`` for each request in turn (a plain loop);
- ``phi3edge batch``: ``phi3edge.batch.run`` (the code behind the command) for each ``--windows``
  value (requests in flight) under each combination of limits: ``--active-batches`` (batches
  the engine runs at once, ``Limits.max_active_batches``), ``--prefill-caps`` (padded tokens of
  a batched prefill, ``Limits.batch_prefill_tokens``) and ``--paddings`` (a batch's waste in
  percent of its real work, ``Limits.batch_padding_pct``; ``none``: no cap). The engine forms
  batches of the requests in flight (``engine.fits_in_batch``); the table reports the rows per
  batch it formed. Each combination loads its own model copy, one at a time.
``--step-costs 1,2,4,8,16`` first times one batch of that many rows on the engine's batch path:
its prefill and its decode step, so the best rows per batch can be read off.
Requests: prompts of 10 to 200 words, 16 to 64 new tokens each (``--prompt-words``,
``--answer-tokens``; the end tokens are banned so every request generates exactly its
``max_tokens``), seeded sampling at temperature 0.7.
With ``--repeats N`` the runs go round N times in turn (so a slow spell of a shared machine hits
all of them alike) and each figure is the median.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import bench_arguments, full_model, machine, table  # noqa: E402

from phi3edge import batch, engine, runtime  # noqa: E402
from phi3edge.benchmark import NO_END, prompt_ids  # noqa: E402
from phi3edge.limits import Limits  # noqa: E402
from phi3edge.prompt import Prompt  # noqa: E402
from phi3edge.schema import SamplingConfig, parse_request  # noqa: E402
from phi3edge.service import ChatService  # noqa: E402

WORDS = "the model answers every request of the file while the engine batches them".split()


PROMPT_WORDS = (10, 25, 50, 100, 200)
ANSWER_TOKENS = (16, 32, 48, 64)


def requests(
    count: int,
    seed: int = 0,
    prompt_words: tuple[int, ...] = PROMPT_WORDS,
    answer_tokens: tuple[int, ...] = ANSWER_TOKENS,
) -> list[str]:
    """Batch API lines of mixed prompt and answer lengths (each drawn from the given ones)."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice(prompt_words)))
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": rng.choice(answer_tokens),
            "temperature": 0.7,
            "seed": i,
            "logit_bias": {str(t): b for t, b in NO_END.items()},
        }
        lines.append(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return lines


def step_costs(
    model_dir: Path, threads: int, row_counts: list[int], prompt_tokens: int, steps: int
) -> list[dict[str, Any]]:
    """What a batch of ``rows`` costs on the engine's batch path (``engine.generate_batch``):
    its prefill (one append of rows x prompt tokens) and the median decode step."""
    model = runtime.load(model_dir, threads=threads)
    cfg = SamplingConfig(temperature=0.7, seed=0, logit_bias=NO_END)
    found = []
    # The first run warms the model up and is not reported; 1 row is always measured, as the
    # table's "vs 1 row" is against it.
    for rows in [1, *sorted({1, *row_counts})]:
        items = [
            engine.BatchItem(Prompt(prompt_ids(prompt_tokens, seed=r), steps), cfg)
            for r in range(rows)
        ]
        started = time.perf_counter()
        marks = [time.perf_counter() for _ in engine.generate_batch(model, items)]
        prefill_s = marks[0] - started
        step_s = statistics.median(b - a for a, b in zip(marks[:-1], marks[1:], strict=True))
        found.append(
            {
                "rows": rows,
                "prefill_tok_s": round(rows * prompt_tokens / prefill_s, 1),
                "decode_step_ms": round(step_s * 1e3, 1),
                "decode_tok_s": round(rows / step_s, 2),
            }
        )
        print(f"{rows} rows: {found[-1]}", flush=True)
    return found[1:]


def one_at_a_time(service: ChatService, lines: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    tokens = 0
    for text in lines:
        body = json.loads(text)["body"]
        tokens += service.complete(parse_request(body, route="openai")).usage.completion_tokens
    return _figures(len(lines), tokens, time.perf_counter() - started)


def batched(service: ChatService, lines: list[str], window: int) -> dict[str, Any]:
    stats = service.core.stats
    batches_before = stats.batches
    started = time.perf_counter()
    outputs = list(batch.run(service, lines, window=window))
    elapsed = time.perf_counter() - started
    bad = [o["custom_id"] for o in outputs if o["response"]["status_code"] != 200]
    if bad:
        raise SystemExit(f"requests failed: {bad[:5]}")
    tokens = sum(batch.completion_tokens(o) for o in outputs)
    figures = _figures(len(lines), tokens, elapsed)
    figures["batches"] = stats.batches - batches_before
    figures["rows_per_batch"] = round(len(lines) / figures["batches"], 2)
    return figures


def _figures(count: int, tokens: int, elapsed: float) -> dict[str, Any]:
    return {
        "seconds": round(elapsed, 2),
        "requests_per_s": round(count / elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "tokens": tokens,
    }


@contextlib.contextmanager
def _loaded(model: Path, threads: int, limits: Limits, lines: list[str]) -> Iterator[ChatService]:
    """A warmed-up model copy with ``limits``, closed after use: one copy in memory at a time
    (full-size Phi-3-mini with two 16-row batches reaches about 10 GB)."""
    service = ChatService(model, threads=threads, limits=limits)
    try:
        batched(service, lines[:4], window=4)  # warm-up
        yield service
    finally:
        service.close()


def _shown(padding: int | None) -> str:
    return "none" if padding is None else str(padding)


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def main() -> None:
    parser = bench_arguments(__doc__ or "")
    parser.set_defaults(repeats=1)
    parser.add_argument("--model", type=Path, help="an exported model folder")
    parser.add_argument(
        "--layers", type=int, default=4, help="without --model: full-width random Phi-3-mini depth"
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--prompt-words",
        default=",".join(map(str, PROMPT_WORDS)),
        help="prompt lengths in words, one drawn per request",
    )
    parser.add_argument(
        "--answer-tokens",
        default=",".join(map(str, ANSWER_TOKENS)),
        help="max_tokens values, one drawn per request (every request generates all of them)",
    )
    parser.add_argument(
        "--windows", default="1,2,4,8,16,32", help="requests in flight ('': no batch job runs)"
    )
    parser.add_argument(
        "--prefill-caps",
        default=str(batch.JOB_PREFILL_TOKENS),
        help="Limits.batch_prefill_tokens values to try (padded tokens of a batched prefill; "
        "default: a batch job's own value; a server's is 256)",
    )
    parser.add_argument(
        "--paddings",
        default=_shown(batch.JOB_PADDING_PCT),
        help="Limits.batch_padding_pct values to try (a batch's waste in percent of its real "
        "work; 'none': no cap; default: a batch job's own value)",
    )
    parser.add_argument(
        "--active-batches",
        default="2",
        help="batches the engine runs at once (Limits.max_active_batches), each tried per window",
    )
    parser.add_argument(
        "--step-costs",
        default="",
        help="rows per batch to time one batch's prefill and decode step at (e.g. 1,2,4,8,16)",
    )
    parser.add_argument(
        "--step-prompt", type=int, default=128, help="prompt tokens per row for --step-costs"
    )
    args = parser.parse_args()
    model = args.model or full_model("phi-3-mini-4k", "int4", layers=args.layers)
    if args.step_costs:
        counts = [int(r) for r in args.step_costs.split(",")]
        costs = step_costs(model, args.threads, counts, args.step_prompt, steps=16)
        one = costs[0]["decode_tok_s"] / costs[0]["rows"]
        print(
            f"\n{machine()}\nmodel {model}, {args.threads} threads, {args.step_prompt}-token "
            "prompts, 16 steps\n"
        )
        print(
            table(
                ["rows", "prefill tok/s", "decode step ms", "decode tok/s", "vs 1 row"],
                [
                    [
                        c["rows"],
                        c["prefill_tok_s"],
                        c["decode_step_ms"],
                        c["decode_tok_s"],
                        f"{c['decode_tok_s'] / one:.2f}x",
                    ]
                    for c in costs
                ],
            )  # fmt: skip
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_batch_steps.json").write_text(
            json.dumps({"machine": machine(), "model": str(model), "steps": costs}, indent=2)
        )
    if not args.windows:
        return
    windows = [int(w) for w in args.windows.split(",")]
    actives = [int(a) for a in args.active_batches.split(",")]
    caps = [int(c) for c in args.prefill_caps.split(",")]
    paddings = [None if p == "none" else int(p) for p in args.paddings.split(",")]
    words = tuple(int(w) for w in args.prompt_words.split(","))
    answers = tuple(int(t) for t in args.answer_tokens.split(","))
    lines = requests(args.requests, prompt_words=words, answer_tokens=answers)
    limits = [
        Limits(
            max_queue=max(windows),
            max_active_batches=a,
            batch_prefill_tokens=c,
            batch_padding_pct=p,
        )
        for a in actives
        for c in caps
        for p in paddings
    ]
    rounds: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        with _loaded(model, args.threads, limits[0], lines) as service:
            rounds.setdefault("solo", []).append(one_at_a_time(service, lines))
        print(f"one at a time: {rounds['solo'][-1]}", flush=True)
        for limit in limits:
            with _loaded(model, args.threads, limit, lines) as service:
                for window in windows:
                    key = (
                        f"{window} in flight, {limit.max_active_batches} active, prefill cap "
                        f"{limit.batch_prefill_tokens}, padding cap "
                        f"{_shown(limit.batch_padding_pct)}"
                    )
                    rounds.setdefault(key, []).append(batched(service, lines, window))
                    print(f"{key}: {rounds[key][-1]}", flush=True)
    solo = _median(rounds["solo"])
    runs = {key: _median(found) for key, found in rounds.items() if key != "solo"}
    rows = [
        [
            "one at a time",
            "1",
            solo["seconds"],
            solo["requests_per_s"],
            solo["tokens_per_s"],
            "1.00x",
        ]
    ]
    for key, run in runs.items():
        ratio = solo["seconds"] / run["seconds"]  # the same requests: not the rounded rates
        rows.append(
            [f"phi3edge batch, {key}", run["rows_per_batch"], run["seconds"],
             run["requests_per_s"], run["tokens_per_s"], f"{ratio:.2f}x"]
        )  # fmt: skip
    headers = [
        "run",
        "rows per batch",
        "s",
        "requests/s",
        "tokens/s",
        "throughput vs one at a time",
    ]
    report = {
        "machine": machine(),
        "model": str(model),
        "threads": args.threads,
        "requests": args.requests,
        "prompt_words": words,
        "answer_tokens": answers,
        "repeats": args.repeats,
        "one_at_a_time": solo,
        "batch": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_batch.json").write_text(json.dumps(report, indent=2))
    print(
        f"\n{machine()}\nmodel {model}, {args.requests} requests (prompts of {words} words, "
        f"{answers} new tokens), {args.threads} threads, median of {args.repeats}\n"
    )
    print(table(headers, rows))


if __name__ == "__main__":
    main()
