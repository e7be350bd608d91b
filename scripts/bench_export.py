"""Time, peak RSS and peak scratch disk of exporting a full-size random-weight Phi-3 checkpoint.

Usage: python scripts/bench_export.py [--member phi-3-mini-4k] [--precision int4|fp32]
                                      [--layers N] [--compare REF] [--stock]
                                      [--flags "--quant-method k_quant_mixed ..."]

Builds (once, cached under PHI3EDGE_CACHE or ~/.cache/phi3edge/bench) a random checkpoint with the
member's exact published architecture, then runs ``phi3edge export`` in a child process and reports
its wall time, peak resident memory (the kernel's ru_maxrss of the child, and the child's own
samples split into anonymous and file-backed pages) and peak disk: the bytes allocated on disk
under the export's temporary folder, which holds the output and, through TMPDIR, every scratch file
of the exporter (holes punched in a file count as freed). Scratch = that peak minus the finished
output's size. ``--compare REF`` also runs ``phi3edge export`` as it was at git ref REF (say, the
commit before the streaming export) for the old-vs-new figure; ``--stock`` runs onnxruntime-genai's
builder exactly as its CLI does (it needs about 3x the checkpoint in RAM: 23.9 GB for Phi-3-mini, so
run nothing else meanwhile). Outputs are compared byte for byte. ``--layers N`` keeps the full
width with N layers (Phi-3.5-MoE's 84 GB checkpoint does not fit on this disk; its per-layer cost is
the difference between two depths). ``--flags``: more ``phi3edge export`` options, for both
phi3edge runs (say, a k-quant method, to time the quantizer).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import machine

from phi3edge import export, fixtures
from phi3edge.cli import cache_dir

REPO = Path(__file__).resolve().parents[1]

# Each exporter runs in a child that samples its own /proc/self/status (anonymous memory is what
# must fit in RAM; file-backed pages are mapped weights and spill files the kernel can drop) and
# the disk blocks allocated under the work folder.
SAMPLED = """
import json, os, sys, threading, time
peak = {"RssAnon": 0, "RssFile": 0, "disk": 0}
report, src, out, cache, work, tree = sys.argv[1:7]
# An editable install's import hook would answer "import phi3edge" before PYTHONPATH is looked at:
# drop it, and check that the phi3edge this child runs is the tree it was given.
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_")]
import phi3edge
assert phi3edge.__file__.startswith(os.path.join(tree, "phi3edge")), (phi3edge.__file__, tree)
def allocated(root):
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total
def sample():
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    peak[key] = max(peak[key], int(value.split()[0]) * 1024)
        peak["disk"] = max(peak["disk"], allocated(work))
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
try:
    CODE
finally:
    open(report, "w").write(json.dumps(peak))
"""
OURS = "from phi3edge.cli import main; assert main(['export', src, out, *PRECISION]) == 0"
STOCK = (
    "from phi3edge.export import load_builder; builder = load_builder(); "
    "extra = builder.parse_extra_options(None, src, out, PRECISION, 'cpu', cache, OPTIONS, "
    "target_options=TARGET); "
    "builder.create_model(None, src, out, PRECISION, 'cpu', cache, **extra)"
)
GB = 1e9


def run_child(code: str, src: Path, out: Path, work: Path, pythonpath: Path) -> dict[str, float]:
    """Run one exporter in a child; seconds, peak RSS / anonymous / file-backed, peak disk and
    scratch (GB)."""
    work.mkdir(parents=True)
    (work / "tmp").mkdir()
    report = work.parent / f"{work.name}-peak.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    program = SAMPLED.replace("CODE", code)
    argv = [sys.executable, "-c", program, str(report), str(src), str(out), str(work / "cache")]
    argv += [str(work), str(pythonpath)]
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "PYTHONPATH": str(pythonpath)}
    # cwd=work: ``python -c`` puts the cwd first on sys.path, which must not shadow ``pythonpath``
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd=work)
    seconds = time.monotonic() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print(
            "warning: an earlier child had a higher peak; figure is a lower bound", file=sys.stderr
        )
    sampled = json.loads(report.read_text())
    output = sum(p.stat().st_blocks * 512 for p in out.iterdir() if p.is_file())
    return {
        "time": seconds,
        "rss": peak_kb * 1024 / GB,
        "anon": sampled["RssAnon"] / GB,
        "file": sampled["RssFile"] / GB,
        "disk": sampled["disk"] / GB,
        "scratch": max(0, sampled["disk"] - output) / GB,
        "output": output / GB,
    }


def stock_layout(checkpoint: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The builder options and target options that give ``phi3edge export``'s default INT4
    layout for this checkpoint, so that the stock builder makes the same bytes."""
    config = json.loads((checkpoint / "config.json").read_text())
    int4 = export.default_int4(config["architectures"][0])
    return int4.builder_options(), int4.builder_target_options(config["num_hidden_layers"])


