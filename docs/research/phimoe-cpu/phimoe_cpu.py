"""Export transformers' PhimoeForCausalLM (Phi-3.5-MoE) to ONNX for onnxruntime's CPU provider.

Prototype for phi3edge issue 10 (scratch; not wired into phi3edge/export.py). Pinned to
onnxruntime-genai 0.18's model builder and onnxruntime 1.32's com.microsoft::QMoE CPU kernel.

    # experts' bits, then the precision of the rest:
    python phimoe_cpu.py SRC_DIR OUT_DIR [int4|int8 [int4|fp32 [KEY=VALUE...]]]

What differs from the builder's own Phi3MoELongRoPEModel (builders/phi.py:550):
  * base class Phi3MiniLongRoPEModel (phi.py:70) instead of MistralModel, for longrope;
  * experts read from transformers 5's packed `mlp.experts.gate_up_proj` / `down_proj` and fused
    (interleaved) into FC1 with activation swiglu / swiglu_fusion=1 (base.py:5381), no FC3;
  * sparsemixer routing computed in the graph and given to QMoE as `router_weights` (input 14);
  * router MatMul kept in fp32 (a discrete choice; INT4 could flip the selected experts);
  * our own `export()` instead of builder.create_model, whose dispatch (builder.py:755) only knows
    "PhiMoEForCausalLM" and forces CUDA + INT4.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch


def _builder():
    importlib.import_module("onnxruntime_genai.models")  # puts the builder's folder on sys.path
    return importlib.import_module("builder")


builder = _builder()
import onnx_ir as ir  # noqa: E402
from builders.phi import Phi3MiniLongRoPEModel  # noqa: E402  (same module objects builder.py uses)


class PhimoeCPUModel(Phi3MiniLongRoPEModel):
    def __init__(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options):
        super().__init__(config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
        self.layernorm_attrs["simple"] = (
            False  # Phi-3.5-MoE uses LayerNorm (with bias), not RMSNorm
        )
        self.moe_intermediate_size = config.intermediate_size  # used by the zero-bias initializers
        self.moe_attrs.update(
            activation_type="swiglu",  # silu(gate) * up == swiglu with alpha=1, beta=0, no limit
            swiglu_fusion=1,  # gate/up interleaved in FC1: the CPU kernel has no separate FC3
            normalize_routing_weights=False,
            use_sparse_mixer=False,  # the CPU kernel ignores it; routing comes in router_weights
        )
        if self.moe_attrs["op_type"] != "QMoE":
            raise ValueError("experts must be quantized: pass moe_quant_type=int4 or int8")

    def get_moe_module(self, layer_id, layer):
        return layer.mlp  # PhimoeSparseMoeBlock: .router (nn.Linear H->E), .experts (packed)

    def make_moe_preprocessing(self, layer_id, moe, root_input):
        # gate_up_proj [E, 2I, H] / down_proj [E, H, I] are already [N, K] per expert, which is what
        # make_qmoe_weights wants (no transpose, unlike phi.py:607).
        self.make_interleaved_swiglu_moe_preprocessing(layer_id, moe)

    def make_moe_router(self, layer_id, moe, root_input):
        """Router logits L, and sparsemixer's top-2 mixing weights as a dense [rows, E] tensor.

        Inference-mode sparsemixer (transformers modeling_phimoe.sparsemixer,
        eps = router_jitter_noise):
          m1, i1 = max(L);  keep1 = (m1 - L) / max(|L|, m1) <= 2 eps
          w1 = 1 / sum_keep1 exp(L - m1)
          m2, i2 = max(L without i1);  keep2 = (m2 - L) / max(|L|, m2) <= 2 eps and j != i1
          w2 = 1 / sum_keep2 exp(L - m2)
        QMoE picks i1, i2 itself from router_probs = L (top-k order is the same) and gathers the
        mixing weights at those indices from router_weights, so router_weights = Where(j == i1, w1, w2).
        """
        b = f"/model/layers.{layer_id}/moe/router"
        rows = self.make_moe_router_shape()
        col = self.make_moe_router_shape(last_dim=1)
        num_experts = self.moe_attrs["num_experts"]
        f32 = ir.DataType.FLOAT
        assert self.io_dtype == f32, "prototype: CPU fp32 activations only"

        self.exclude_node_from_quantization(f"{b}/MatMul")
        matmul = self.make_matmul(moe.router, f"{b}/MatMul", root_input)
        self.make_reshape(
            f"{b}/Reshape",
            [f"{matmul}/output_0", f"/model/constants/INT64/{[-1, num_experts]}"],
            f32,
            rows,
        )
        logits = f"{b}/Reshape/output_0"

        self.make_topk(
            f"{b}/TopK",
            [logits, "/model/constants/INT64/[2]"],
            f32,
            self.make_moe_router_shape(last_dim=2),
        )
        self.make_split(
            f"{b}/SplitValues",
            [f"{b}/TopK/output_0"],
            [f"{b}/m1", f"{b}/m2"],
            [f32, f32],
            [col, col],
            axis=-1,
            num_outputs=2,
        )
        self.make_split(
            f"{b}/SplitIndices",
            [f"{b}/TopK/output_1"],
            [f"{b}/i1", f"{b}/i2"],
            [ir.DataType.INT64] * 2,
            [col, col],
            axis=-1,
            num_outputs=2,
        )
        self.make_node("Abs", [logits], [f"{b}/Abs/output_0"], name=f"{b}/Abs")
        self.make_value(f"{b}/Abs/output_0", f32, rows)
        iota = f"/model/constants/INT64/{list(range(num_experts))}"
        self.make_equal(f"{b}/IsTop1", [iota, f"{b}/i1"], rows)

        eps2 = 2.0 * float(self.router_jitter_noise)
        weights = []
        for t in (1, 2):
            p, m = f"{b}/top{t}", f"{b}/m{t}"
            self.make_node("Max", [f"{b}/Abs/output_0", m], [f"{p}/Max/output_0"], name=f"{p}/Max")
            self.make_value(f"{p}/Max/output_0", f32, rows)
            self.make_sub(f"{p}/Gap", [m, logits], f32, rows)
            self.make_div(f"{p}/RelGap", [f"{p}/Gap/output_0", f"{p}/Max/output_0"], f32, rows)
            self.make_greater(
                f"{p}/Masked", [f"{p}/RelGap/output_0", f"/model/constants/FLOAT/{eps2}"], rows
            )
            masked = f"{p}/Masked/output_0"
            if t == 2:  # the first choice is excluded from the second softmax
                self.make_node(
                    "Or", [masked, f"{b}/IsTop1/output_0"], [f"{p}/Or/output_0"], name=f"{p}/Or"
                )
                self.make_value(f"{p}/Or/output_0", ir.DataType.BOOL, rows)
                masked = f"{p}/Or/output_0"
            self.make_sub(f"{p}/Shift", [logits, m], f32, rows)
            self.make_exp(f"{p}/Exp", f"{p}/Shift/output_0", f32, rows)
            self.make_where(
                f"{p}/Keep", [masked, "/model/constants/FLOAT/0.0", f"{p}/Exp/output_0"], f32, rows
            )
            self.make_reduce_sum(
                f"{p}/Sum",
                [f"{p}/Keep/output_0", "/model/constants/INT64/[-1]"],
                f32,
                col,
                keepdims=True,
            )
            self.make_reciprocal(f"{p}/Weight", f"{p}/Sum/output_0", f32, col)
            weights.append(f"{p}/Weight/output_0")
        self.make_where(f"{b}/RouterWeights", [f"{b}/IsTop1/output_0", *weights], f32, rows)
        return logits, f"{b}/RouterWeights/output_0"

    def make_moe(self, layer_id, moe, root_input):
        self.make_moe_preprocessing(layer_id, moe, root_input)
        router_probs, router_weights = self.make_moe_router(layer_id, moe, root_input)
        name = f"/model/layers.{layer_id}/moe/QMoE"
        n = self.make_moe_expert_names(layer_id)
        attrs = {}
        if "block_size" in self.moe_attrs:  # set by make_qmoe_weights when qmoe_block_size > 0
            attrs["block_size"] = self.moe_attrs["block_size"]
        self.make_node(
            "QMoE",
            inputs=[
                root_input,  # 0 input [B, S, H]
                router_probs,  # 1 router_probs [B*S, E]: top-k selection only
                n["gate_up_weight"],  # 2 fc1 weights [E, 2I, H*bits/8], gate/up rows interleaved
                n["gate_up_scales"],  # 3 fc1 scales [E, 2I, H/block]
                n["gate_up_bias"],  # 4 fc1 bias (zeros)
                n["down_weight"],  # 5 fc2 weights [E, H, I*bits/8]
                n["down_scales"],  # 6 fc2 scales [E, H, I/block]
                n["down_bias"],  # 7 fc2 bias (zeros)
                "",
                "",
                "",  # 8-10 fc3 weights/scales/bias: none (fused swiglu)
                "",
                "",
                "",  # 11-13 zero points: none (symmetric, implicit 2^(bits-1))
                router_weights,  # 14 router_weights [B*S, E]: sparsemixer mixing weights
            ],
            outputs=[f"{name}/output_0"],
            name=name,
            domain="com.microsoft",
            activation_type="swiglu",
            activation_alpha=1.0,
            activation_beta=0.0,
            swiglu_fusion=1,
            expert_weight_bits=self.moe_attrs["expert_weight_bits"],
            k=self.moe_attrs["top_k"],
            normalize_routing_weights=0,
            use_sparse_mixer=0,
            **attrs,
        )
        self.make_value(f"{name}/output_0", self.io_dtype, shape=self.make_hidden_state_shape())
        self.layernorm_attrs["skip_input"] = f"{name}/output_0"

    def make_moe_attrs_init(self, config):
        super().make_moe_attrs_init(config)
        self.router_jitter_noise = getattr(config, "router_jitter_noise", 0.01)


def export(src, out, expert_bits="int4", precision="int4", block_size=32, cache_dir=None, extra=()):
    """builder.create_model's body (builder.py:608-835) with our class in place of its dispatch."""
    cache_dir = cache_dir or os.path.join(out, ".cache")
    options = [f"moe_quant_type={expert_bits}", f"qmoe_block_size={block_size}", *extra]
    opts = builder.parse_extra_options(None, src, out, precision, "cpu", cache_dir, options)
    effective = opts.pop("_effective_builder_config")
    hf = opts.pop("hf_details")
    extra_kwargs, hf_name, config = hf.pop("extra_kwargs"), hf.pop("hf_name"), hf.pop("hf_config")
    if config.architectures[0] not in ("PhimoeForCausalLM", "PhiMoEForCausalLM"):
        raise ValueError(f"{src} is a {config.architectures[0]}, not a Phi-3.5-MoE checkpoint")
    quant_config = opts.get("_quant_config")
    if quant_config is not None:
        io_dtype, onnx_dtype = quant_config.to_onnx_dtypes()
    else:
        io_dtype = builder.set_io_dtype(effective.precision, "cpu", opts)
        onnx_dtype = builder.set_onnx_dtype(effective.precision, opts)
    os.makedirs(out, exist_ok=True)
    os.makedirs(cache_dir, exist_ok=True)
    with torch.no_grad():
        model = PhimoeCPUModel(config, io_dtype, onnx_dtype, "cpu", cache_dir, opts)
        model.make_model(src)
        model.save_model(out)
    model.make_genai_config(config, extra_kwargs, out)
    model.save_processing(hf_name, extra_kwargs, out)
    return out


if __name__ == "__main__":
    # python phimoe_cpu.py SRC OUT [expert bits: int4|int8] [precision of the rest: int4|fp32]
    #     [KEY=VALUE ...]
    export(sys.argv[1], sys.argv[2], *(sys.argv[3:5] or ["int4"]), extra=sys.argv[5:])
