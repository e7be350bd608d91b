"""Random-weight Phi-3 checkpoints with the exact (or a scaled-down) real architecture.

Input: a catalog id, a size (``full`` = the published architecture, ``tiny`` = same class, rope
type, LongRoPE factor shape and grouped-query layout with a few narrow layers) and an output folder.
Output: an ordinary Hugging Face folder (config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json; for Phi-3-small cl100k_base.tiktoken and
special_tokens_map.json instead of tokenizer.json, as published) that loads through exactly the
code a real checkpoint does.
Errors: ``UnknownModelError`` for a name outside the family, ``ValueError`` for members whose
architecture cannot be built here (see the catalog's ``cpu_note``), ``FileExistsError`` for a
non-empty output folder.

Real weights cannot be downloaded on our machines, so tests and benchmarks get their models here.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phi3edge import catalog
from phi3edge.export import SMALL, staged_folder
from phi3edge.tiktoken_convert import TIKTOKEN_FILE, write_ranks
from phi3edge.tokenizer_fixture import (
    PHI3_SMALL_SPECIAL_TOKENS_MAP,
    build_phi3_tokenizer,
    phi3_small_stand_in_ranks,
    phi3_small_tokenizer_config,
    phi3_tokenizer_config,
)

log = logging.getLogger(__name__)

# Trailing keys the partial mini-128k config lacks; Phi-3.5-mini (same shape) has these values and
# copies derived from the April-2024 upload show the same (data/phi3-family/SOURCES.md).
_MINI_LONG_TRAILING = {
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "attention_bias": False,
    "vocab_size": 32064,
}

# tiny: heads keep the real head_dim (so LongRoPE lists keep their length) and the real
# query/kv group ratio; context keeps the real long/original ratio.
_TINY = {"num_hidden_layers": 2, "intermediate_size": 256}
_TINY_ORIGINAL_CONTEXT = 256

# Keys the partial small-128k config lacks: small-8k's values (SOURCES.md: presumably the same).
_SMALL_LONG_TRAILING = {
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "attention_bias": False,
    "vocab_size": 100352,
}
# tiny Phi-3-small: narrow sparse blocks so a prompt of a few hundred tokens crosses several blocks
# and vertical strides (published: 64-token blocks, 16 local, stride 8 -> sparse only past 1024);
# 2 layers = one block-sparse and one dense layer.
_TINY_SMALL = {
    "num_hidden_layers": 2,
    "ff_intermediate_size": 256,
    "blocksparse_block_size": 16,
    "blocksparse_triton_kernel_block_size": 16,
    "blocksparse_num_local_blocks": 2,
    "blocksparse_vert_stride": 4,
}
# Phi-3-small's generation_config.json is known for 128k only; 8k uses the same ids here.
_SMALL_GENERATION = {"bos_token_id": 100257, "eos_token_id": [100257, 100266]}


def small_128k_rope_scaling_stand_in(head_dim: int = 128) -> dict[str, Any]:
    """A LongRoPE ``rope_scaling`` shaped like the family's (type longrope, head_dim / 2 factors
    per list, short ~1, long rising), for random Phi-3-small-128k checkpoints. The published
    values were not recovered (data/phi3-family/SOURCES.md); no mscale keys, so the model's
    defaults apply (short 1.0, long sqrt(1 + ln 16 / ln 8192))."""
    half = head_dim // 2
    return {
        "type": "longrope",
        "short_factor": [round(1.0 + 0.5 * (i / half) ** 4, 4) for i in range(half)],
        "long_factor": [round(1.0 + 40.0 * (i / half) ** 2, 4) for i in range(half)],
        "phi3edge_stand_in": "published values not recovered; see SOURCES.md",
    }


def buildable_members() -> list[str]:
    """Members whose exact architecture we can build with random weights."""
    return [m.id for m in catalog.CATALOG if _full_config_or_none(m) is not None]


def checkpoint_config(member_id: str, size: str = "tiny") -> dict[str, Any]:
    """The config.json of a random checkpoint of ``member_id`` at ``size``."""
    member = catalog.get(member_id)
    config = _full_config_or_none(member)
    if config is None:
        raise ValueError(
            f"cannot build a random {member.id} checkpoint: "
            f"{member.cpu_note or 'its published config is incomplete'}"
        )
    if size == "full":
        return config
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if member.architecture == SMALL:
        config.update(_TINY_SMALL)
    else:
        config.update(_TINY)
    head_dim = member.head_dim
    group = member.num_heads // member.num_kv_heads
    kv_heads = 1 if group > 1 else 2
    heads = kv_heads * group
    config["num_attention_heads"] = heads
    config["num_key_value_heads"] = kv_heads
    config["hidden_size"] = heads * head_dim
    if member.uses_longrope:
        ratio = member.context_length // member.original_context_length
        config["original_max_position_embeddings"] = _TINY_ORIGINAL_CONTEXT
        config["max_position_embeddings"] = _TINY_ORIGINAL_CONTEXT * ratio
        if "original_max_position_embeddings" in config["rope_scaling"]:
            config["rope_scaling"]["original_max_position_embeddings"] = _TINY_ORIGINAL_CONTEXT
        if config.get("sliding_window"):
            config["sliding_window"] = config["max_position_embeddings"]
    else:
        config["max_position_embeddings"] = 2048
        config["original_max_position_embeddings"] = 2048
        if config.get("sliding_window"):
            config["sliding_window"] = 2047
    return config


def _full_config_or_none(member: catalog.FamilyMember) -> dict[str, Any] | None:
    if member.architecture == SMALL:
        return _small_full_config(member)
    if member.architecture not in ("Phi3ForCausalLM", "PhiMoEForCausalLM"):
        return None
    config = copy.deepcopy(member.published_config())
    if member.id == "phi-3-mini-128k":
        for key, value in _MINI_LONG_TRAILING.items():
            config.setdefault(key, value)
    if member.id == "phi-3.5-moe":
        config["rope_scaling"] = _moe_rope_scaling()
    if "rope_scaling" not in config or "vocab_size" not in config:
        return None  # medium-128k: rope lists incomplete
    config.pop("auto_map", None)  # transformers has Phi-3 built in; no remote code
    config["phi3edge_catalog_id"] = member.id
    return config


def _moe_rope_scaling() -> dict[str, Any]:
    """Phi-3.5-MoE's longrope block. Only the first 36 long and 8 short factors are published
    (data/phi3-family/SOURCES.md); the rest repeat the last known value. Factor values change
    which frequencies rotate how fast, not the architecture or its speed."""
    fragments = catalog.load_data_json("rope-scaling-fragments.partial.json")[
        "phi-3.5-moe-instruct"
    ]
    length = fragments["expected_list_length"]

    def padded(known: list[float]) -> list[float]:
        return known + [known[-1]] * (length - len(known))

    return {
        "type": "longrope",
        "long_factor": padded(fragments["long_factor_first_36"]),
        "short_factor": padded(fragments["short_factor_first_8"]),
        "long_mscale": fragments["long_mscale"],
        "short_mscale": fragments["short_mscale"],
        "original_max_position_embeddings": fragments["original_max_position_embeddings"],
    }


def _small_full_config(member: catalog.FamilyMember) -> dict[str, Any]:
    """Phi-3-small's published config.json; for 128k the missing trailing keys and a stand-in
    rope_scaling. No auto_map: phi3edge.phi3_small is the model code, nothing remote."""
    config = copy.deepcopy(member.published_config())
    config.pop("auto_map", None)
    if member.uses_longrope:
        for key, value in _SMALL_LONG_TRAILING.items():
            config.setdefault(key, value)
        config.setdefault("rope_scaling", small_128k_rope_scaling_stand_in(member.head_dim))
    config["phi3edge_catalog_id"] = member.id
    return config


def write_random_checkpoint(
    member_id: str,
    out: str | Path,
    size: str = "tiny",
    seed: int = 0,
    layers: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint folder and return its path.

    Weights are written one tensor group at a time (bf16 for ``full``, fp32 for ``tiny``), so a
    full-size Phi-3-medium never needs its whole float32 state in memory. ``layers`` overrides the
    depth (a full-width model with fewer layers measures per-layer costs of a model too big here);
    ``overrides``, other config.json values (a mid-size model for benchmarks that need no full
    one).
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty")
    config = checkpoint_config(member_id, size)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be at least 1, not {layers}")
        config["num_hidden_layers"] = layers
    config.update(overrides or {})
    member = catalog.get(member_id)
    full = size == "full"
    config["torch_dtype"] = "bfloat16" if full else "float32"
    with staged_folder(out) as staging:
        rng = torch.Generator().manual_seed(seed)
        shards: dict[str, str] = {}
        tensor_groups = (
            _random_small_tensors(config, rng, bf16=full)
            if member.architecture == SMALL
            else _random_tensors(config, rng, bf16=full)
        )
        for index, tensors in enumerate(tensor_groups):
            name = f"model-{index:05d}.safetensors"
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
            shards.update(dict.fromkeys(tensors, name))
            log.info("wrote %s (%d tensors)", name, len(tensors))
        index_json = {"metadata": {}, "weight_map": shards}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        generation = catalog.load_data_json("generation-configs.json")
        fallback = (
            _SMALL_GENERATION
            if member.architecture == SMALL
            else {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
        )
        gen = (generation.get(member.hf_id.split("/")[1]) or {}).get("current") or fallback
        gen = {k: v for k, v in gen.items() if k != "transformers_version"}
        (staging / "generation_config.json").write_text(json.dumps(gen, indent=2))
        templates = catalog.chat_templates()
        # Phi-3.5-MoE's own template was not recovered (SOURCES.md): the Phi-3.5 format stands in.
        template = (
            templates[member.hf_id.split("/")[1]]["chat_template"]
            or templates["Phi-3.5-mini-instruct"]["chat_template"]
        )
        if member.architecture == SMALL:
            # As published: tiktoken's file and the remote tokenizer's config, no tokenizer.json
            # (the export converts it, as it does a real checkpoint's).
            write_ranks(phi3_small_stand_in_ranks(), staging / TIKTOKEN_FILE)
            tokenizer_config = phi3_small_tokenizer_config(
                template, config["max_position_embeddings"]
            )
            special_map = json.dumps(PHI3_SMALL_SPECIAL_TOKENS_MAP, indent=2)
            (staging / "special_tokens_map.json").write_text(special_map)
        else:
            build_phi3_tokenizer().save(str(staging / "tokenizer.json"))
            tokenizer_config = phi3_tokenizer_config(template, config["max_position_embeddings"])
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def _random_tensors(config: dict[str, Any], rng: Any, bf16: bool) -> Iterator[dict[str, Any]]:
    """Yield the checkpoint's tensors grouped per layer, in the published checkpoints' naming."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = hidden // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    std = config.get("initializer_range", 0.02)

    def normal(*shape: int) -> Any:
        return (torch.randn(shape, generator=rng) * std).to(dtype)

    def ones(n: int) -> Any:
        return (1.0 + 0.1 * torch.randn(n, generator=rng)).to(dtype)

    yield {"model.embed_tokens.weight": normal(vocab, hidden)}
    moe = config.get("model_type") == "phimoe"
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
        }
        if moe:  # the hub layout: separate q/k/v/o with biases, LayerNorm biases, w1/w2/w3 experts
            kv = kv_heads * head_dim
            for name, rows in (("q", hidden), ("k", kv), ("v", kv), ("o", hidden)):
                layer[p + f"self_attn.{name}_proj.weight"] = normal(rows, hidden)
                layer[p + f"self_attn.{name}_proj.bias"] = normal(rows)
            layer[p + "input_layernorm.bias"] = normal(hidden)
            layer[p + "post_attention_layernorm.bias"] = normal(hidden)
            layer[p + "block_sparse_moe.gate.weight"] = normal(config["num_local_experts"], hidden)
            for e in range(config["num_local_experts"]):
                expert = p + f"block_sparse_moe.experts.{e}."
                layer[expert + "w1.weight"] = normal(inter, hidden)
                layer[expert + "w2.weight"] = normal(hidden, inter)
                layer[expert + "w3.weight"] = normal(inter, hidden)
        else:
            qkv_rows = (heads + 2 * kv_heads) * head_dim
            layer[p + "self_attn.qkv_proj.weight"] = normal(qkv_rows, hidden)
            layer[p + "self_attn.o_proj.weight"] = normal(hidden, hidden)
            layer[p + "mlp.gate_up_proj.weight"] = normal(2 * inter, hidden)
            layer[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        yield layer
    last = {"model.norm.weight": ones(hidden), "lm_head.weight": normal(vocab, hidden)}
    if moe:
        last.update({"model.norm.bias": normal(hidden), "lm_head.bias": normal(vocab)})
    yield last


def _random_small_tensors(config: dict[str, Any], rng: Any, bf16: bool) -> Iterator[dict[str, Any]]:
    """Phi3SmallForCausalLM's tensors in the published naming (fused, per-KV-head-grouped
    query_key_value; LayerNorms and projections with bias; lm_head tied to the embeddings, so
    absent), grouped per layer."""
    import torch

    from phi3edge.phi3_small import Phi3SmallConfig, state_dict_names

    dtype = torch.bfloat16 if bf16 else torch.float32
    small = Phi3SmallConfig.from_dict(config)
    std = config.get("initializer_range", 0.02)
    hidden, heads, kv_heads = (
        small.hidden_size,
        small.num_attention_heads,
        small.num_key_value_heads,
    )
    shapes = {
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "self_attn.query_key_value": ((heads + 2 * kv_heads) * small.head_dim, hidden),
        "self_attn.dense": (hidden, hidden),
        "mlp.up_proj": (2 * small.intermediate_size, hidden),
        "mlp.down_proj": (hidden, small.intermediate_size),
    }

    def tensor(name: str) -> Any:
        if name == "model.embed_tokens.weight":
            return (torch.randn(small.vocab_size, hidden, generator=rng) * std).to(dtype)
        module, kind = name.rsplit(".", 1)
        key = module.split(".", 3)[-1] if module.startswith("model.layers.") else module
        shape = (hidden,) if key == "model.final_layernorm" else shapes[key]
        if kind == "bias":
            return (torch.randn(shape[0], generator=rng) * std).to(dtype)
        if key.endswith("layernorm"):
            return (1.0 + 0.1 * torch.randn(shape, generator=rng)).to(dtype)
        return (torch.randn(shape, generator=rng) * std).to(dtype)

    layers: dict[str, dict[str, Any]] = {}
    for name in state_dict_names(small):  # module order: embeddings, layers, final norm
        group = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        layers.setdefault(group, {})[name] = tensor(name)
        if not name.startswith("model.layers.") or len(layers[group]) == 12:
            yield layers.pop(group)


def write_random_lora(
    checkpoint: str | Path,
    out: str | Path,
    targets: tuple[str, ...] | list[str] = ("qkv_proj", "o_proj"),
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    use_rslora: bool = False,
) -> Path:
    """A PEFT LoRA adapter with random weights for ``checkpoint``, written by PEFT itself.

    PEFT's default initialisation zeroes ``lora_B`` (the adapter starts as the base model); here
    ``lora_B`` is drawn like the checkpoint's own weights (normal, std 0.02), so the adapter
    changes the logits visibly but, as a trained one does, by less than the base projections
    give (fully random matrices at PEFT's scaling would swamp the base model). Needs ``peft``
    (the ``test`` extra)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out)
    return out
