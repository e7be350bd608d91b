"""Beyond original_max_position_embeddings: transformers 5's PhimoeRotaryEmbedding.forward calls
rope_init_fn(config) without seq_len, i.e. always short_factor (only the mscale switches). The
original modeling_phimoe.py (remote code) and onnxruntime-genai's multi-cache switch the whole
sequence to long_factor. Patch transformers to do that and rerun the fake-quant parity at 300 tokens."""

import runpy
import sys

import torch
from transformers.models.phimoe import modeling_phimoe as mp


def forward(self, x, position_ids=None):
    seq_len = int(torch.max(position_ids)) + 1
    rp = self.config.rope_parameters
    inv_freq, _ = self.rope_init_fn(self.config, x.device, seq_len=seq_len)
    mscale = (
        rp["long_mscale"]
        if seq_len > rp["original_max_position_embeddings"]
        else rp["short_mscale"]
    )
    freqs = position_ids[..., None].float() * inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)


mp.PhimoeRotaryEmbedding.forward = forward
sys.argv = ["fakequant_parity.py", *sys.argv[1:]]
runpy.run_path("fakequant_parity.py", run_name="__main__")
