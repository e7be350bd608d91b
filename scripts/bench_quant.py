"""INT4 export options for CPU, measured on full-size random Phi-3-mini-4k: speed, size, accuracy.

Usage: python scripts/bench_quant.py [--threads 2] [--repeats 3] [--keep] [--out results/]

For each option set (block size 32/64/128, accuracy level 4 vs 1, int8 lm_head, int4 embeddings)
it exports the same full-size random checkpoint, then measures prefill tok/s (128-token prompt),
decode tok/s (32 tokens, greedy), the ONNX weight file size, and the cosine between the INT4
model's logits and transformers' float32 model at every position of a 64-token prompt.
The default of ``phi3edge export`` is picked from this table (see README).
Needs about 16 GB of RAM while the float32 reference runs; run nothing else meanwhile.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
from benchlib import bench_arguments, full_model, machine, table

from phi3edge import runtime
from phi3edge.benchmark import NO_END, prompt_ids, time_generation
from phi3edge.cli import cache_dir
from phi3edge.schema import SamplingConfig

CONFIGS: list[tuple[str, dict[str, int | str]]] = [
    ("block 32, accuracy 4 (default)", {}),
    ("block 64", {"block_size": 64}),
    ("block 128", {"block_size": 128}),
    ("accuracy level 1 (fp32 activations)", {"accuracy_level": 1}),
    ("int8 lm_head", {"lm_head": "int8"}),
    ("int4 embeddings", {"embeddings": "int4"}),
]


def reference_logits(ids: np.ndarray) -> np.ndarray:
    """transformers' float32 Phi3ForCausalLM on the full-size random checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = cache_dir() / "bench" / "full-phi-3-mini-4k-random"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits[0].numpy()
    del model
    gc.collect()
    return logits


def onnx_logits(folder: Path, ids: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options)
    genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros(
                (1, genai["num_key_value_heads"], 0, genai["head_size"]), np.float32
            )
    return session.run(["logits"], feeds)[0][0]


def main() -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument("--keep", action="store_true", help="keep every export (2.7 GB each)")
    args = parser.parse_args()

    full_model()  # makes sure the checkpoint exists before the reference needs it
    ids = np.array([prompt_ids(64, seed=9)], dtype=np.int64)
    print("float32 reference logits (transformers) ...", flush=True)
    reference = reference_logits(ids)
    greedy = SamplingConfig(temperature=0, logit_bias=NO_END)
    rows, results = [], []
    for name, options in CONFIGS:
        folder = full_model(**options)
        ours = onnx_logits(folder, ids, args.threads)
        cosine = (ours * reference).sum(-1) / (
            np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1)
        )
        model = runtime.load(folder, threads=args.threads)
        prompt = prompt_ids(128)
        runs = [time_generation(model, prompt, 32, greedy) for _ in range(args.repeats)]
        prefill = float(np.median([r.prefill_tok_s for r in runs]))
        decode = float(np.median([r.decode_tok_s for r in runs]))
        size_gb = (folder / "model.onnx.data").stat().st_size / 1e9
        results.append(
            {
                "config": name,
                "options": options,
                "prefill_tok_s": prefill,
                "decode_tok_s": decode,
                "weights_gb": size_gb,
                "cosine_min": float(cosine.min()),
                "cosine_mean": float(cosine.mean()),
            }
        )
        rows.append(
            [
                name,
                f"{prefill:.1f}",
                f"{decode:.2f}",
                f"{size_gb:.2f}",
                f"{cosine.min():.4f}",
                f"{cosine.mean():.4f}",
            ]
        )
        print(rows[-1], flush=True)
        del model
        gc.collect()
        if options and not args.keep:
            shutil.rmtree(folder)
    print(
        f"\nINT4 export options, full-size random Phi-3-mini-4k, {args.threads} threads, "
        f"medians of {args.repeats}; {machine()}"
    )
    print(
        table(
            ["options", "prefill tok/s", "decode tok/s", "weights GB", "cosine min", "cosine mean"],
            rows,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_quant.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
