"""phi3edge vs llama.cpp on the same random Phi-3-mini-4k weights, side by side in one run.

Usage: python scripts/bench_llamacpp.py [--threads 2] [--repeats 3] [--out results/]
                                        [--configs recommended,rtn,...]

Needs llama-cpp-python, which has no wheel on PyPI for this platform; built from source with
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON" pip install llama-cpp-python``
(a native build enables ggml's AMX kernels, which crash on the Intel VM; on a CPU without AMX,
``CMAKE_ARGS="-DGGML_NATIVE=ON"`` is what the AVX2-only AMD run used), and the GGUF files made by
``scripts/gguf_from_checkpoint.py CHECKPOINT F16.gguf --quantize q4_0 q4_k_m``.
Measures prefill tok/s (128-token prompt) and decode tok/s (64 tokens) for:
  - phi3edge (all sampling features on) on INT4 exports named as in scripts/bench_quant.py
    (``--configs``; default: the recommended layout, plain rtn and rtn at block 128);
  - llama.cpp Q4_0 and Q4_K_M (``Llama.eval`` on the same token ids, greedy next token).
Each figure is the median of --repeats runs; models are loaded one at a time. The cosine column
compares each runtime's logits with transformers' float32 model at every position of a 64-token
prompt (as in scripts/bench_quant.py), so speed and accuracy are weighed on the same weights.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
from bench_quant import CONFIGS, chosen_configs, cosines, onnx_logits, reference_logits
from benchlib import ALL_FEATURES, bench_arguments, full_model, machine, random_checkpoint, table

from phi3edge import runtime
from phi3edge.benchmark import prompt_ids, time_generation

PROMPT, DECODE = 128, 64


def llama_cpp_logits(path: Path, threads: int, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids``."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_run(path: Path, threads: int, ids: list[int]) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of llama.cpp on ``ids`` then DECODE greedy tokens."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=512,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        prefilled = time.perf_counter()
        for _ in range(DECODE - 1):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        end = time.perf_counter()
    finally:
        llm.close()
    return len(ids) / (prefilled - started), (DECODE - 1) / (end - prefilled)


def ours_run(folder: Path, threads: int, ids: list[int], repeats: int) -> tuple[float, float]:
    model = runtime.load(folder, threads=threads)
    runs = [time_generation(model, ids, DECODE, ALL_FEATURES) for _ in range(repeats)]
    del model
    gc.collect()
    return (
        float(np.median([r.prefill_tok_s for r in runs])),
        float(np.median([r.decode_tok_s for r in runs])),
    )


def main() -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument(
        "--configs",
        default="recommended,rtn,block128",
        help="phi3edge layouts (bench_quant.py --list)",
    )
    args = parser.parse_args()
    names = chosen_configs(args.configs)
    ids = prompt_ids(PROMPT)
    accuracy_ids = prompt_ids(64, seed=9)
    reference = reference_logits(np.array([accuracy_ids], dtype=np.int64))
    checkpoint = random_checkpoint()
    gguf = checkpoint.with_name(checkpoint.name + "-f16")
    results: dict[str, tuple[float, float, float]] = {}
    for config in names:
        label, options = CONFIGS[config]
        name, folder = f"phi3edge INT4 {label}", full_model(**options)
        logits = onnx_logits(folder, np.array([accuracy_ids], dtype=np.int64), args.threads)
        results[name] = (
            *ours_run(folder, args.threads, ids, args.repeats),
            float(cosines(logits, reference).mean()),
        )
        print(name, results[name], flush=True)
    for kind in ("q4_0", "q4_k_m"):
        path = Path(f"{gguf}-{kind}.gguf")
        llama_logits = llama_cpp_logits(path, args.threads, accuracy_ids)
        accuracy = float(cosines(llama_logits, reference).mean())
        runs = [llama_cpp_run(path, args.threads, ids) for _ in range(args.repeats)]
        results[f"llama.cpp {kind.upper()} ({path.stat().st_size / 1e9:.2f} GB)"] = (
            float(np.median([r[0] for r in runs])),
            float(np.median([r[1] for r in runs])),
            accuracy,
        )
        print(kind, results[list(results)[-1]], flush=True)
    rows = [[name, f"{p:.1f}", f"{d:.2f}", f"{c:.3f}"] for name, (p, d, c) in results.items()]
    print(
        f"\nfull-size random Phi-3-mini-4k, {PROMPT}-token prompt, {DECODE} new tokens, "
        f"{args.threads} threads, medians of {args.repeats}; {machine()}"
    )
    print(table(["runtime", "prefill tok/s", "decode tok/s", "cosine vs fp32 (mean)"], rows))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        k: {"prefill_tok_s": p, "decode_tok_s": d, "cosine_mean": c}
        for k, (p, d, c) in results.items()
    }
    (args.out / "bench_llamacpp.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
