"""onnxruntime's k-quant search, run in cache-sized pieces on every core: the same bytes, sooner.

onnxruntime's ``quant_tensor_k_quant_cpu`` (llama.cpp's scale and minimum search, 20 candidate
scales per block) runs each of its ~200 numpy operations over a whole weight matrix at once: every
pass streams hundreds of MB through memory on one core, so a full Phi-3-mini k-quant export
spends about a quarter of an hour there. Every block's search depends on that block alone, so
``parallel`` hands it the matrix a few thousand blocks at a time, from a thread per core (numpy
releases the GIL inside its loops), and stacks the results: each row is computed by the same
operations on the same values, so the output is identical (``tests/test_kquant.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# Elements per piece (1 MB of float32): small enough that its temporaries stay in cache, large
# enough that numpy's per-call cost stays small (1 << 16 to 1 << 20 measured alike).
PIECE_ELEMENTS = 1 << 18

Quantize = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def in_pieces(
    quantize: Quantize, data: np.ndarray, num_bits: int, group_size: int, workers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize(data, num_bits, group_size)`` over pieces of whole blocks, stacked in order."""
    blocks = np.reshape(data, (-1, group_size))
    step = max(1, PIECE_ELEMENTS // group_size)
    if len(blocks) <= step:
        return quantize(blocks, num_bits, group_size)
    pieces = [blocks[start : start + step] for start in range(0, len(blocks), step)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda piece: quantize(piece, num_bits, group_size), pieces))
    q_weight, scale, zero_point = (np.concatenate(part) for part in zip(*results, strict=True))
    return q_weight, scale, zero_point


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def parallel(workers: int | None = None) -> Iterator[None]:
    """While open, onnxruntime's CPU k-quant runs through ``in_pieces`` on ``workers`` threads
    (default: every core this process may use)."""
    from onnxruntime.quantization.neural_compressor import weight_only

    original = weight_only.quant_tensor_k_quant_cpu
    threads = workers or _usable_cores()

    def quantize(data: Any, num_bits: int = 4, group_size: int = 32) -> Any:
        return in_pieces(original, np.asarray(data), num_bits, group_size, threads)

    weight_only.quant_tensor_k_quant_cpu = quantize
    try:
        yield
    finally:
        weight_only.quant_tensor_k_quant_cpu = original
