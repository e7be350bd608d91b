"""LoRA adapters: decode speed with an adapter vs the base, and each adapter's cost to add and load.

Usage: python scripts/bench_adapters.py [--threads 2] [--repeats 5] [--prompt 128] [--new 128]

On a mid-size random Phi-3-mini (hidden 1024, 16 heads, 8 layers, intermediate 2816: about 170M
parameters, INT4; never the full size, which would cost this shared machine minutes and GBs) and
two random PEFT LoRA adapters written by PEFT: rank 16 on all four projections, rank 64 on the
attention ones. Side by side in one run, medians of ``--repeats``, ratios as the median of each
round's ratio (the machine is shared, so absolute rates drift between rounds):
- on one loaded model, turns interleaved with the order rotating every round: the base (no
  adapter) and each adapter active;
- the base model from the plain export (as ``phi3edge export`` writes it without adapters) and
  from the adapter-ready graph (after ``adapter add``: empty LoRA inputs), each run in a fresh
  process, alternating: what adding adapters costs requests for the base.
Also per adapter: ``adapter add`` time, file size, and the time and RSS growth of loading it
into a loaded model (``og.Adapters.load``). Needs the ``test`` extra (PEFT).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from benchlib import MID, MID_LAYERS, bench_arguments, machine, mid_model, table  # noqa: E402

from phi3edge import adapters, fixtures, runtime  # noqa: E402
from phi3edge.benchmark import NO_END, prompt_ids, time_generation  # noqa: E402
from phi3edge.schema import SamplingConfig  # noqa: E402

LORAS = {
    "r16-all": {"targets": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "rank": 16},
    "r64-attn": {"targets": ("qkv_proj", "o_proj"), "rank": 64},
}


def peft_adapters(checkpoint: Path) -> dict[str, Path]:
    out = {}
    for name, spec in LORAS.items():
        folder = checkpoint.with_name(f"{checkpoint.name}-lora-{name}")
        if not (folder / adapters.CONFIG).exists():
            print(f"writing PEFT adapter {name} to {folder} ...", flush=True)
            fixtures.write_random_lora(checkpoint, folder, seed=len(out) + 1, **spec)
        out[name] = folder
    return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def adapter_speed(model: Any, names: list[str], args: Any) -> dict[str, dict[str, float]]:
    """Base (no adapter) and each adapter on one loaded model, turns interleaved with the order
    rotating every round; the ratio is the median of each round's adapter / base."""
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, seed=0, logit_bias=NO_END)
    ids = prompt_ids(args.prompt)
    runs: list[str | None] = [None, *names]
    for adapter in runs:  # warm-up
        time_generation(model, ids[:16], 2, cfg, adapter=adapter)
    timings: dict[str | None, list[Any]] = {a: [] for a in runs}
    for repeat in range(args.repeats):
        print(f"round {repeat + 1} of {args.repeats}", flush=True)
        for adapter in runs[repeat % len(runs) :] + runs[: repeat % len(runs)]:
            timings[adapter].append(time_generation(model, ids, args.new, cfg, adapter=adapter))
    out = {}
    for adapter, measured in timings.items():
        ratios = [
            t.decode_tok_s / b.decode_tok_s for t, b in zip(measured, timings[None], strict=True)
        ]
        out["base (no adapter)" if adapter is None else f"adapter {adapter}"] = {
            "prefill_tok_s": round(statistics.median(t.prefill_tok_s for t in measured), 1),
            "decode_tok_s": round(statistics.median(t.decode_tok_s for t in measured), 2),
            "decode_vs_base": round(statistics.median(ratios), 3),
        }
    return out


CHILD = """
import sys
from phi3edge import runtime
from phi3edge.benchmark import NO_END, prompt_ids, time_generation
from phi3edge.schema import SamplingConfig
folder, threads, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = runtime.load(folder, threads=threads)
cfg = SamplingConfig(temperature=0.7, top_p=0.9, seed=0, logit_bias=NO_END)
time_generation(model, prompt_ids(16), 2, cfg)
print(time_generation(model, prompt_ids(prompt), new, cfg).decode_tok_s)
"""


