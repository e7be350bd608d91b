"""Turn the benchmark JSON files into the README's table and plot.

Usage: python scripts/report.py [--results results/] [--out docs/]

Reads ``bench_engine.json`` (scripts/bench_engine.py) and, when present, ``bench_quant.json``
(scripts/bench_quant.py) and ``bench_llamacpp.json`` (scripts/bench_llamacpp.py); writes
``benchmarks.md`` and ``benchmarks.png`` (needs matplotlib, which is not a phi3edge dependency:
``pip install matplotlib``). Every number comes from those files; nothing here measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from benchlib import machine, table


def engine_table(engine: dict[str, float]) -> str:
    rows = [
        [
            f"{length}-token prompt",
            f"{engine[f'raw_prefill_{length}']:.1f}",
            f"{engine[f'ours_prefill_{length}']:.1f}",
            f"{engine[f'raw_decode_{length}']:.2f}",
            f"{engine[f'ours_decode_{length}']:.2f}",
            f"{engine[f'ours_decode_{length}'] / engine[f'raw_decode_{length}']:.3f}",
        ]
        for length in (128, 512)
    ]
    return table(
        [
            "prompt",
            "raw prefill tok/s",
            "our prefill tok/s",
            "raw decode tok/s",
            "our decode tok/s",
            "decode ours/raw",
        ],
        rows,
    )


def quant_table(quant: list[dict]) -> str:
    """bench_quant.py's rows (the long-context decode column when the run measured it)."""
    long = next((q["decode_long_context"] for q in quant if q.get("decode_long_tok_s")), None)
    rows = []
    for q in quant:
        row = [q.get("label", q["config"]), f"{q['prefill_tok_s']:.1f}", f"{q['decode_tok_s']:.2f}"]
        if long:
            row.append(f"{q['decode_long_tok_s']:.2f}" if q.get("decode_long_tok_s") else "-")
        row += [f"{q['weights_gb']:.2f}", f"{q['cosine_min']:.3f}", f"{q['cosine_mean']:.3f}"]
        rows.append(row)
    decode = ["decode tok/s (128 ctx)", f"decode tok/s ({long} ctx)"] if long else ["decode tok/s"]
    return table(
        ["INT4 options", "prefill tok/s", *decode, "weights GB", "cosine min", "cosine mean"],
        rows,
    )


def llamacpp_table(runs: dict[str, dict[str, float]]) -> str:
    rows = [
        [name, f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}", f"{r['cosine_mean']:.3f}"]
        for name, r in runs.items()
    ]
    return table(
        ["runtime (same weights, same run)", "prefill tok/s", "decode tok/s", "cosine vs fp32"],
        rows,
    )


def plot(engine: dict[str, float], quant: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if quant else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    labels = ["prefill 128", "prefill 512", "decode 128", "decode 512"]
    keys = ["prefill_128", "prefill_512", "decode_128", "decode_512"]
    x = range(len(keys))
    ax.bar(
        [i - 0.2 for i in x],
        [engine[f"raw_{k}"] for k in keys],
        0.4,
        label="raw onnxruntime-genai (greedy)",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [engine[f"ours_{k}"] for k in keys],
        0.4,
        label="phi3edge, all sampling features",
    )
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title("Phi-3-mini-4k INT4, 2 threads")
    ax.legend(fontsize=8)
    if quant:
        ax = axes[0][1]
        names = [q.get("label", q["config"]).split(" (")[0] for q in quant]
        ax.barh(names, [q["decode_tok_s"] for q in quant])
        ax.set_xlabel("decode tokens/s")
        ax.set_title("INT4 export options")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    engine = json.loads((args.results / "bench_engine.json").read_text())
    quant_path = args.results / "bench_quant.json"
    quant = json.loads(quant_path.read_text()) if quant_path.exists() else []
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.fromtimestamp((args.results / "bench_engine.json").stat().st_mtime)
    parts = [
        f"# Benchmarks ({stamp:%Y-%m-%d}, {machine()})",
        "",
        "Full-size random-weight Phi-3-mini-4k INT4; speed does not depend on weight values.",
        "",
        engine_table(engine),
        "",
        f"- n=4 vs n=1 time to first token: {engine['n4_over_n1_prefill']:.2f}x; "
        f"total: {engine['n4_over_n1_total']:.2f}x",
        f"- time to first token, 1000-token chat + 50 new tokens: cold "
        f"{engine['ttft_cold_s']:.2f} s, cached {engine['ttft_cached_s']:.2f} s",
        f"- 8 requests, complete_batch vs one by one: "
        f"{engine['batch8_over_sequential_throughput']:.2f}x throughput",
        f"- peak RSS of the benchmark process: {engine['peak_rss_gb']:.2f} GB",
    ]
    if quant:
        parts += ["", quant_table(quant)]
    llama_path = args.results / "bench_llamacpp.json"
    if llama_path.exists():
        parts += ["", llamacpp_table(json.loads(llama_path.read_text()))]
    (args.out / "benchmarks.md").write_text("\n".join(parts) + "\n")
    plot(engine, quant, args.out / "benchmarks.png")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
