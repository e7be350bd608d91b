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
Every runtime stays loaded, runs once untimed, and then the runs alternate: each of --repeats rounds
runs every runtime once, so a slow spell of a shared machine hits all of them alike; each figure is
the median over the rounds (the models together need about 15 GB of RAM). The cosine column compares
each runtime's logits with transformers' float32 model at every position of a 64-token prompt (as in
scripts/bench_quant.py), so speed and accuracy are weighed on the same weights.
"""

from __future__ import annotations

import functools
import gc
import json
import time
from pathlib import Path

import numpy as np
from bench_quant import CONFIGS, chosen_configs, cosines, onnx_logits, reference_logits
from benchlib import (
    ALL_FEATURES,
    alternating_medians,
    bench_arguments,
    full_model,
    machine,
    random_checkpoint,
    table,
)

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


class LlamaCppRunner:
    """llama.cpp with one GGUF loaded; each call times ``ids`` then DECODE greedy tokens."""

    def __init__(self, path: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=512,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def __call__(self, ids: list[int]) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s)."""
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        prefilled = time.perf_counter()
        for _ in range(DECODE - 1):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([token])
        end = time.perf_counter()
        return len(ids) / (prefilled - started), (DECODE - 1) / (end - prefilled)

    def close(self) -> None:
        self.llm.close()


class OursRunner:
    """phi3edge with one export loaded, all sampling features on."""

    def __init__(self, folder: Path, threads: int) -> None:
        self.model = runtime.load(folder, threads=threads)

    def __call__(self, ids: list[int]) -> tuple[float, float]:
        timing = time_generation(self.model, ids, DECODE, ALL_FEATURES)
        return timing.prefill_tok_s, timing.decode_tok_s

    def close(self) -> None:
        del self.model
        gc.collect()


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
    accuracy_prompt = np.array([accuracy_ids], dtype=np.int64)
    reference = reference_logits(accuracy_prompt)
    checkpoint = random_checkpoint()
    gguf = checkpoint.with_name(checkpoint.name + "-f16")
    runners: dict[str, OursRunner | LlamaCppRunner] = {}
    accuracy: dict[str, float] = {}
    size_gb: dict[str, float] = {}
    for config in names:
        label, options = CONFIGS[config]
        name, folder = f"phi3edge INT4 {label}", full_model(**options)
        logits = onnx_logits(folder, accuracy_prompt, args.threads)
        accuracy[name] = float(cosines(logits, reference).mean())
        size_gb[name] = (folder / "model.onnx.data").stat().st_size / 1e9
        runners[name] = OursRunner(folder, args.threads)
    for kind in ("q4_0", "q4_k_m"):
        path = Path(f"{gguf}-{kind}.gguf")
        name = f"llama.cpp {kind.upper()}"
        accuracy[name] = float(
            cosines(llama_cpp_logits(path, args.threads, accuracy_ids), reference).mean()
        )
        size_gb[name] = path.stat().st_size / 1e9
        runners[name] = LlamaCppRunner(path, args.threads)
    for run in runners.values():  # first touch of each model's weights, outside the rounds
        run(ids)
    speeds = alternating_medians(
        {name: functools.partial(run, ids) for name, run in runners.items()}, args.repeats
    )
    for runner in runners.values():
        runner.close()
    results = {name: (*speeds[name], accuracy[name], size_gb[name]) for name in runners}
    rows = [
        [name, f"{p:.1f}", f"{d:.2f}", f"{c:.3f}", f"{gb:.2f}"]
        for name, (p, d, c, gb) in results.items()
    ]
    print(
        f"\nfull-size random Phi-3-mini-4k, {PROMPT}-token prompt, {DECODE} new tokens, "
        f"{args.threads} threads, medians of {args.repeats} alternating rounds; {machine()}"
    )
    print(
        table(
            ["runtime", "prefill tok/s", "decode tok/s", "cosine vs fp32 (mean)", "file GB"], rows
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        k: {"prefill_tok_s": p, "decode_tok_s": d, "cosine_mean": c, "file_gb": gb}
        for k, (p, d, c, gb) in results.items()
    }
    (args.out / "bench_llamacpp.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
