"""Write a tiny random PhimoeForCausalLM checkpoint (+ phi3edge's Phi-3 tokenizer) to ./tiny-phimoe.

Same class, LayerNorm, attention/lm_head biases, top-2 sparsemixer routing and longrope scaling
(short/long factors + mscales, long/original ratio 32) as the published Phi-3.5-MoE config, scaled
down: 2 layers, hidden 64, 4 heads (head_dim 16) / 1 kv head (real 4:1 group), 4 experts,
intermediate 128. Uses phi3edge.fixtures / tokenizer_fixture read-only.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import PhimoeConfig, PhimoeForCausalLM

from phi3edge import catalog
from phi3edge.tokenizer_fixture import build_phi3_tokenizer, phi3_tokenizer_config

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-phimoe")
ROUTER = sys.argv[2] if len(sys.argv) > 2 else "spread"  # spread | shared
out.mkdir(parents=True, exist_ok=True)

published = json.loads(
    (
        Path(catalog.__file__).parent / "data/phi3-family/phi-3.5-moe-instruct.config.partial.json"
    ).read_text()
)
frag = json.loads(
    (
        Path(catalog.__file__).parent / "data/phi3-family/rope-scaling-fragments.partial.json"
    ).read_text()
)["phi-3.5-moe-instruct"]

hidden, heads, kv_heads = 64, 4, 1
head_dim = hidden // heads
half = head_dim // 2
orig_ctx = 256
ratio = published["max_position_embeddings"] // published["original_max_position_embeddings"]  # 32
# Real factor lists are 64 long (head_dim 128); take an evenly spaced subsample of the known prefix.
long_known = frag["long_factor_first_36"]
long_factor = [long_known[round(i * (len(long_known) - 1) / (half - 1))] for i in range(half)]
short_factor = [1.0 + 0.05 * i for i in range(half)]

cfg = {k: v for k, v in published.items() if k not in ("auto_map", "architectures")}
cfg.update(
    hidden_size=hidden,
    intermediate_size=128,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    num_hidden_layers=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    original_max_position_embeddings=orig_ctx,
    max_position_embeddings=orig_ctx * ratio,
    sliding_window=orig_ctx * ratio,
    torch_dtype="float32",
    initializer_range=0.05,
    rope_scaling={
        "type": "longrope",
        "rope_type": "longrope",
        "short_factor": short_factor,
        "long_factor": long_factor,
        "short_mscale": frag["short_mscale"],
        "long_mscale": frag["long_mscale"],
        "original_max_position_embeddings": orig_ctx,
    },
)
config = PhimoeConfig(**cfg)
config.architectures = ["PhimoeForCausalLM"]
torch.manual_seed(0)
model = PhimoeForCausalLM(config).eval()
# Random (non-default) norms and biases so every bias path is exercised.
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.05 * torch.randn_like(p))
        elif "router" in name and ROUTER == "shared":
            # rows = one shared direction + small noise: logits large and close,
            # so sparsemixer keeps
            # several experts in its softmaxes (mixing weights < 1)
            p.copy_(0.5 * torch.randn_like(p[:1]) + 0.01 * torch.randn_like(p))
        elif "router" in name:
            p.copy_(
                0.5 * torch.randn_like(p)
            )  # spread router logits: sparsemixer masks nearly everything
model.save_pretrained(out)
gen = catalog.load_data_json("generation-configs.json")["Phi-3.5-MoE-instruct"].get("current", {})
(out / "generation_config.json").write_text(
    json.dumps({k: v for k, v in gen.items() if k != "transformers_version"}, indent=2)
)
template = catalog.chat_templates()["Phi-3.5-MoE-instruct"]["chat_template"]
build_phi3_tokenizer().save(str(out / "tokenizer.json"))
(out / "tokenizer_config.json").write_text(
    json.dumps(phi3_tokenizer_config(template, config.max_position_embeddings), indent=2)
)
print(out, sorted(p.name for p in out.iterdir()))
print(json.dumps(json.loads((out / "config.json").read_text()), indent=0)[:1500])
