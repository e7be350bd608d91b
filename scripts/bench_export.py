"""Time and peak RSS of exporting a full-size random-weight Phi-3 checkpoint to INT4.

Usage: python scripts/bench_export.py [--member phi-3-mini-4k] [--stock]

Builds (once, cached under PHI3EDGE_CACHE or ~/.cache/phi3edge/bench) a random checkpoint with the
member's exact published architecture, then runs ``phi3edge export`` in a child process and reports
its wall time and peak resident memory (the kernel's ru_maxrss of the child). ``--stock`` also runs
onnxruntime-genai's builder exactly as its CLI does, for the side-by-side figure (it needs about
3x the checkpoint in RAM: 23.9 GB for Phi-3-mini, so run nothing else meanwhile).
"""

from __future__ import annotations

import argparse
import filecmp
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi3edge import fixtures
from phi3edge.cli import cache_dir

STOCK = """
import sys
from phi3edge.export import load_builder
builder = load_builder()
src, out, cache = sys.argv[1:4]
extra = builder.parse_extra_options(None, src, out, "int4", "cpu", cache, ["block_size=32"])
builder.create_model(None, src, out, "int4", "cpu", cache, **extra)
"""


def run_child(argv: list[str]) -> tuple[float, float]:
    """Run a child process; return (seconds, its peak RSS in GB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print(
            "warning: an earlier child had a higher peak; figure is a lower bound", file=sys.stderr
        )
    return seconds, peak_kb / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", default="phi-3-mini-4k")
    parser.add_argument("--stock", action="store_true", help="also measure the stock builder")
    args = parser.parse_args()

    checkpoint = cache_dir() / "bench" / f"full-{args.member}-random"
    if not (checkpoint / "config.json").exists():
        print(f"building the full-size random {args.member} checkpoint in {checkpoint} ...")
        started = time.monotonic()
        fixtures.write_random_checkpoint(args.member, checkpoint, size="full")
        print(f"  {time.monotonic() - started:.0f} s")
    size_gb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1e9

    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as tmp:
        ours_dir = Path(tmp) / "ours"
        seconds, peak = run_child(
            [sys.executable, "-m", "phi3edge.cli", "export", str(checkpoint), str(ours_dir)]
        )
        onnx_gb = sum(p.stat().st_size for p in ours_dir.iterdir()) / 1e9
        rows = [("phi3edge export", seconds, peak)]
        if args.stock:
            stock_dir = Path(tmp) / "stock"
            rows.append(
                (
                    "stock builder",
                    *run_child(
                        [sys.executable, "-c", STOCK, str(checkpoint), str(stock_dir), tmp + "/c"]
                    ),
                )
            )
            same = all(
                filecmp.cmp(ours_dir / name, stock_dir / name, shallow=False)
                for name in ("model.onnx", "model.onnx.data")
            )
            print(f"outputs byte-identical: {same}")
        shutil.rmtree(ours_dir)

    print(f"\n{args.member}: bf16 checkpoint {size_gb:.2f} GB -> INT4 ONNX folder {onnx_gb:.2f} GB")
    print(f"{'exporter':<18}{'time':>9}{'peak RSS':>11}")
    for name, secs, gb in rows:
        print(f"{name:<18}{secs:>8.0f}s{gb:>9.1f} GB")
    if len(rows) == 2:
        print(f"peak RSS ratio ours/stock: {rows[0][2] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()
