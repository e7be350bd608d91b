"""The Phi-3-small reference (phi3edge.phi3_small) pinned to hand-computed and brute-force cases.

The reference is what the ONNX export is compared against, so it must be right on its own: the
block-sparse layout against a loop over the definition (and one layout written out by hand),
gegelu against the formula element by element, decoding with the KV cache against prefill, and the
muP / LongRoPE / tokenizer-mask details against their published rules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from phi3edge import phi3_small  # noqa: E402
from phi3edge.phi3_small import (  # noqa: E402
    Phi3SmallConfig,
    Phi3SmallForCausalLM,
    block_sparse_csr,
    block_sparse_layout,
    block_sparse_mask,
    gegelu,
    rotary_cos_sin,
)

_SHARED = Path(__file__).resolve().parents[1] / "phi3edge" / "data" / "phi3-family"


def _published(name: str = "phi-3-small-8k-instruct.config.json") -> dict[str, Any]:
    return json.loads((_SHARED / name).read_text())


def _tiny_config(**overrides: Any) -> Phi3SmallConfig:
    """The published 8k config, narrowed: 4 query heads on 1 KV head (the real 4:1 grouping),
    16-token blocks, 2 local blocks, vertical stride 4 (every head has its own offset)."""
    raw = _published()
    raw.update(
        hidden_size=4 * 32,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_hidden_layers=2,
        ff_intermediate_size=96,
        vocab_size=512,
        blocksparse_block_size=16,
        blocksparse_num_local_blocks=2,
        blocksparse_vert_stride=4,
    )
    raw.update(overrides)
    return Phi3SmallConfig.from_dict(raw)


def _random_model(config: Phi3SmallConfig, seed: int = 0) -> Phi3SmallForCausalLM:
    torch.manual_seed(seed)
    model = Phi3SmallForCausalLM(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            std = 0.1 if name.endswith("bias") else 0.05
            tensor.normal_(mean=1.0 if "layernorm.weight" in name else 0.0, std=std)
    return model.eval()


# ----------------------------------------------------------------------------- block-sparse layout


def _brute_force_layout(
    heads: int, blocks: int, local: int, stride: int, homo: bool
) -> list[list[list[bool]]]:
    step = max(1, stride // heads)
    return [
        [
            [
                k <= q and (q - k < local or (k + 1 + (0 if homo else h * step)) % stride == 0)
                for k in range(blocks)
            ]
            for q in range(blocks)
        ]
        for h in range(heads)
    ]


@pytest.mark.parametrize(
    ("heads", "blocks", "local", "stride", "homo"),
    [
        (4, 10, 2, 4, False),  # every head a different offset (step 1)
        (2, 12, 3, 8, False),  # stride > heads: offsets 0 and 4
        (32, 20, 16, 8, False),  # the published pattern: 32 heads, 16 local, stride 8
        (8, 9, 1, 3, False),  # more heads than stride: offsets wrap
        (3, 7, 2, 4, True),  # homogeneous heads
        (1, 5, 5, 2, False),  # all local: dense lower triangle
    ],
)
def test_layout_matches_brute_force(
    heads: int, blocks: int, local: int, stride: int, homo: bool
) -> None:
    layout = block_sparse_layout(heads, blocks, local, stride, homo)
    assert layout.tolist() == _brute_force_layout(heads, blocks, local, stride, homo)


def test_layout_by_hand() -> None:
    # 3 heads, 6 blocks, 2 local blocks, stride 3 -> step max(1, 3 // 3) = 1: offsets 0, 1, 2.
    # Head 0 sees vertical columns k with (k + 1) % 3 == 0: 2, 5; head 1 (k + 2) % 3: 1, 4;
    # head 2 (k + 3) % 3: 0, 3.
    head0 = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 0, 1, 1],
    ]
    head1 = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 0, 1, 1, 0],
        [0, 1, 0, 0, 1, 1],
    ]
    head2 = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
    ]
    assert block_sparse_layout(3, 6, 2, 3).int().tolist() == [head0, head1, head2]


def test_token_mask_matches_brute_force() -> None:
    config = _tiny_config(blocksparse_block_size=4, blocksparse_vert_stride=3)
    layout = block_sparse_layout(4, 8, 2, 3).tolist()
    total = 30  # 7.5 blocks: the last block is partial
    queries = torch.arange(total)
    mask = block_sparse_mask(config, queries, total).tolist()
    for h in range(4):
        for q in range(total):
            for k in range(total):
                assert mask[h][q][k] == (k <= q and layout[h][q // 4][k // 4]), (h, q, k)
    # A query decoded late (positions 20..29 against 30 keys) sees the prefill rows 20..29.
    tail = block_sparse_mask(config, torch.arange(20, 30), total)
    assert torch.equal(tail, torch.tensor(mask)[:, 20:])


def test_token_mask_is_sparse_for_long_prompts_only() -> None:
    config = _tiny_config()  # 16-token blocks, 2 local
    short = block_sparse_mask(config, torch.arange(32), 32)
    assert torch.equal(short, torch.ones(32, 32).tril().bool().expand(4, 32, 32))
    long = block_sparse_mask(config, torch.arange(160), 160)
    causal = torch.ones(160, 160).tril().bool()
    assert (long <= causal).all() and (long != causal).any(dim=(1, 2)).all()
    assert not torch.equal(long[0], long[1])  # heads differ


def test_csr_round_trip() -> None:
    layout = block_sparse_layout(4, 10, 2, 4)
    crow, col = block_sparse_csr(layout)
    assert crow.shape == (4, 11) and col.shape[0] == 4
    rebuilt = torch.zeros_like(layout)
    for h in range(4):
        for row in range(10):
            for j in range(int(crow[h, row]), int(crow[h, row + 1])):
                rebuilt[h, row, int(col[h, j])] = True
        assert (col[h, int(crow[h, -1]) :] == -1).all()
    assert torch.equal(rebuilt, layout)


# ----------------------------------------------------------------------------- gegelu


def test_gegelu_matches_formula() -> None:
    limit = 20.0
    values = [-30.0, -20.0, -3.0, -0.5, 0.0, 0.7, 5.0, 19.9, 25.0, math.inf, -math.inf, 1.5]
    x = torch.tensor([values, values[::-1]], dtype=torch.float64)  # pairs (gate, linear)
    out = gegelu(x, limit)
    assert out.shape == (2, len(values) // 2)
    for row in range(2):
        for i in range(len(values) // 2):
            gate, linear = float(x[row, 2 * i]), float(x[row, 2 * i + 1])
            if not math.isinf(gate):
                gate = min(gate, limit)  # the GELU side is clamped from above only
            if not math.isinf(linear):
                linear = max(-limit, min(linear, limit))
            sigmoid = 0.0 if gate == -math.inf else 1 / (1 + math.exp(-1.702 * gate))
            expected = gate * sigmoid * (linear + 1)  # IEEE: -inf * 0 is nan, as in torch
            got = float(out[row, i])
            if math.isnan(expected):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(expected, rel=1e-9, abs=1e-300), (gate, linear)


def test_gegelu_without_limit_does_not_clamp() -> None:
    x = torch.tensor([[30.0, 40.0]], dtype=torch.float64)
    assert float(gegelu(x, None)) == pytest.approx(30 / (1 + math.exp(-1.702 * 30)) * 41)


# ----------------------------------------------------------------------------- whole model


def test_decoding_with_the_kv_cache_equals_prefill() -> None:
    model = _random_model(_tiny_config())
    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prefill, _ = model(ids)
        logits, past = model(ids[:, :37])  # a prompt, then one token at a time
        steps = [logits]
        for i in range(37, 150):
            logits, past = model(ids[:, i : i + 1], past)
            steps.append(logits)
    decoded = torch.cat(steps, dim=1)
    assert past[0][0].shape == (1, 1, 150, 32)
    assert (decoded - prefill).abs().max() < 1e-5 * prefill.abs().max()


def _manual_logits(model: Phi3SmallForCausalLM, ids: list[int]) -> torch.Tensor:
    """The forward pass written out token by token and head by head (short prompts only: every
    key within the local blocks, so sparse and dense layers agree)."""
    c = model.config
    f = torch.nn.functional
    d, group = c.head_dim, c.num_attention_heads // c.num_key_value_heads
    x = torch.stack([model.model.embed_tokens.weight[i] * 10.0 for i in ids])
    for layer in model.model.layers:
        attn = layer.self_attn
        h = f.layer_norm(x, (c.hidden_size,), layer.input_layernorm.weight,
                         layer.input_layernorm.bias, c.layer_norm_epsilon)  # fmt: skip
        mixed = h @ attn.query_key_value.weight.T + attn.query_key_value.bias
        out = torch.zeros_like(x)
        for head in range(c.num_attention_heads):
            kv, member = divmod(head, group)
            base = kv * (group + 2) * d
            q = mixed[:, base + member * d : base + (member + 1) * d]
            k = mixed[:, base + group * d : base + (group + 1) * d]
            v = mixed[:, base + (group + 1) * d : base + (group + 2) * d]

            def rope(t: torch.Tensor) -> torch.Tensor:
                rows = []
                for pos in range(len(ids)):
                    row = t[pos].clone()
                    for i in range(d // 2):
                        angle = pos / (c.rope_embedding_base ** (2 * i / d))
                        a, b = t[pos, i], t[pos, i + d // 2]
                        row[i] = a * math.cos(angle) - b * math.sin(angle)
                        row[i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
                    rows.append(row)
                return torch.stack(rows)

            q, k = rope(q), rope(k)
            for pos in range(len(ids)):
                scores = torch.stack([q[pos] @ k[j] / d for j in range(pos + 1)])
                weights = torch.softmax(scores, dim=0)
                context = sum(weights[j] * v[j] for j in range(pos + 1))
                out[pos] += context @ attn.dense.weight[:, head * d : (head + 1) * d].T
        x = x + out + attn.dense.bias
        h = f.layer_norm(x, (c.hidden_size,), layer.post_attention_layernorm.weight,
                         layer.post_attention_layernorm.bias, c.layer_norm_epsilon)  # fmt: skip
        up = h @ layer.mlp.up_proj.weight.T + layer.mlp.up_proj.bias
        gate, linear = up[:, 0::2].clamp(max=20.0), up[:, 1::2].clamp(-20.0, 20.0)
        act = gate * torch.sigmoid(1.702 * gate) * (linear + 1)
        x = x + act @ layer.mlp.down_proj.weight.T + layer.mlp.down_proj.bias
    final = model.model.final_layernorm
    x = f.layer_norm(x, (c.hidden_size,), final.weight, final.bias, c.layer_norm_epsilon)
    return (x @ model.model.embed_tokens.weight.T) / 8.0


def test_forward_matches_the_architecture_written_out() -> None:
    model = _random_model(_tiny_config())
    ids = [3, 141, 59, 265, 35]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
        manual = _manual_logits(model, ids)
    assert torch.allclose(logits[0], manual, atol=1e-5, rtol=1e-4)
    assert logits.abs().max() > 0.1  # not a vacuous comparison


def test_sparse_layers_are_sparse_and_dense_layers_dense() -> None:
    config = _tiny_config()
    assert [config.is_dense_layer(i) for i in range(4)] == [False, True, False, True]
    model = _random_model(config)
    all_dense = _random_model(_tiny_config(dense_attention_every_n_layers=1))
    ids = torch.randint(0, 512, (1, 160), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sparse_logits, _ = model(ids)
        dense_logits, _ = all_dense(ids)
    within_local = 2 * 16  # the first two blocks see everything either way
    assert torch.allclose(sparse_logits[:, :within_local], dense_logits[:, :within_local])
    assert (sparse_logits[:, within_local:] - dense_logits[:, within_local:]).abs().max() > 1e-3


def test_fused_qkv_layout_is_grouped_per_kv_head() -> None:
    config = _tiny_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=4 * 8)
    attention = phi3_small.Phi3SmallSelfAttention(config, 0)
    # Row r of the fused output = r: then each head's slice names the rows it was read from.
    mixed = torch.arange((4 + 2 * 2) * 8, dtype=torch.float32).view(1, 1, -1)
    q, k, v = attention.split_heads(mixed)
    rows = [int(t[0, h, 0, 0]) for t, n in ((q, 4), (k, 2), (v, 2)) for h in range(n)]
    # KV head 0 owns rows [q0 q1 k0 v0] = 0, 8, 16, 24; KV head 1 owns 32, 40, 48, 56.
    assert rows == [0, 8, 32, 40, 16, 48, 24, 56]


def test_mup_scales() -> None:
    config = _tiny_config()
    assert config.softmax_scale == pytest.approx(1 / 32)  # mup_attn_multiplier / head_dim
    model = _random_model(config)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits, _ = model(ids)
        hidden, _ = model.model(ids)
        raw = model.lm_head(hidden)
        embedded = model.model.embed_tokens(ids)
    assert torch.allclose(logits, raw / 8.0)  # mup_width_multiplier
    layer0 = model.model.layers[0].input_layernorm
    seen: list[torch.Tensor] = []
    handle = layer0.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert torch.allclose(seen[0], embedded * 10.0)  # mup_embedding_multiplier


def test_tied_lm_head_and_dummy_token_mask() -> None:
    raw = _published()
    raw.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2)
    raw.update(ff_intermediate_size=64)
    config = Phi3SmallConfig.from_dict(raw)
    # The published tokenizer's unused ids; the head of the list matches the one config copy
    # that printed it (data/phi3-family/SOURCES.md).
    assert list(config.dummy_token_indices[:8]) == [
        100256, 100258, 100259, 100260, 100264, 100265, 100267, 100268,
    ]  # fmt: skip
    assert len(config.dummy_token_indices) == 91
    assert set(range(100267, 100352)) <= set(config.dummy_token_indices)
    assert not {100257, 100261, 100262, 100263, 100266} & set(config.dummy_token_indices)
    model = Phi3SmallForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in phi3_small.state_dict_names(config)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[5, 100257]]))
    floor = torch.finfo(torch.float32).min
    assert (logits[..., list(config.dummy_token_indices)] == floor).all()
    assert (logits[..., 100266] > floor).all()


def test_intermediate_size_rule() -> None:
    raw = _published()
    assert Phi3SmallConfig.from_dict(raw).intermediate_size == 14336  # ff_intermediate_size
    raw.update(ff_intermediate_size=None, ff_dim_multiplier=4)
    # 4 * (4096 // 3) * 2 = 10920, padded up to a multiple of 256
    assert Phi3SmallConfig.from_dict(raw).intermediate_size == 11008


# ----------------------------------------------------------------------------- rotary / LongRoPE


def test_rotary_is_rotate_half_with_the_published_base() -> None:
    config = _tiny_config()
    cos, sin = rotary_cos_sin(config, torch.tensor([0, 7]), 8)
    dim = 32
    for i in range(dim // 2):
        angle = 7 / (1e6 ** (2 * i / dim))
        assert float(cos[1, i]) == pytest.approx(math.cos(angle), abs=1e-6)
        assert float(cos[1, i + dim // 2]) == pytest.approx(math.cos(angle), abs=1e-6)
        assert float(sin[1, i]) == pytest.approx(math.sin(angle), abs=1e-6)
    assert torch.equal(cos[0], torch.ones(dim))


def _longrope_config(**scaling: Any) -> Phi3SmallConfig:
    half = 16
    rope = {
        "type": "longrope",
        "short_factor": [1.0 + 0.01 * i for i in range(half)],
        "long_factor": [1.0 + 0.5 * i for i in range(half)],
        **scaling,
    }
    return _tiny_config(
        max_position_embeddings=1024, original_max_position_embeddings=64, rope_scaling=rope
    )


def test_longrope_switches_on_the_total_length() -> None:
    config = _longrope_config()
    positions = torch.arange(10)
    short_cos, _ = rotary_cos_sin(config, positions, 64)
    long_cos, _ = rotary_cos_sin(config, positions, 65)
    assert not torch.allclose(short_cos, long_cos)
    # short side: no magnitude scaling by default; long side: sqrt(1 + ln(16) / ln(64))
    assert float(short_cos[0, 0]) == pytest.approx(1.0)
    assert float(long_cos[0, 0]) == pytest.approx(math.sqrt(1 + math.log(16) / math.log(64)))
    # position 5, frequency index 3: 5 / (long_factor[3] * base ** (6 / 32))
    expected = math.cos(5 / (2.5 * 1e6 ** (6 / 32))) * math.sqrt(1 + math.log(16) / math.log(64))
    assert float(long_cos[5, 3]) == pytest.approx(expected, rel=1e-5)
    explicit = _longrope_config(short_mscale=1.5, long_mscale=2.0)
    assert float(rotary_cos_sin(explicit, positions, 64)[0][0, 0]) == pytest.approx(1.5)
    assert float(rotary_cos_sin(explicit, positions, 65)[0][0, 0]) == pytest.approx(2.0)


def test_longrope_decoding_equals_prefill_within_each_regime() -> None:
    model = _random_model(_longrope_config())
    ids = torch.randint(0, 512, (1, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        short_prefill, _ = model(ids[:, :64])
        logits, past = model(ids[:, :40])
        steps = [logits]
        for i in range(40, 64):
            logits, past = model(ids[:, i : i + 1], past)
            steps.append(logits)
        assert torch.allclose(torch.cat(steps, 1), short_prefill, atol=1e-5)
        # Past the switch a prefill re-rotates every position with the long factors; a cache
        # filled before the switch keeps its short-factor keys (as the published code does).
        long_prefill, _ = model(ids)
        logits, past = model(ids[:, :70])
        steps = [logits]
        for i in range(70, 90):
            logits, past = model(ids[:, i : i + 1], past)
            steps.append(logits)
        assert torch.allclose(torch.cat(steps, 1), long_prefill, atol=1e-5)
        assert not torch.allclose(long_prefill[:, :64], short_prefill, atol=1e-4)