def graph_overhead(plain: Path, ready: Path, args: Any) -> dict[str, float]:
    """Decode speed of the base model from the plain export and from the adapter-ready graph
    (empty LoRA inputs), each run in a fresh process (two models in one process disturb each
    other's timings: the one loaded second ran 40% faster here), alternating."""
    runs: dict[str, list[float]] = {"plain export": [], "adapter-ready graph": []}
    for repeat in range(args.repeats):
        order = [("plain export", plain), ("adapter-ready graph", ready)]
        for label, folder in order if repeat % 2 == 0 else order[::-1]:
            command = [sys.executable, "-c", CHILD, str(folder), str(args.threads),
                       str(args.prompt), str(args.new)]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[label].append(float(result.stdout.split()[-1]))
    ratios = [r / p for r, p in zip(runs["adapter-ready graph"], runs["plain export"], strict=True)]
    out = {label: round(statistics.median(v), 2) for label, v in runs.items()}
    return {**out, "ratio": round(statistics.median(ratios), 3)}


def main() -> None:
    parser = bench_arguments(__doc__ or "")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.set_defaults(repeats=5)
    args = parser.parse_args()
    checkpoint, plain_dir = mid_model()
    peft = peft_adapters(checkpoint)
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        lora_dir = Path(tmp) / "model"
        shutil.copytree(plain_dir, lora_dir)
        per_adapter: dict[str, dict[str, Any]] = {}
        for name, folder in peft.items():
            started = time.perf_counter()
            entry = adapters.add(lora_dir, name, folder, progress=print)
            per_adapter[name] = {
                "rank": entry["rank"],
                "targets": entry["targets"],
                "add_s": round(time.perf_counter() - started, 2),
                "file_mb": round((lora_dir / entry["file"]).stat().st_size / 1e6, 2),
            }
        ready = runtime.load(lora_dir, threads=args.threads)
        import onnxruntime_genai as og

        fresh = og.Adapters(ready.model)  # load each again, alone, to time it
        for name, entry in ready.manifest.adapters.items():
            before, started = rss_mb(), time.perf_counter()
            fresh.load(str(lora_dir / entry["file"]), name)
            per_adapter[name]["load_s"] = round(time.perf_counter() - started, 4)
            per_adapter[name]["rss_growth_mb"] = round(rss_mb() - before, 1)
        del fresh
        speed = adapter_speed(ready, list(peft), args)
        del ready
        overhead = graph_overhead(plain_dir, lora_dir, args)
    print()
    print(
        f"mid-size random Phi-3-mini (hidden {MID['hidden_size']}, {MID_LAYERS} layers) INT4, "
        f"{args.prompt}-token prompt, {args.new} new tokens, {args.threads} threads, "
        f"medians of {args.repeats}; {machine()}"
    )
    print(
        table(
            ["run (one loaded model)", "prefill tok/s", "decode tok/s", "decode / base"],
            [
                [k, v["prefill_tok_s"], v["decode_tok_s"], v["decode_vs_base"]]
                for k, v in speed.items()
            ],
        )
    )
    print()
    print(
        table(
            ["base model, fresh process per run", "decode tok/s"],
            [[k, v] for k, v in overhead.items() if k != "ratio"]
            + [["adapter-ready / plain (median of per-round ratios)", overhead["ratio"]]],
        )
    )
    print()
    print(
        table(
            ["adapter", "rank", "targets", "adapter add s", "file MB", "load s", "RSS growth MB"],
            [
                [
                    n,
                    a["rank"],
                    ", ".join(a["targets"]),
                    a["add_s"],
                    a["file_mb"],
                    a["load_s"],
                    a["rss_growth_mb"],
                ]
                for n, a in per_adapter.items()
            ],
        )  # fmt: skip
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "model": {**MID, "num_hidden_layers": MID_LAYERS, "precision": "int4"},
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "threads": args.threads,
        "repeats": args.repeats,
        "speed": speed,
        "base_graph_overhead": overhead,
        "adapters": per_adapter,
    }
    path = args.out / "bench_adapters.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
