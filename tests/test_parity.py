"""Exported ONNX vs Hugging Face transformers' PyTorch model on the same random checkpoint.

The reference is transformers' own Phi3ForCausalLM; the ONNX side runs the exported model.onnx with
onnxruntime at every position of one prompt (past the original context for LongRoPE members).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from parity_tools import cosines, onnx_logits  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

MEMBERS = ["phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini", "phi-3-medium-4k"]


def _prompt_length(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    original = config["original_max_position_embeddings"]
    if config["max_position_embeddings"] != original:
        return original + 44  # LongRoPE: run past the original context, into the long factors
    return 64


def _reference_logits(checkpoint: Path, ids: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.fixture(scope="module", params=MEMBERS)
def member(request: pytest.FixtureRequest) -> str:
    return request.param


def test_fp32_export_matches_transformers_at_every_position(
    member: str, model_factory: Callable[..., Path]
) -> None:
    checkpoint = model_factory(member)
    ids = np.random.default_rng(1).integers(0, 32000, size=(1, _prompt_length(checkpoint)))
    reference = _reference_logits(checkpoint, ids)
    ours = onnx_logits(checkpoint, model_factory(member, "fp32"), ids)
    assert ours.shape == reference.shape
    diff = np.abs(ours - reference).max()
    print(f"{member}: fp32 max abs diff {diff:.2e} over {ids.shape[1]} positions")
    assert diff <= 1e-3


def test_int4_export_logits_close_to_transformers(
    member: str, model_factory: Callable[..., Path]
) -> None:
    checkpoint = model_factory(member)
    ids = np.random.default_rng(2).integers(0, 32000, size=(1, _prompt_length(checkpoint)))
    reference = _reference_logits(checkpoint, ids)[0]
    ours = onnx_logits(checkpoint, model_factory(member, "int4"), ids)[0]
    cosine = cosines(ours, reference)
    print(f"{member}: int4 cosine min {cosine.min():.4f} mean {cosine.mean():.4f}")
    assert cosine.min() >= 0.95


def test_longrope_prompt_really_crosses_the_original_context(model_factory: Callable) -> None:
    config = json.loads((model_factory("phi-3-mini-128k") / "config.json").read_text())
    assert (
        _prompt_length(model_factory("phi-3-mini-128k"))
        > config["original_max_position_embeddings"]
    )
    assert config["rope_scaling"]["type"] == "longrope"
    assert (
        len(config["rope_scaling"]["long_factor"])
        == config["hidden_size"] // config["num_attention_heads"] // 2
    )
