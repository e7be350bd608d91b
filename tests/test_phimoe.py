"""Phi-3.5-MoE on CPU: our export against transformers' own PhimoeForCausalLM.

The tiny random checkpoint has the real layout (hub names, 16 experts, top-2 sparsemixer routing,
LayerNorm and attention biases, LongRoPE with the real long/original ratio). The prompt runs past
``original_max_position_embeddings`` so every position after it uses the long factors.

transformers 5.23's ``PhimoeRotaryEmbedding`` never switches to the long factors (it calls its rope
init without the sequence length; only the mscale switches), unlike its own Phi-3 and the
onnxruntime-genai graph. The reference here therefore gets the Phi-3 rule: long factors for the
whole sequence once it is longer than the original context (docs/research/phimoe-cpu/FINDINGS.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxruntime_genai as og  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from parity_tools import cosines, onnx_logits  # noqa: E402
from transformers import PhimoeForCausalLM  # noqa: E402
from transformers.models.phimoe import modeling_phimoe  # noqa: E402

from phi3edge import export  # noqa: E402

MEMBER = "phi-3.5-moe"


@pytest.fixture(scope="module")
def long_rope_switch() -> Iterator[None]:
    """Give transformers' Phimoe rotary embedding the Phi-3 LongRoPE rule (see module docstring)."""

    def forward(self: Any, x: Any, position_ids: Any) -> tuple[Any, Any]:
        seq_len = int(position_ids.max()) + 1
        rope = self.config.rope_parameters
        inv_freq, _ = self.rope_init_fn(self.config, x.device, seq_len=seq_len)
        long = seq_len > rope["original_max_position_embeddings"]
        mscale = rope["long_mscale"] if long else rope["short_mscale"]
        freqs = position_ids[..., None].float() * inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)

    original = modeling_phimoe.PhimoeRotaryEmbedding.forward
    modeling_phimoe.PhimoeRotaryEmbedding.forward = forward
    yield
    modeling_phimoe.PhimoeRotaryEmbedding.forward = original


@pytest.fixture(scope="module")
def checkpoint(model_factory: Callable[..., Path]) -> Path:
    return model_factory(MEMBER)


@pytest.fixture(scope="module")
def prompt(checkpoint: Path) -> np.ndarray:
    """A prompt 44 tokens past the original context (256 in the tiny checkpoint)."""
    config = PhimoeForCausalLM.config_class.from_pretrained(checkpoint)
    length = config.rope_parameters["original_max_position_embeddings"] + 44
    return np.random.default_rng(3).integers(0, 32000, size=(1, length))


def _reference(checkpoint: Path) -> Any:
    return PhimoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_logits(checkpoint: Path, prompt: np.ndarray, long_rope_switch: None) -> np.ndarray:
    with torch.no_grad():
        return _reference(checkpoint)(torch.from_numpy(prompt)).logits.numpy()[0]


