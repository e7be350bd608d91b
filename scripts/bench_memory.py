"""Memory to run an exported model: peak RSS of loading it and answering one request.

Usage: python scripts/bench_memory.py FOLDER [FOLDER ...] [--prompt 512] [--new 32] [--threads 2]

Each folder runs in a fresh child process (so nothing else is counted): load with phi3edge's
runtime, prefill a ``--prompt``-token prompt, decode ``--new`` tokens through our engine. The
child samples /proc/self/status, so the peak splits into anonymous memory (what must fit in RAM:
weights onnxruntime unpacked, KV cache, activations) and file-backed pages (the memory-mapped
model.onnx.data, which the kernel can drop and re-read). Also printed: the folder's size on disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, threading, time
peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
def sample():
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
report, folder, prompt, new, threads = sys.argv[1:6]
from phi3edge import runtime, engine
from phi3edge.benchmark import prompt_ids
from phi3edge.prompt import Prompt
from phi3edge.schema import SamplingConfig
model = runtime.load(folder, threads=int(threads))
loaded = dict(peak)
cfg = SamplingConfig(temperature=0, logit_bias={i: -100.0 for i in model.eos_ids})
list(engine.generate(model, Prompt(prompt_ids(int(prompt)), int(new)), cfg))
time.sleep(0.2)
open(report, "w").write(json.dumps({"loaded": loaded, "peak": peak}))
"""


def folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e9


def measure(folder: Path, prompt: int, new: int, threads: int) -> dict[str, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak.json"
        subprocess.run(
            [sys.executable, "-c", CHILD, str(report), str(folder), str(prompt), str(new),
             str(threads)],
            check=True,
        )  # fmt: skip
        return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results") / "bench_memory.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    print("| model | on disk GB | peak RSS GB | anonymous GB | file-backed GB | after load GB |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        figures = measure(folder, args.prompt, args.new, args.threads)
        peak, loaded = figures["peak"], figures["loaded"]
        gb = 1024 * 1024
        row = {
            "disk_gb": folder_gb(folder),
            "peak_rss_gb": peak["VmRSS"] / gb,
            "peak_anon_gb": peak["RssAnon"] / gb,
            "peak_file_gb": peak["RssFile"] / gb,
            "loaded_rss_gb": loaded["VmRSS"] / gb,
            "prompt_tokens": args.prompt,
            "new_tokens": args.new,
        }
        results[folder.name] = row
        print(
            f"| {folder.name} | {row['disk_gb']:.2f} | {row['peak_rss_gb']:.2f} | "
            f"{row['peak_anon_gb']:.2f} | {row['peak_file_gb']:.2f} | {row['loaded_rss_gb']:.2f} |",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
