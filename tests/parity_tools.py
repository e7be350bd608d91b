"""Helpers shared by the parity tests: run an exported model.onnx with onnxruntime, compare logits.

optimum's normalized config reads the architecture, so the empty KV inputs are shaped the same way
for every family member (Phi3 and Phimoe configs use the same field names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def onnx_logits(checkpoint: Path, exported: Path, ids: np.ndarray) -> np.ndarray:
    """Logits at every position of ``ids`` [batch, seq] from one onnxruntime prefill pass."""
    import onnxruntime as ort
    from optimum.utils import NormalizedConfigManager
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    normalized = NormalizedConfigManager.get_normalized_config_class("phi3")(config)
    head_dim = normalized.hidden_size // normalized.num_attention_heads
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros(
                (ids.shape[0], normalized.num_key_value_heads, 0, head_dim), np.float32
            )
    return session.run(["logits"], feeds)[0]


def cosines(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of the logit vectors at each position (last axis)."""
    return (ours * reference).sum(-1) / (
        np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1)
    )
