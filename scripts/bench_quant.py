"""INT4 export options for CPU, measured on full-size random Phi-3-mini-4k: speed, size, accuracy.

Usage: python scripts/bench_quant.py [--threads 2] [--repeats 3] [--keep] [--out results/]
                                     [--configs recommended,rtn,...] [--layers N] [--long 2000]

For each option set (quantization method RTN / k-quant / k-quant with int8 lm_head / k-quant mixed
like llama.cpp's Q4_K_M, symmetric vs asymmetric RTN, block size 32/64/128, accuracy level 4 vs 1,
int8 lm_head, int4 embeddings) it exports the same random checkpoint, then measures prefill tok/s
(128-token prompt), decode tok/s (32 tokens, greedy) after that prompt and after a --long-token
one (the KV cache, float32 on CPU, is what each step reads most at long contexts), the ONNX weight
file size, and the cosine between the INT4 model's logits and transformers' float32 model at every
position of a 64-token prompt. ``--configs`` runs a subset by name (``--list`` prints them);
``--layers 2`` keeps the full width with 2 layers, to check the script end to end quickly.
Every layout is exported (and its cosine taken) first; then the speed runs alternate: each of
--repeats rounds loads every export in turn and times it once, and each figure is the median over
the rounds, so that a slow spell of a shared machine hits all layouts alike (runs of one layout
after another, minutes apart, once made a bigger layout look faster than a smaller one). The
exports stay on disk until the end (about 3 GB each at full size) and are removed unless --keep.
The default of ``phi3edge export`` is picked from this table (see README).
Needs about 16 GB of RAM while the full-size float32 reference runs; run nothing else meanwhile.
"""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from bench_nodes import model_feeds
from benchlib import (
    alternating_medians,
    bench_arguments,
    full_model,
    machine,
    random_checkpoint,
    table,
)

from phi3edge import export, runtime
from phi3edge.benchmark import NO_END, prompt_ids, time_generation
from phi3edge.schema import SamplingConfig

# name (for --configs) -> (label in the table, export.Int4Options keyword arguments)
CONFIGS: dict[str, tuple[str, dict[str, int | str | bool | tuple[str, ...]]]] = {
    "recommended": (
        "k_quant_mixed, block 128, int8 o_proj in k_quant_mixed's layers (the default)",
        {  # the fields in which it differs from the plain layout
            name: value
            for name, value in asdict(export.RECOMMENDED).items()
            if value != getattr(export.PLAIN, name)
        },
    ),
    "rtn": ("rtn, block 32, accuracy 4 (the builder's plain layout)", {}),
    "block64": ("block 64", {"block_size": 64}),
    "block128": ("block 128", {"block_size": 128}),
    "accuracy1": ("accuracy level 1 (fp32 activations)", {"accuracy_level": 1}),
    "lm_head_int8": ("int8 lm_head", {"lm_head": "int8"}),
    "embeddings_int4": ("int4 embeddings", {"embeddings": "int4"}),
    "asymmetric": ("RTN asymmetric (zero points)", {"symmetric": False}),
    "k_quant": ("k_quant", {"method": "k_quant"}),
    "k_quant_last": ("k_quant_last (int8 lm_head)", {"method": "k_quant_last"}),
    "k_quant_mixed": (
        "k_quant_mixed (int8 lm_head + Q4_K_M's layers)",
        {"method": "k_quant_mixed"},
    ),
    "k_quant_mixed_block64": (
        "k_quant_mixed, block 64",
        {"method": "k_quant_mixed", "block_size": 64},
    ),
    "k_quant_mixed_block128": (
        "k_quant_mixed, block 128",
        {"method": "k_quant_mixed", "block_size": 128},
    ),
    "k_quant_block128": ("k_quant, block 128", {"method": "k_quant", "block_size": 128}),
    "k_quant_mixed_block128_down": (
        "k_quant_mixed, block 128, int8 down_proj",
        {"method": "k_quant_mixed", "block_size": 128, "int8_matmuls": ("down_proj",)},
    ),
    # decode reads every weight byte and an int8 one costs 1.5x an int4 one in prefill (README):
    # int8 only where it buys the most accuracy per byte
    "k_quant_block128_o": (
        "k_quant, block 128, int8 o_proj",
        {"method": "k_quant", "block_size": 128, "int8_matmuls": ("o_proj",)},
    ),
    "k_quant_last_block128_o": (
        "k_quant_last (int8 lm_head), block 128, int8 o_proj",
        {"method": "k_quant_last", "block_size": 128, "int8_matmuls": ("o_proj",)},
    ),
    "k_quant_block128_qkv": (
        "k_quant, block 128, int8 qkv_proj",
        {"method": "k_quant", "block_size": 128, "int8_matmuls": ("qkv_proj",)},
    ),
    "k_quant_block128_qkv_o": (
        "k_quant, block 128, int8 qkv_proj + o_proj",
        {"method": "k_quant", "block_size": 128, "int8_matmuls": ("qkv_proj", "o_proj")},
    ),
    "k_quant_mixed_block128_o_down": (
        "k_quant_mixed, block 128, int8 o_proj + down_proj (the default until 2026-12-06)",
        {"method": "k_quant_mixed", "block_size": 128, "int8_matmuls": ("o_proj", "down_proj")},
    ),
    # int8 o_proj in half the layers: fewer bytes per decoded token than the default
    "k_quant_mixed_block128_o_others": (
        "k_quant_mixed, block 128, int8 o_proj where k_quant_mixed upgrades nothing",
        {
            "method": "k_quant_mixed",
            "block_size": 128,
            "int8_matmuls": ("o_proj",),
            "int8_layers": "others",
        },
    ),
    "k_quant_block128_mixed_int4_lm_head": (
        "k_quant, block 128, int8 qkv_proj + o_proj + down_proj in k_quant_mixed's layers "
        "(the default with an int4 lm_head)",
        {
            "method": "k_quant",
            "block_size": 128,
            "int8_matmuls": ("qkv_proj", "o_proj", "down_proj"),
            "int8_layers": "mixed",
        },
    ),
    "k_quant_mixed_block128_o": (
        "k_quant_mixed, block 128, int8 o_proj in every layer (the default until 2026-12-07)",
        {"method": "k_quant_mixed", "block_size": 128, "int8_matmuls": ("o_proj",)},
    ),
    "k_quant_mixed_block64_o": (
        "k_quant_mixed, block 64, int8 o_proj",
        {"method": "k_quant_mixed", "block_size": 64, "int8_matmuls": ("o_proj",)},
    ),
}


