"""Resident memory of a KV cache, preallocated or growing, against what the engine's ledger counts.

Usage: python scripts/bench_kv_memory.py [--threads 2] [--shapes 1x2048,4x512,4x1024]
                                         [--model EXPORTED_FOLDER]

For each shape ROWSxLENGTH and each layout, a fresh process (so one run's heap does not serve the
next) loads the model (default: the mid-size random Phi-3-mini, ``benchlib.mid_model``), makes a
generator through the engine's own ``engine._new_generator`` (the layout forced by the share it
may preallocate), prefills 16 tokens per row and decodes greedily to LENGTH. It reports the
process's peak resident memory above what it held before the generator (VmRSS, read every step),
the KV cache's final size, the ledger's figure (``runtime.KvLedger``: what the engine counts
against the memory free at load) and the decode speed (tokens of all rows per second, prefill
excluded); medians of ``--repeats`` rounds, each round running every shape and layout in turn.

The ledger counts a generator at its final KV size whatever its layout; this shows how far that is
from what the process really holds (README, Serving, Memory).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import bench_arguments, machine, mid_model, table

PREFILL = 16
MB = 1 << 20
MEDIANS = ("peak_resident_mb", "decode_tok_s")


def resident() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(folder: Path, threads: int, rows: int, length: int, preallocated: bool) -> dict:
    """One generator's run in this process (``--child``)."""
    from phi3edge import engine, runtime

    model = runtime.load(folder, threads)
    share = rows * length * model.kv_bytes_per_token if preallocated else 0
    model = dataclasses.replace(model, kv_preallocate_bytes=share, memory_free_at_load=None)
    ledger = model.kv_ledger
    assert ledger is not None
    before = resident()
    generator = engine._new_generator(model, length, rows)
    generator.append_tokens(np.full((rows, PREFILL), 300, dtype=np.int32))
    peak = resident()
    started = time.perf_counter()
    for _ in range(length - PREFILL):
        generator.generate_next_token()
        peak = max(peak, resident())
    seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "length": length,
        "layout": "preallocated" if preallocated else "growing",
        "kv_mb": rows * length * model.kv_bytes_per_token / MB,
        "ledger_mb": ledger.in_use / MB,
        "peak_resident_mb": (peak - before) / MB,
        "decode_tok_s": rows * (length - PREFILL) / seconds,
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        folder, threads, rows, length, preallocated = sys.argv[2:]
        result = measure(Path(folder), int(threads), int(rows), int(length), preallocated == "1")
        print(json.dumps(result))
        return
    parser = bench_arguments(__doc__)
    parser.add_argument(
        "--shapes", default="1x2048,4x512,4x1024", help="ROWSxLENGTH, comma-separated"
    )
    parser.add_argument("--model", type=Path, help="an exported model instead of the mid-size one")
    args = parser.parse_args()
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes: ROWSxLENGTH items such as 4x512, not {args.shapes}") from None
    if any(len(s) != 2 or s[0] < 1 or s[1] <= PREFILL for s in shapes):
        raise SystemExit(f"--shapes: rows >= 1 and length > {PREFILL}, not {args.shapes}")
    if args.model is not None and not (args.model / "genai_config.json").is_file():
        raise SystemExit(f"--model {args.model}: no genai_config.json there (not an export)")
    folder = args.model or mid_model()[1]
    runs: dict[tuple[int, int, bool], list[dict]] = {}
    for _ in range(args.repeats):  # alternating rounds: every shape and layout in each
        for count, length in shapes:
            for preallocated in (True, False):
                child = [sys.executable, __file__, "--child", str(folder), str(args.threads)]
                child += [str(count), str(length), "1" if preallocated else "0"]
                done = subprocess.run(child, check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(result, flush=True)
                runs.setdefault((count, length, preallocated), []).append(result)
    results, rows = [], []
    for samples in runs.values():
        result = {
            **samples[0],
            **{k: float(np.median([r[k] for r in samples])) for k in MEDIANS},
        }
        results.append(result)
        rows.append(
            [
                f"{result['rows']}x{result['length']}",
                result["layout"],
                f"{result['kv_mb']:.0f}",
                f"{result['ledger_mb']:.0f}",
                f"{result['peak_resident_mb']:.0f}",
                f"{result['peak_resident_mb'] / result['kv_mb']:.2f}",
                f"{result['decode_tok_s']:.1f}",
            ]
        )
    print(
        f"\nKV cache memory, {folder.name}, {args.threads} threads, "
        f"medians of {args.repeats} alternating rounds; {machine()}"
    )
    headers = ["rows x length", "layout", "KV MB", "ledger MB", "peak MB", "peak / KV", "tok/s"]
    print(table(headers, rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kv_memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
