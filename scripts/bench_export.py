"""Time and peak RSS of exporting a full-size random-weight Phi-3 checkpoint to INT4.

Usage: python scripts/bench_export.py [--member phi-3-mini-4k] [--stock]

Builds (once, cached under PHI3EDGE_CACHE or ~/.cache/phi3edge/bench) a random checkpoint with the
member's exact published architecture, then runs ``phi3edge export`` in a child process and reports
its wall time and peak resident memory (the kernel's ru_maxrss of the child), split into anonymous
and file-backed pages. ``--stock`` also runs onnxruntime-genai's builder exactly as its CLI does,
for the side-by-side figure (it needs about 3x the checkpoint in RAM: 23.9 GB for Phi-3-mini, so
run nothing else meanwhile).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi3edge import fixtures
from phi3edge.cli import cache_dir

# Each exporter runs in a child that samples its own /proc/self/status, so the peak splits into
# anonymous memory (what must fit in RAM) and file-backed pages (mapped weights and spill files,
# which the kernel can drop and re-read under pressure).
SAMPLED = """
import json, sys, threading, time
peak = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
report, src, out, cache = sys.argv[1:5]
try:
    CODE
finally:
    open(report, "w").write(json.dumps(peak))
"""
OURS = "from phi3edge.cli import main; main(['export', src, out])"
STOCK = (
    "from phi3edge.export import load_builder; builder = load_builder(); "
    "extra = builder.parse_extra_options(None, src, out, 'int4', 'cpu', cache, ['block_size=32']); "
    "builder.create_model(None, src, out, 'int4', 'cpu', cache, **extra)"
)


def run_child(code: str, src: Path, out: Path, tmp: str) -> tuple[float, float, float, float]:
    """Run one exporter in a child; (seconds, peak RSS, peak anonymous, peak file-backed) in GB."""
    report = Path(tmp) / "peak.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    program = SAMPLED.replace("CODE", code)
    argv = [sys.executable, "-c", program, str(report), str(src), str(out), tmp + "/cache"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print(
            "warning: an earlier child had a higher peak; figure is a lower bound", file=sys.stderr
        )
    sampled = json.loads(report.read_text())
    gb = 1024 * 1024
    return seconds, peak_kb / gb, sampled["RssAnon"] / gb, sampled["RssFile"] / gb


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
        rows = [("phi3edge export", *run_child(OURS, checkpoint, ours_dir, tmp))]
        onnx_gb = sum(p.stat().st_size for p in ours_dir.iterdir()) / 1e9
        if args.stock:
            stock_dir = Path(tmp) / "stock"
            rows.append(("stock builder", *run_child(STOCK, checkpoint, stock_dir, tmp)))
            same = all(
                filecmp.cmp(ours_dir / name, stock_dir / name, shallow=False)
                for name in ("model.onnx", "model.onnx.data")
            )
            print(f"outputs byte-identical: {same}")
        shutil.rmtree(ours_dir)

    print(f"\n{args.member}: bf16 checkpoint {size_gb:.2f} GB -> INT4 ONNX folder {onnx_gb:.2f} GB")
    print(f"{'exporter':<18}{'time':>8}{'peak RSS':>10}{'anonymous':>11}{'file-backed':>13}")
    for name, secs, rss, anon, file in rows:
        print(f"{name:<18}{secs:>7.0f}s{rss:>7.1f} GB{anon:>8.1f} GB{file:>10.1f} GB")
    if len(rows) == 2:
        print(f"peak RSS ratio ours/stock: {rows[0][2] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()
