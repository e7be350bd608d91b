"""KV cache layouts on CPU side by side: float32 preallocated (one shared buffer: what the engine
gives a lone request, and a batch up to ``LoadedModel.kv_preallocate_bytes``), float32 growing (a
new, longer cache every step: a larger batch's, or an older export's past its sliding window),
and int8 (onnxruntime-genai's ``kv_cache_quant_scheme``).

Usage: python scripts/bench_kv_cache.py [--threads 2] [--repeats 3] [--contexts 128,2000]
                                        [--model EXPORTED_FOLDER]

On the mid-size random Phi-3-mini (hidden 1024, 8 layers, V = 32064; ``benchlib.mid_model``), or
on ``--model`` (float32 layouts only), times raw onnxruntime-genai (prefill of the context, then
48 greedy steps) with each layout at each context length, the layouts in turn in every round.
For int8 it exports the builder's int8 per-tensor KV cache beside the plain INT4 export. The
builder needs calibrated per-layer KV scales (``kv_cache_scale_file``); this script writes a
fixed scale (speed does not depend on it), so it measures speed only: the option is not offered
by ``phi3edge export`` until the scales come from a calibration run (README, quantization).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from benchlib import bench_arguments, machine, mid_model, table

from phi3edge import export

DECODE = 48


def int8_kv_export(checkpoint: Path) -> Path:
    """The mid-size checkpoint exported by the stock builder with an int8 per-tensor KV cache."""
    out = checkpoint.with_name(checkpoint.name + "-int4-kv-int8")
    if (out / "model.onnx").exists():
        return out
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    scales = checkpoint.with_name(checkpoint.name + "-kv-scales.json")
    fixed = {"k_scales": [0.05] * layers, "v_scales": [0.05] * layers}
    scales.write_text(json.dumps({"scales": fixed, "qmax": 128}))
    print(f"exporting {out} (int8 KV cache) ...", flush=True)
    builder = export.load_builder()
    options = ["kv_cache_quant_scheme=int8_per_tensor", f"kv_cache_scale_file={scales}"]
    cache = str(out.with_name(out.name + "-cache"))
    extra = builder.parse_extra_options(
        None, str(checkpoint), str(out), "int4", "cpu", cache, options
    )
    builder.create_model(None, str(checkpoint), str(out), "int4", "cpu", cache, **extra)
    return out


def run(folder: Path, context: int, threads: int, shared: bool) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one raw onnxruntime-genai greedy run; ``shared``: one
    preallocated past/present buffer, else a cache that grows every step."""
    config = og.Config(str(folder))
    session = {"intra_op_num_threads": threads}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=context + DECODE + 8, do_sample=False, past_present_share_buffer=shared
    )
    generator = og.Generator(model, params)
    ids = np.random.default_rng(0).integers(300, 32000, size=context).astype(np.int32)
    started = time.perf_counter()
    generator.append_tokens(ids)
    prefill = context / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(DECODE):
        generator.generate_next_token()
    return prefill, DECODE / (time.perf_counter() - started)


def main() -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument("--contexts", default="128,2000", help="comma-separated context lengths")
    parser.add_argument("--model", type=Path, help="an exported model instead of the mid-size one")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if any(c < 1 or c > 4000 for c in contexts):
        raise SystemExit(f"--contexts must be 1..4000, not {args.contexts}")
    if args.model is not None and not (args.model / "genai_config.json").is_file():
        raise SystemExit(f"--model {args.model}: no genai_config.json there (not an export)")
    plain = args.model or mid_model()[1]
    layouts = {"float32, preallocated": (plain, True), "float32, growing": (plain, False)}
    if args.model is None:
        layouts["int8, per tensor"] = (int8_kv_export(mid_model()[0]), True)
    rows, results = [], []
    for context in contexts:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in layouts}
        for _ in range(args.repeats):
            for name, (folder, shared) in layouts.items():
                runs[name].append(run(folder, context, args.threads, shared))
                print(name, context, runs[name][-1], flush=True)
        for name, pairs in runs.items():
            prefill = float(np.median([r[0] for r in pairs]))
            decode = float(np.median([r[1] for r in pairs]))
            results.append({"kv_cache": name, "context": context, "prefill_tok_s": prefill,
                            "decode_tok_s": decode})  # fmt: skip
            rows.append([name, context, f"{prefill:.1f}", f"{decode:.2f}"])
    print(f"\nKV cache layout, {plain.name}, {args.threads} threads, "
          f"medians of {args.repeats} alternating rounds; {machine()}")  # fmt: skip
    print(table(["KV cache", "context", "prefill tok/s", "decode tok/s"], rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kv_cache.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