def _agree_where_decided(ours: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """(argmax agreements, positions) over positions whose reference top-1/top-2 margin is wider
    than the largest logit difference there, i.e. where rounding cannot honestly flip the order."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > np.abs(ours - reference).max(-1)
    agree = ours.argmax(-1) == reference.argmax(-1)
    return int(agree[decided].sum()), int(decided.sum())


def test_int8_experts_match_transformers_at_every_position(
    model_factory: Callable[..., Path], prompt: np.ndarray, reference_logits: np.ndarray
) -> None:
    """fp32 export: dense part in float32, experts int8 (the most exact CPU QMoE has; its 8-bit
    kernel also quantizes activations to int8). Measured: cosine >= 0.99994 at 97% of the
    positions; at the rest the int8 noise flips a near-tied expert choice (min 0.981)."""
    exported = model_factory(MEMBER, "fp32")
    assert export.Manifest.read(exported).moe_experts == "int8"
    ours = onnx_logits(model_factory(MEMBER), exported, prompt)[0]
    cosine = cosines(ours, reference_logits)
    agree, decided = _agree_where_decided(ours, reference_logits)
    print(f"int8 experts: cosine min {cosine.min():.6f} mean {cosine.mean():.6f}, "
          f"{(cosine >= 0.999).mean():.1%} >= 0.999, argmax {agree}/{decided} decided")  # fmt: skip
    assert cosine.mean() >= 0.999
    assert (cosine >= 0.999).mean() >= 0.95
    assert cosine.min() >= 0.97
    assert agree == decided and decided >= 0.5 * len(ours)


def test_int4_export_is_close_to_transformers(
    model_factory: Callable[..., Path], prompt: np.ndarray, reference_logits: np.ndarray
) -> None:
    """INT4 everywhere (experts, attention, lm_head). On this random tiny model the rounding
    noise flips many near-tied expert choices, each swapping in an unrelated random expert:
    measured median cosine 0.973, mean 0.954, min 0.78."""
    ours = onnx_logits(model_factory(MEMBER), model_factory(MEMBER, "int4"), prompt)[0]
    cosine = cosines(ours, reference_logits)
    print(f"int4: cosine min {cosine.min():.4f} mean {cosine.mean():.4f} "
          f"median {np.median(cosine):.4f}")  # fmt: skip
    assert np.median(cosine) >= 0.96
    assert cosine.mean() >= 0.94


def _dequantized_experts(exported: Path) -> dict[str, np.ndarray]:
    """The QMoE expert weights read back from the ONNX file: (q - 2^(bits-1)) * scale per block
    along K, low nibble first for 4 bits."""
    import onnx

    model = onnx.load(str(exported / "model.onnx"))
    initializers = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QMoE")
    bits = next(a.i for a in node.attribute if a.name == "expert_weight_bits")

    def read(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name], base_dir=str(exported))

    weights = {}
    for name in initializers:
        if not name.endswith(".qweight"):
            continue
        q = read(name).astype(np.int32)
        scales = read(name.replace(".qweight", ".scales")).astype(np.float32)
        if bits == 4:
            q = np.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], q.shape[1], -1)
        experts, rows, k = q.shape
        blocks = scales.shape[-1]
        w = (q - 2 ** (bits - 1)).astype(np.float32).reshape(experts, rows, blocks, k // blocks)
        weights[name.removesuffix(".qweight")] = (w * scales[..., None]).reshape(experts, rows, k)
    return weights


@pytest.fixture(scope="module")
def int4_experts_float_rest(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phimoe") / "int4-experts-fp32-rest"
    return export.export(checkpoint, out, precision="fp32", moe_experts="int4", progress=print)


@pytest.fixture(scope="module")
def same_experts_reference(checkpoint: Path, int4_experts_float_rest: Path) -> Any:
    """transformers' model running the exported experts' own (dequantized) weights."""
    model = _reference(checkpoint)
    weights = _dequantized_experts(int4_experts_float_rest)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}.moe.experts"
            gate_up = weights[f"{prefix}.gate_up_proj"]  # rows interleaved g0, u0, g1, u1, ...
            gate_up = np.concatenate([gate_up[:, 0::2], gate_up[:, 1::2]], axis=1)
            layer.mlp.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
            layer.mlp.experts.down_proj.copy_(torch.from_numpy(weights[f"{prefix}.down_proj"]))
    return model


def test_the_graph_is_exact_given_the_same_expert_weights(
    checkpoint: Path,
    prompt: np.ndarray,
    int4_experts_float_rest: Path,
    same_experts_reference: Any,
    long_rope_switch: None,
) -> None:
    """Separate the graph from weight rounding: INT4 experts, everything else float32, against
    transformers running those same experts. Routing (sparsemixer weights included), the fused
    gate/up layout, LongRoPE, LayerNorm and every bias must then agree to float32 rounding."""
    with torch.no_grad():
        reference = same_experts_reference(torch.from_numpy(prompt)).logits.numpy()[0]
    ours = onnx_logits(checkpoint, int4_experts_float_rest, prompt)[0]
    diff = np.abs(ours - reference).max()
    print(f"same experts: max |diff| {diff:.2e} over {len(ours)} positions")
    assert diff <= 1e-4
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_token_by_token_decoding_matches_transformers_with_a_cache(
    prompt: np.ndarray,
    int4_experts_float_rest: Path,
    same_experts_reference: Any,
    long_rope_switch: None,
) -> None:
    """onnxruntime-genai fed one token per step (its KV cache, crossing the LongRoPE switch
    mid-way) against transformers fed one token per step with its own cache, same experts."""
    from transformers import DynamicCache

    tokens = prompt[0, :280]
    cache = DynamicCache(config=same_experts_reference.config)
    reference = []
    with torch.no_grad():
        for position, token in enumerate(tokens):
            out = same_experts_reference(
                torch.tensor([[token]]),
                past_key_values=cache,
                position_ids=torch.tensor([[position]]),
                use_cache=True,
            )
            reference.append(out.logits[0, -1].numpy())
    og_model = og.Model(str(int4_experts_float_rest))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(tokens) + 1)
    generator = og.Generator(og_model, params)
    ours = []
    for token in tokens:
        generator.append_tokens(np.array([[token]], dtype=np.int32))
        ours.append(np.array(generator.get_logits()).reshape(-1))
    diff = np.abs(np.stack(ours) - np.stack(reference)).max(-1)
    print(
        f"token by token: max |diff| {diff.max():.2e}; from position 256 on {diff[256:].max():.2e}"
    )
    assert diff.max() <= 1e-4


def test_the_hub_layout_and_transformers_layout_export_the_same_model(
    model_factory: Callable[..., Path], checkpoint: Path, tmp_path: Path
) -> None:
    """The published checkpoint stores w1/w2/w3 per expert; transformers 5's own module layout
    packs them into gate_up_proj / down_proj (its save_pretrained converts back to the hub
    layout, so that layout is written here directly). Both must give the same ONNX weights."""
    from safetensors.torch import save_file

    resaved = tmp_path / "resaved"
    resaved.mkdir()
    state = {k: v.contiguous() for k, v in _reference(checkpoint).state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(resaved / "model.safetensors"), metadata={"format": "pt"})
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        shutil.copy(checkpoint / name, resaved / name)
    ours = export.export(resaved, tmp_path / "out", progress=print)
    reference = model_factory(MEMBER, "int4")
    assert (ours / "model.onnx.data").read_bytes() == (reference / "model.onnx.data").read_bytes()


def test_the_runtime_serves_the_moe_model_greedily_like_transformers(
    int4_experts_float_rest: Path, same_experts_reference: Any
) -> None:
    """End to end through the client, the engine and our sampler: a greedy answer equals
    transformers' greedy continuation with the same experts."""
    from transformers import AutoTokenizer

    from phi3edge import ChatCompletionsClient, UserMessage

    question = "Tell me a story about a fox."
    client = ChatCompletionsClient(int4_experts_float_rest)
    try:
        answer = client.complete(messages=[UserMessage(question)], max_tokens=8, temperature=0)
    finally:
        client.close()
    tokenizer = AutoTokenizer.from_pretrained(int4_experts_float_rest)
    ids = tokenizer(f"<|user|>\n{question}<|end|>\n<|assistant|>\n", add_special_tokens=False)
    prompt = torch.tensor([ids["input_ids"]])
    with torch.no_grad():
        continuation = same_experts_reference.generate(
            prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, prompt.shape[1] :]
    assert answer.usage.prompt_tokens == prompt.shape[1]
    assert answer.choices[0].message.content == tokenizer.decode(continuation)
