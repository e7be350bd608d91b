"""Per-node kernel time of one model step of ONNX exports, from ONNX Runtime's profiler.

Usage: python scripts/bench_nodes.py FOLDER [FOLDER ...] [--past 128] [--tokens 1] [--steps 60]
                                     [--rounds 3] [--threads 2] [--top 12]

What a layout costs per node, where end-to-end decode figures on a shared VM are too noisy to
tell: the rounds alternate between the exports (each round loads every export in turn and runs
--steps steps of it), then each node's median kernel time over all steps after
the first 10 of a round is printed with its weight bits and time per weight (ps), so that an int8
MatMulNBits can be weighed against an int4 one per byte. The step is the model alone, as
onnxruntime-genai runs it: --tokens new tokens (1: a decode step; 128: a prefill chunk) after
--past cached positions (zeros; the cost of a step does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

WARMUP_STEPS = 10  # steps of each round left out of the medians (allocations, caches)


def model_feeds(session, folder: Path, ids: np.ndarray, past: int) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The inputs of an exported model's step: ``ids`` [1, n] after ``past`` cached positions
    (zeros)."""
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((1, past + ids.shape[1]), np.int64),
    }
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            shape = (1, decoder["num_key_value_heads"], past, decoder["head_size"])
            feeds[value.name] = np.zeros(shape, np.float32)
    return feeds


def matmul_weights(folder: Path) -> dict[str, tuple[int, int]]:
    """MatMulNBits node name -> (bits, K x N weights)."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    result = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            result[node.name] = (int(attrs["bits"]), int(attrs["K"]) * int(attrs["N"]))
    return result


def node_times(profile: Path) -> dict[str, list[float]]:
    """Node name -> kernel times (us) of every run in an ONNX Runtime profile, in order."""
    times: dict[str, list[float]] = defaultdict(list)
    for event in json.loads(profile.read_text()):
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            times[name.removesuffix("_kernel_time")].append(float(event["dur"]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="exported model folders")
    parser.add_argument("--past", type=int, default=128, help="cached positions before the step")
    parser.add_argument("--tokens", type=int, default=1, help="new tokens per step (M)")
    parser.add_argument("--steps", type=int, default=60, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="nodes to print per export")
    args = parser.parse_args()
    if args.tokens < 1 or args.past < 0:
        raise SystemExit("--tokens must be at least 1 and --past at least 0")
    if args.steps <= WARMUP_STEPS:
        raise SystemExit(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    for folder in args.folders:
        if not (folder / "model.onnx").is_file():
            raise SystemExit(f"{folder}: no model.onnx (give exported folders)")

    import onnxruntime as ort

    samples: dict[Path, dict[str, list[float]]] = {f: defaultdict(list) for f in args.folders}
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(1, args.rounds + 1):
            for folder in args.folders:
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(scratch) / "profile")
                session = ort.InferenceSession(str(folder / "model.onnx"), options)
                ids = np.full((1, args.tokens), 5, np.int64)
                feeds = model_feeds(session, folder, ids, args.past)
                for _ in range(args.steps):
                    session.run(["logits"], feeds)
                profile = Path(session.end_profiling())
                for name, times in node_times(profile).items():
                    samples[folder][name].extend(times[WARMUP_STEPS:])
                profile.unlink()
                del session
                print(f"round {number}/{args.rounds}: {folder.name}", flush=True)
    for folder in args.folders:
        weights = matmul_weights(folder)
        medians = {name: float(np.median(t)) for name, t in samples[folder].items()}
        print(f"\n{folder.name}: step {sum(medians.values()) / 1e3:.2f} ms (sum of node medians)")
        print("| node | us | bits | ps per weight |\n|---|---|---|---|")
        for name, us in sorted(medians.items(), key=lambda item: -item[1])[: args.top]:
            bits, count = weights.get(name, (0, 0))
            per_weight = f"{us * 1e6 / count:.1f}" if count else "-"
            print(f"| {name} | {us:.0f} | {bits or '-'} | {per_weight} |")


if __name__ == "__main__":
    main()