def reference_logits(ids: np.ndarray, layers: int | None = None) -> np.ndarray:
    """transformers' float32 Phi3ForCausalLM on the random checkpoint (full size by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = random_checkpoint(layers=layers)
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
    return session.run(["logits"], model_feeds(session, folder, ids, past=0))[0][0]


def cosines(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The cosine between two [positions, vocab] logit arrays at each position."""
    dot = (ours * reference).sum(-1)
    return dot / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1))


def chosen_configs(names: str | None) -> list[str]:
    """The --configs names, checked (all of them when None)."""
    if not names:
        return list(CONFIGS)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in CONFIGS]
    if unknown:
        raise SystemExit(
            f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}"
        )
    return chosen


def speed_run(folder: Path, threads: int, long: int) -> Callable[[], tuple[float, ...]]:
    """A run for ``alternating_medians``: load the export, warm it up, and time 32 greedy tokens
    after a 128-token prompt (prefill and decode tok/s) and, when ``long``, after a ``long`` one
    (decode tok/s); loading it per run keeps one full-size model in memory at a time."""
    greedy = SamplingConfig(temperature=0, logit_bias=NO_END)

    def run() -> tuple[float, ...]:
        model = runtime.load(folder, threads=threads)
        time_generation(model, prompt_ids(16), 2, greedy)  # warm-up after the load
        short = time_generation(model, prompt_ids(128), 32, greedy)
        figures = (short.prefill_tok_s, short.decode_tok_s)
        if long:
            figures += (time_generation(model, prompt_ids(long), 32, greedy).decode_tok_s,)
        del model
        gc.collect()
        return figures

    return run


def main() -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument("--keep", action="store_true", help="keep every export (2.7 GB each)")
    parser.add_argument("--configs", help="comma-separated config names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the config names and exit")
    parser.add_argument(
        "--layers", type=int, help="full width with this many layers (a quick end-to-end check)"
    )
    parser.add_argument(
        "--long", type=int, default=2000, help="context of the long decode figure (0: skip it)"
    )
    args = parser.parse_args()
    if args.list:
        for name, (label, options) in CONFIGS.items():
            print(f"{name:24} {label}  {options}")
        return
    names = chosen_configs(args.configs)
    if args.layers is not None and args.layers < 1:
        raise SystemExit(f"--layers must be at least 1, not {args.layers}")
    if args.long < 0 or args.long > 4000:
        raise SystemExit(
            f"--long must be 0..4000 (Phi-3-mini-4k's context less 96), not {args.long}"
        )

    full_model(layers=args.layers)  # makes sure the checkpoint exists before the reference
    ids = np.array([prompt_ids(64, seed=9)], dtype=np.int64)
    print("float32 reference logits (transformers) ...", flush=True)
    reference = reference_logits(ids, args.layers)
    folders, accuracy = {}, {}
    for number, name in enumerate(names, 1):
        label, options = CONFIGS[name]
        print(f"[{number}/{len(names)}] {name}: {label}", flush=True)
        folders[name] = full_model(layers=args.layers, **options)
        accuracy[name] = cosines(onnx_logits(folders[name], ids, args.threads), reference)
    speeds = alternating_medians(
        {name: speed_run(folder, args.threads, args.long) for name, folder in folders.items()},
        args.repeats,
    )
    rows, results = [], []
    for name, folder in folders.items():
        label, options = CONFIGS[name]
        cosine = accuracy[name]
        prefill, decode, *long_decode = speeds[name]
        decode_long = long_decode[0] if long_decode else None
        size_gb = (folder / "model.onnx.data").stat().st_size / 1e9
        results.append(
            {
                "config": name,
                "label": label,
                "options": options,
                "prefill_tok_s": prefill,
                "decode_tok_s": decode,
                "decode_long_context": args.long,
                "decode_long_tok_s": decode_long,
                "weights_gb": size_gb,
                "cosine_min": float(cosine.min()),
                "cosine_mean": float(cosine.mean()),
            }
        )
        rows.append(
            [
                label,
                f"{prefill:.1f}",
                f"{decode:.2f}",
                f"{decode_long:.2f}" if decode_long is not None else "-",
                f"{size_gb:.2f}",
                f"{cosine.min():.4f}",
                f"{cosine.mean():.4f}",
            ]
        )
        if options and not args.keep:
            shutil.rmtree(folder)
    depth = f"{args.layers} layers (full width)" if args.layers else "full-size"
    print(
        f"\nINT4 export options, {depth} random Phi-3-mini-4k, {args.threads} threads, "
        f"medians of {args.repeats} alternating rounds; {machine()}"
    )
    print(
        table(
            [
                "options",
                "prefill tok/s",
                "decode tok/s (128 ctx)",
                f"decode tok/s ({args.long} ctx)",
                "weights GB",
                "cosine min",
                "cosine mean",
            ],
            rows,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_quant.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
