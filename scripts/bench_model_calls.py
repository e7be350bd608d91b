"""What one onnxruntime-genai call costs on full-size random Phi-3-mini-4k INT4, and what it blocks.

Usage: python scripts/bench_model_calls.py [--threads 2] [--repeats 3] [--out results/]

Measures in one run, on this thread (the engine's facts, below the scheduling):
  - the GIL: while one 256-token ``append_tokens`` runs, how many turns a Python thread that only
    wants to tick every millisecond gets (0 = the call holds the GIL throughout);
  - prefill tok/s of a 512-token prompt appended in chunks of 512/256/128/64/32 tokens, and the
    longest single call (what ``engine.PREFILL_CHUNK`` trades);
  - a decode step with 1 row and with 8 rows (the ceiling of what batching can gain);
  - making a generator whose KV cache is preallocated for a new conversation (prompt + answer +
    ``engine.CACHE_HEADROOM``), the first time and after, against reusing a kept one
    (``rewind_to(0)``), which is what ``engine.PrefixCache`` does; and one for the whole context
    (what ``engine.PrefixCache.warm`` allocates with the model), the first time and after.
Speed does not depend on weight values, so these are real figures for Phi-3-mini.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from benchlib import bench_arguments, full_model, machine, table

from phi3edge import _sampling, engine, runtime

PROMPT = np.random.default_rng(0).integers(300, 32000, 512).astype(np.int32)


def gil_turns(model: runtime.LoadedModel) -> tuple[float, int]:
    """(seconds of one 256-token append, ticks another thread got meanwhile)."""
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.05)
    generator = engine._new_generator(model, 600, 1)
    started = time.perf_counter()
    generator.append_tokens(PROMPT[None, :256])
    ended = time.perf_counter()
    stop.set()
    ticker.join()
    return ended - started, sum(1 for t in ticks if started < t < ended)


def chunked_prefill(model: runtime.LoadedModel, chunk: int) -> tuple[float, float]:
    """(prefill tok/s, longest single call in seconds) for the 512-token prompt."""
    generator = engine._new_generator(model, 600, 1)
    longest = 0.0
    started = time.perf_counter()
    for offset in range(0, len(PROMPT), chunk):
        call = time.perf_counter()
        generator.append_tokens(PROMPT[None, offset : offset + chunk])
        longest = max(longest, time.perf_counter() - call)
    return len(PROMPT) / (time.perf_counter() - started), longest


def decode_step(model: runtime.LoadedModel, rows: int, steps: int = 12) -> float:
    """Median seconds of one forced decode step for ``rows`` rows (after a 15-token prefill)."""
    generator = engine._new_generator(model, 64, rows)
    generator.append_tokens(np.tile(PROMPT[:15], (rows, 1)))
    chosen = np.full(rows, 1234, np.int32)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        generator.get_logits()
        generator.set_logits(_sampling.force_logits(chosen, model.vocab_size))
        generator.generate_next_token()
        times.append(time.perf_counter() - started)
    return float(np.median(times[2:]))


def new_generator_s(model: runtime.LoadedModel, max_length: int) -> float:
    started = time.perf_counter()
    engine._new_generator(model, max_length, 1)
    return time.perf_counter() - started


def reuse_s(model: runtime.LoadedModel, max_length: int) -> float:
    generator = engine._new_generator(model, max_length, 1)
    generator.append_tokens(PROMPT[None, :8])
    started = time.perf_counter()
    generator.rewind_to(0)
    return time.perf_counter() - started


def main() -> None:
    args = bench_arguments(__doc__).parse_args()
    model = runtime.load(full_model(), threads=args.threads)
    results: dict[str, float] = {}
    capacity = 7 + engine.CACHE_HEADROOM  # a short chat turn kept for the next one
    first = new_generator_s(model, capacity)
    later = float(np.median([new_generator_s(model, capacity) for _ in range(args.repeats)]))
    reused = float(np.median([reuse_s(model, capacity) for _ in range(args.repeats)]))
    results["new_generator_first_s"], results["new_generator_s"] = first, later
    results["reused_generator_s"] = reused
    print(
        f"a generator for {capacity} tokens: new {first:.2f} s the first time, {later:.2f} s "
        f"after; a kept one rewound to the start {reused * 1000:.1f} ms"
    )
    whole = model.context_length  # what PrefixCache.warm allocates with the model
    first = new_generator_s(model, whole)
    later = float(np.median([new_generator_s(model, whole) for _ in range(args.repeats)]))
    results["new_generator_context_first_s"], results["new_generator_context_s"] = first, later
    print(
        f"a generator for the whole context ({whole} tokens, "
        f"{whole * model.kv_bytes_per_token / 1e9:.1f} GB of KV): new {first:.2f} s the first "
        f"time, {later:.2f} s after"
    )
    chunked_prefill(model, 64)  # warm-up
    seconds, turns = gil_turns(model)
    results["append256_s"], results["append256_other_thread_turns"] = seconds, turns
    print(f"one 256-token append: {seconds:.2f} s; turns another Python thread got: {turns}")
    rows = []
    for chunk in (512, 256, 128, 64, 32):
        runs = [chunked_prefill(model, chunk) for _ in range(args.repeats)]
        rate = float(np.median([r[0] for r in runs]))
        longest = float(np.median([r[1] for r in runs]))
        results[f"prefill_chunk{chunk}_tok_s"], results[f"prefill_chunk{chunk}_call_s"] = (
            rate,
            longest,
        )
        rows.append([chunk, f"{rate:.1f}", f"{longest:.2f}"])
        print(rows[-1], flush=True)
    print(table(["chunk tokens", "prefill tok/s", "longest call s"], rows))
    one, eight = decode_step(model, 1), decode_step(model, 8)
    results["decode_step_1row_s"], results["decode_step_8rows_s"] = one, eight
    print(
        f"decode step: 1 row {one:.3f} s, 8 rows {eight:.3f} s "
        f"(batching gains at most {8 * one / eight:.2f}x in decode)"
    )
    print(f"machine: {machine()}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_model_calls.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
