"""A PyTorch reference implementation of Phi3SmallForCausalLM (Phi-3-small-8k / -128k).

Input: a checkpoint folder (config.json + safetensors) in the published layout.
Output: ``load(folder)`` returns a ``Phi3SmallForCausalLM`` whose parameter names are the
checkpoint's own (``model.layers.N.self_attn.query_key_value.weight`` ...), so the same object hands
its weights to onnxruntime-genai's builder and serves as the parity reference in tests.
Errors: ``ValueError`` for a config that is not Phi-3-small or for missing / unexpected tensors.

Why it exists: the published checkpoints carry their own modeling code, which imports triton (GPU
only) and cannot be loaded on a CPU machine; transformers has no Phi-3-small. This module is written
from the published architecture (config.json fields and the public modeling code, read, not copied):

- muP: embeddings times ``mup_embedding_multiplier``, attention scale ``mup_attn_multiplier /
  head_dim`` (not 1/sqrt), logits divided by ``mup_width_multiplier``;
- ``gegelu``: ``up_proj`` output interleaved (even columns -> quick-GELU, odd -> linear + 1), both
  clamped to ``gegelu_limit`` (the GELU side only from above), infinities passed through;
- LayerNorm with bias (``layer_norm_epsilon``), fused ``query_key_value`` grouped per KV head
  (``[q_0 .. q_{g-1}, k, v]`` for each KV head), output projection ``dense`` with bias;
- dense attention in layers ``i`` with ``(i + 1) % dense_attention_every_n_layers == 0``,
  block-sparse attention elsewhere (see ``block_sparse_layout``);
- rotary embedding (rotate-half) with base ``rope_embedding_base`` and ``rope_position_scale``;
  for 128k, LongRoPE: when the total sequence is longer than the original context every position
  uses the long factors (and ``long_mscale``, default ``sqrt(1 + ln(s) / ln(original))``), else the
  short ones (``short_mscale``, default 1.0: unlike Phi-3-mini, no scaling on the short side);
- the lm_head is tied to the embeddings unless the checkpoint carries ``lm_head.weight``; the
  tokenizer's unused ids (``dummy_token_indices``) get the float32 minimum as logits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURE = "Phi3SmallForCausalLM"

# Phi-3-small's tokenizer (tiktoken cl100k_base plus its own special tokens; the published
# tokenization_phi3_small.py): ids the model never emits. The config class derives
# ``dummy_token_indices`` from these, so a published config.json does not list them.
_FIM_AND_ENDOFPROMPT = (100258, 100259, 100260, 100276)
_UNUSED_SPECIALS = (100256, 100264, 100265, *range(100267, 100276))
_PADDING_DUMMIES = tuple(range(100277, 100352))  # the vocabulary is padded to 100352
DUMMY_TOKEN_IDS: tuple[int, ...] = tuple(
    sorted((*_FIM_AND_ENDOFPROMPT, *_UNUSED_SPECIALS, *_PADDING_DUMMIES))
)

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Phi3SmallConfig:
    """The config.json fields the architecture depends on (dropouts are inference no-ops)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    layer_norm_epsilon: float
    gegelu_limit: float | None
    mup_use_scaling: bool
    mup_attn_multiplier: float
    mup_embedding_multiplier: float
    mup_width_multiplier: float
    rope_embedding_base: float
    rope_position_scale: float
    max_position_embeddings: int
    original_max_position_embeddings: int
    blocksparse_block_size: int
    blocksparse_num_local_blocks: int
    blocksparse_vert_stride: int
    blocksparse_homo_head_pattern: bool
    dense_attention_every_n_layers: int
    tie_word_embeddings: bool = True
    rope_scaling: dict[str, Any] | None = None
    dummy_token_indices: tuple[int, ...] = field(default=DUMMY_TOKEN_IDS)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Phi3SmallConfig:
        """Read a published (or random-checkpoint) config.json dict."""
        if ARCHITECTURE not in (config.get("architectures") or []):
            raise ValueError(f"not a {ARCHITECTURE} config: {config.get('architectures')}")
        if config.get("hidden_act", "gegelu") != "gegelu":
            raise ValueError(f"Phi-3-small uses gegelu, not {config['hidden_act']!r}")
        vocab = int(config["vocab_size"])
        dummies = config.get("dummy_token_indices")
        if dummies is None:
            dummies = [i for i in DUMMY_TOKEN_IDS if i < vocab]
        maximum = int(config["max_position_embeddings"])
        return cls(
            vocab_size=vocab,
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            num_key_value_heads=int(config["num_key_value_heads"]),
            intermediate_size=_intermediate_size(config),
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
            gegelu_limit=config.get("gegelu_limit"),
            mup_use_scaling=bool(config.get("mup_use_scaling", True)),
            mup_attn_multiplier=float(config.get("mup_attn_multiplier", 1.0)),
            mup_embedding_multiplier=float(config.get("mup_embedding_multiplier", 0.0) or 0.0),
            mup_width_multiplier=float(config.get("mup_width_multiplier", 0.0) or 0.0),
            rope_embedding_base=float(config.get("rope_embedding_base", 10**6)),
            rope_position_scale=float(config.get("rope_position_scale", 1.0)),
            max_position_embeddings=maximum,
            original_max_position_embeddings=int(
                config.get("original_max_position_embeddings", maximum)
            ),
            blocksparse_block_size=int(config["blocksparse_block_size"]),
            blocksparse_num_local_blocks=int(config["blocksparse_num_local_blocks"]),
            blocksparse_vert_stride=int(config["blocksparse_vert_stride"]),
            blocksparse_homo_head_pattern=bool(config.get("blocksparse_homo_head_pattern", False)),
            dense_attention_every_n_layers=int(config.get("dense_attention_every_n_layers") or 0),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            rope_scaling=config.get("rope_scaling"),
            dummy_token_indices=tuple(int(i) for i in dummies),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def softmax_scale(self) -> float:
        """muP scales attention by 1/head_dim (times a multiplier), not 1/sqrt(head_dim)."""
        if self.mup_use_scaling:
            return self.mup_attn_multiplier / self.head_dim
        return 1.0 / math.sqrt(self.head_dim)

    def is_dense_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) attends densely; the others are block-sparse."""
        every = self.dense_attention_every_n_layers
        return bool(every) and (layer + 1) % every == 0


def _intermediate_size(config: dict[str, Any]) -> int:
    """ff_intermediate_size when given, else the config class's rule (4 * h/3 * 2, padded)."""
    if config.get("ff_intermediate_size"):
        return int(config["ff_intermediate_size"])
    size = int(config.get("ff_dim_multiplier") or 4) * (int(config["hidden_size"]) // 3) * 2
    if config.get("gegelu_pad_to_256", True):
        size = (size + 255) // 256 * 256
    return size


# ----------------------------------------------------------------------------- block-sparse mask


def block_sparse_layout(
    num_heads: int,
    num_blocks: int,
    local_blocks: int,
    vert_stride: int,
    homo_head: bool = False,
) -> torch.Tensor:
    """Which key blocks each query block sees, per head: bool ``[heads, q_block, k_block]``.

    A query block sees itself and the ``local_blocks - 1`` blocks before it, plus every earlier
    block on the head's vertical stride: key block ``k`` with ``(k + 1 + offset) % vert_stride ==
    0``. Without the homogeneous pattern, head ``h`` has offset ``h * max(1, vert_stride //
    num_heads)``, so heads take turns covering the stride.
    """
    q = torch.arange(num_blocks)[:, None]
    k = torch.arange(num_blocks)[None, :]
    if homo_head:
        offsets = torch.zeros(num_heads, dtype=torch.long)
    else:
        offsets = torch.arange(num_heads) * max(1, vert_stride // num_heads)
    vertical = (k[None] + offsets[:, None, None] + 1) % vert_stride == 0
    local = (q - k < local_blocks)[None]
    return (q >= k)[None] & (local | vertical)


def block_sparse_mask(
    config: Phi3SmallConfig, query_positions: torch.Tensor, key_length: int
) -> torch.Tensor:
    """Token-level mask ``[heads, queries, keys]`` of a block-sparse layer (True = attend).

    Positions are absolute, so a query decoded after a KV cache sees exactly what the same query
    sees in a prefill: the block layout at (query // block, key // block), and causality.
    """
    block = config.blocksparse_block_size
    last = max(int(query_positions.max()) + 1, key_length)
    layout = block_sparse_layout(
        config.num_attention_heads,
        -(-last // block),
        config.blocksparse_num_local_blocks,
        config.blocksparse_vert_stride,
        config.blocksparse_homo_head_pattern,
    )
    keys = torch.arange(key_length)
    blocks = layout[:, query_positions // block][:, :, keys // block]
    return blocks & (keys[None, :] <= query_positions[:, None])[None]


def block_sparse_csr(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR form onnxruntime's SparseAttention takes: ``(crow [heads, blocks + 1],
    col [heads, max_nnz])``, columns padded with -1."""
    crows, cols = [], []
    for head in layout:
        crows.append(torch.cat([torch.zeros(1, dtype=torch.long), head.sum(-1).cumsum(0)]))
        cols.append(head.nonzero()[:, 1])
    width = max(len(c) for c in cols)
    padded = [torch.cat([c, c.new_full((width - len(c),), -1)]) for c in cols]
    return torch.stack(crows), torch.stack(padded)


# ----------------------------------------------------------------------------- pieces


def gegelu(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Gated quick-GELU on interleaved halves: quick_gelu(x[..., 0::2]) * (x[..., 1::2] + 1)."""
    gate, linear = x[..., 0::2], x[..., 1::2]
    if limit is not None:
        gate = torch.where(torch.isinf(gate), gate, gate.clamp(max=limit))
        linear = torch.where(torch.isinf(linear), linear, linear.clamp(min=-limit, max=limit))
    return gate * torch.sigmoid(1.702 * gate) * (linear + 1)


def rotary_cos_sin(
    config: Phi3SmallConfig, positions: torch.Tensor, total_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[len(positions), head_dim]`` for rotate-half rotary at ``positions``.

    ``total_length`` (past + current tokens) picks LongRoPE's factors, as the published code does:
    one choice for the whole forward pass.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    base = torch.tensor(config.rope_embedding_base, dtype=torch.float32) ** exponents
    scaling = config.rope_scaling
    t = positions.to(torch.float32)
    mscale = 1.0
    if scaling:
        original = config.original_max_position_embeddings
        if total_length > original:
            factors = scaling["long_factor"]
            mscale = float(scaling.get("long_mscale", -1) or -1)
            if mscale <= 0:
                ratio = config.max_position_embeddings / original
                mscale = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0
        else:
            factors = scaling["short_factor"]
            mscale = float(scaling.get("short_mscale", -1) or -1)
            mscale = mscale if mscale > 0 else 1.0
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * base)
    else:
        inv_freq = 1.0 / base
        t = t * config.rope_position_scale
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * mscale, emb.sin() * mscale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- modules


class Phi3SmallSelfAttention(nn.Module):
    """Grouped-query attention with the fused, per-KV-head-grouped ``query_key_value``."""

    def __init__(self, config: Phi3SmallConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.dense_attention = config.is_dense_layer(layer)
        heads, kv_heads, dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.query_key_value = nn.Linear(config.hidden_size, (heads + 2 * kv_heads) * dim)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[b, s, (h + 2 kv) d]`` -> q ``[b, h, s, d]``, k and v ``[b, kv, s, d]``."""
        c = self.config
        b, s, _ = mixed.shape
        group = c.num_attention_heads // c.num_key_value_heads
        grouped = mixed.view(b, s, c.num_key_value_heads, group + 2, c.head_dim)
        q = grouped[:, :, :, :group].reshape(b, s, c.num_attention_heads, c.head_dim)
        k = grouped[:, :, :, group]
        v = grouped[:, :, :, group + 1]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        q, k, v = self.split_heads(self.query_key_value(hidden))
        past_length = 0 if past is None else past[0].shape[2]
        length = q.shape[2]
        positions = torch.arange(past_length, past_length + length)
        cos, sin = rotary_cos_sin(c, positions, past_length + length)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        group = c.num_attention_heads // c.num_key_value_heads
        keys = k.repeat_interleave(group, dim=1)
        values = v.repeat_interleave(group, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * c.softmax_scale
        total = keys.shape[2]
        if self.dense_attention:
            allowed = (torch.arange(total)[None, :] <= positions[:, None])[None]
        else:
            allowed = block_sparse_mask(c, positions, total)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        context = torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values
        b = hidden.shape[0]
        context = context.transpose(1, 2).reshape(b, length, c.hidden_size)
        return self.dense(context), (k, v)


class Phi3SmallMLP(nn.Module):
    """up_proj (2 x intermediate, interleaved) -> gegelu -> down_proj, both with bias."""

    def __init__(self, config: Phi3SmallConfig) -> None:
        super().__init__()
        self.limit = config.gegelu_limit
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gegelu(self.up_proj(x), self.limit))


class Phi3SmallDecoderLayer(nn.Module):
    """Pre-norm block; the class name ends in DecoderLayer, which the ONNX builder looks for."""

    def __init__(self, config: Phi3SmallConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Phi3SmallSelfAttention(config, layer)
        self.mlp = Phi3SmallMLP(config)
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)

    def forward(
        self, hidden: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attended, present = self.self_attn(self.input_layernorm(hidden), past)
        hidden = hidden + attended
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, present


class Phi3SmallModel(nn.Module):
    """Embeddings (muP-scaled), the decoder layers and the final LayerNorm."""

    def __init__(self, config: Phi3SmallConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Phi3SmallDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self, input_ids: torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        hidden = self.embed_tokens(input_ids)
        if self.config.mup_embedding_multiplier > 0:
            hidden = hidden * self.config.mup_embedding_multiplier
        presents: KVCache = []
        for i, layer in enumerate(self.layers):
            hidden, present = layer(hidden, None if past is None else past[i])
            presents.append(present)
        return self.final_layernorm(hidden), presents


class Phi3SmallForCausalLM(nn.Module):
    """The causal LM: ``forward(input_ids, past) -> (logits [b, s, vocab] float32, present)``."""

    def __init__(self, config: Phi3SmallConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3SmallModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        mask = torch.zeros(config.vocab_size, dtype=torch.bool)
        mask[list(config.dummy_token_indices)] = True
        self.register_buffer("dummy_tokens_mask", mask, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        hidden, present = self.model(input_ids, past)
        logits = self.lm_head(hidden).float()
        if self.config.mup_width_multiplier:
            logits = logits / self.config.mup_width_multiplier
        logits = logits.masked_fill(self.dummy_tokens_mask, torch.finfo(torch.float32).min)
        return logits, present


# ----------------------------------------------------------------------------- loading


def load(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> Phi3SmallForCausalLM:
    """Build the model from ``checkpoint_dir`` (config.json + *.safetensors) without running any
    of the checkpoint's own code. Tensors keep the checkpoint's dtype unless ``dtype`` is given
    (a full-size bf16 checkpoint is 15 GB as it is, 30 GB in float32); an absent
    ``lm_head.weight`` means tied embeddings, as in the published checkpoints."""
    from safetensors import safe_open

    folder = Path(checkpoint_dir)
    raw = json.loads((folder / "config.json").read_text("utf-8"))
    config = Phi3SmallConfig.from_dict(raw)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                state[name] = tensor if dtype is None else tensor.to(dtype)
    if "lm_head.weight" in state and config.tie_word_embeddings:
        config = _untied(config)
    with torch.device("meta"):
        model = Phi3SmallForCausalLM(config)
    _check_names(model, state.keys())
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    mask = torch.zeros(config.vocab_size, dtype=torch.bool)
    mask[list(config.dummy_token_indices)] = True
    model.dummy_tokens_mask = mask
    return model.eval()


def _untied(config: Phi3SmallConfig) -> Phi3SmallConfig:
    from dataclasses import replace

    return replace(config, tie_word_embeddings=False)


def _check_names(model: Phi3SmallForCausalLM, names: Iterable[str]) -> None:
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    found = set(names)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint tensors do not match {ARCHITECTURE}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def state_dict_names(config: Phi3SmallConfig) -> list[str]:
    """The tensor names a checkpoint of ``config`` holds, in module order (for fixtures)."""
    with torch.device("meta"):
        model = Phi3SmallForCausalLM(config)
    names = list(model.state_dict())
    if config.tie_word_embeddings:
        names.remove("lm_head.weight")
    return names
