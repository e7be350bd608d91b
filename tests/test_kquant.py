"""phi3edge.kquant: onnxruntime's k-quant search in pieces on several threads gives exactly what
onnxruntime's own function gives on the whole matrix."""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.quantization.neural_compressor import weight_only

from phi3edge import kquant


@pytest.mark.parametrize(
    ("rows", "columns", "num_bits", "group_size"),
    [
        (512, 96, 4, 32),  # several pieces of 1 << 12 elements and a partial last one
        (384, 256, 4, 128),
        (256, 160, 8, 32),  # the int8 MatMuls of the mixed layouts
        (16, 32, 4, 32),  # fewer blocks than one piece: a single call
    ],
)
def test_pieces_give_onnxruntimes_bytes(
    monkeypatch: pytest.MonkeyPatch, rows: int, columns: int, num_bits: int, group_size: int
) -> None:
    monkeypatch.setattr(kquant, "PIECE_ELEMENTS", 1 << 12)
    rng = np.random.default_rng(rows + columns)
    weight = rng.standard_normal((columns, rows)).astype(np.float32) * 0.02
    weight[:, 3] = 0.5  # a constant block (rmin == rmax)
    data = weight.T  # the quantizer is handed a transposed view, as the builder does
    expected = weight_only.quant_tensor_k_quant_cpu(data, num_bits, group_size)
    ours = kquant.in_pieces(
        weight_only.quant_tensor_k_quant_cpu, data, num_bits, group_size, workers=3
    )
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert np.array_equal(mine, theirs)


def test_parallel_swaps_the_cpu_search_in_and_back() -> None:
    original = weight_only.quant_tensor_k_quant_cpu
    with kquant.parallel(workers=2):
        assert weight_only.quant_tensor_k_quant_cpu is not original
        data = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        for mine, theirs in zip(
            weight_only.quant_tensor_k_quant_cuda(data, 4, 32),  # the builder's entry point
            original(data, 4, 32),
            strict=True,
        ):
            assert np.array_equal(mine, theirs)
    assert weight_only.quant_tensor_k_quant_cpu is original