def checkout(ref: str, into: Path) -> Path:
    """The phi3edge package as it was at git ``ref``, extracted under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "phi3edge"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", default="phi-3-mini-4k")
    parser.add_argument("--precision", default="int4", choices=("int4", "fp32"))
    parser.add_argument("--compare", metavar="REF", help="also measure phi3edge export at REF")
    parser.add_argument("--stock", action="store_true", help="also measure the stock builder")
    parser.add_argument("--layers", type=int, help="full width, fewer layers")
    parser.add_argument("--flags", default="", help="more phi3edge export options (one string)")
    args = parser.parse_args()

    depth = f"-{args.layers}layers" if args.layers else ""
    checkpoint = cache_dir() / "bench" / f"full-{args.member}{depth}-random"
    if not (checkpoint / "config.json").exists():
        print(f"building the full-size random {args.member}{depth} checkpoint in {checkpoint} ...")
        started = time.monotonic()
        fixtures.write_random_checkpoint(args.member, checkpoint, size="full", layers=args.layers)
        print(f"  {time.monotonic() - started:.0f} s")
    size_gb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / GB
    default_layout = stock_layout(checkpoint)

    flags = ["--precision", args.precision, *shlex.split(args.flags)]
    ours = OURS.replace("*PRECISION", ", ".join(repr(f) for f in flags))
    if args.stock and args.flags:
        raise SystemExit("--stock runs the default layout only; drop --flags")
    stock = STOCK.replace("PRECISION", repr(args.precision))
    stock = stock.replace("OPTIONS", repr(default_layout[0] if args.precision == "int4" else []))
    stock = stock.replace("TARGET", repr(default_layout[1] if args.precision == "int4" else None))
    runs: list[tuple[str, str, Path]] = [("phi3edge export", ours, REPO)]
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as tmp:
        root = Path(tmp)
        if args.compare:
            old = checkout(args.compare, root / "old-tree")
            runs.append((f"export @{args.compare[:10]}", ours, old))
        if args.stock:
            runs.append(("stock builder", stock, REPO))
        outputs = []
        for i, (name, code, pythonpath) in enumerate(runs):
            work = root / f"work{i}"
            out = work / "out"
            print(f"running {name} ...", flush=True)
            rows.append((name, run_child(code, checkpoint, out, work, pythonpath)))
            outputs.append(out)
            if i > 0:  # keep the disk free for the next run: compare, then drop
                same = all(
                    filecmp.cmp(outputs[0] / f, out / f, shallow=False)
                    for f in ("model.onnx", "model.onnx.data", "genai_config.json")
                )
                print(f"  output byte-identical to {runs[0][0]}'s: {same}")
                shutil.rmtree(work)

    onnx_gb = rows[0][1]["output"]
    print(
        f"\n{args.member}{depth}: bf16 checkpoint {size_gb:.2f} GB -> {args.precision} ONNX folder "
        f"{onnx_gb:.2f} GB{' (' + args.flags + ')' if args.flags else ''}; {machine()}"
    )
    head = f"{'exporter':<26}{'time':>7}{'peak RSS':>10}{'anon':>8}{'file':>8}"
    print(head + f"{'peak disk':>11}{'scratch':>9}")
    for name, r in rows:
        memory = f"{r['rss']:>7.1f} GB{r['anon']:>5.1f} GB{r['file']:>5.1f} GB"
        print(f"{name:<26}{r['time']:>6.0f}s{memory}{r['disk']:>8.1f} GB{r['scratch']:>6.1f} GB")


if __name__ == "__main__":
    main()
