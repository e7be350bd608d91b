"""Phi-3.5-MoE for onnxruntime's CPU provider: a subclass of onnxruntime-genai's model builder.

Input: a Phi-3.5-MoE checkpoint (hub layout ``PhiMoEForCausalLM`` with ``block_sparse_moe`` experts,
or transformers' own ``PhimoeForCausalLM`` layout; transformers loads both), an output folder, the
builder's precision for the dense part and the experts' bits (int4 or int8).
Output: model.onnx with one ``com.microsoft::QMoE`` node per layer, genai_config.json, tokenizer.
Errors: ``ValueError`` for a checkpoint that is not Phi-3.5-MoE or expert bits the CPU kernel lacks.

Why a subclass: onnxruntime-genai 0.18's own PhiMoE path targets CUDA only. It matches only the
hub's architecture name and forces CUDA + INT4; its class inherits Mistral's RoPE (no longrope);
it reads per-expert ``w1/w2/w3`` modules, transposes them for the quantizer and emits a separate FC3
that the CPU kernel lacks; and the CPU kernel ignores ``use_sparse_mixer``, so Phi-3.5-MoE's routing
must be computed in the graph. docs/research/phimoe-cpu/FINDINGS.md has the evidence for each.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

ARCHITECTURES = ("PhimoeForCausalLM", "PhiMoEForCausalLM")
EXPERT_BITS = ("int4", "int8")


@lru_cache(maxsize=1)
def model_class() -> type:
    """Build the subclass lazily: importing the builder is slow and edits sys.path."""
    import onnx_ir as ir
    from builders.phi import Phi3MiniLongRoPEModel  # importable once load_builder() ran

    class PhimoeCPUModel(Phi3MiniLongRoPEModel):
        """Phi-3 LongRoPE attention (with biases) + LayerNorm + QMoE experts with sparsemixer
        routing weights computed in the graph."""

        def __init__(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options):
            super().__init__(config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
            if self.moe_attrs["op_type"] != "QMoE":
                raise ValueError("Phi-3.5-MoE experts must be quantized (int4 or int8) on CPU")
            if self.io_dtype != ir.DataType.FLOAT:
                raise ValueError("Phi-3.5-MoE on CPU runs with float32 activations")
            self.layernorm_attrs["simple"] = False  # nn.LayerNorm with bias, not RMSNorm
            self.moe_intermediate_size = config.intermediate_size  # sizes the zero expert biases
            self.moe_attrs.update(
                activation_type="swiglu",  # silu(gate) * up: swiglu with alpha 1, beta 0, no limit
                swiglu_fusion=1,  # gate/up rows interleaved in FC1; the CPU kernel has no FC3
                normalize_routing_weights=False,
                use_sparse_mixer=False,  # ignored by the CPU kernel; weights come from the graph
            )

        def make_moe_attrs_init(self, config):
            super().make_moe_attrs_init(config)
            self.router_jitter_noise = float(getattr(config, "router_jitter_noise", 0.01))

        def get_moe_module(self, layer_id, layer):
            return layer.mlp  # PhimoeSparseMoeBlock: .router (H -> E), .experts (packed)

        def make_moe_preprocessing(self, layer_id, moe, root_input):
            # gate_up_proj [E, 2I, H] and down_proj [E, H, I] are already [N, K] per expert, as
            # the quantizer wants them; the helper interleaves gate/up rows and quantizes.
            self.make_interleaved_swiglu_moe_preprocessing(layer_id, moe)

        def make_moe_router(self, layer_id, moe, root_input):
            """Router logits L and sparsemixer's mixing weights as a dense [rows, E] tensor.

            transformers' ``sparsemixer`` at inference, eps = router_jitter_noise:
              m1, i1 = max(L);  keep1 = (m1 - L) / max(|L|, m1) <= 2 eps
              w1 = 1 / sum over keep1 of exp(L - m1)
              m2, i2 = max(L without i1);  keep2 = the same test against m2, and j != i1
              w2 = 1 / sum over keep2 of exp(L - m2)
            QMoE selects i1, i2 itself from L (same order as TopK) and gathers the mixing weights
            at those columns, so router_weights = Where(j == i1, w1, w2).
            """
            b = f"/model/layers.{layer_id}/moe/router"
            f32 = ir.DataType.FLOAT
            rows = self.make_moe_router_shape()
            col = self.make_moe_router_shape(last_dim=1)
            experts = self.moe_attrs["num_experts"]

            # The router stays float: INT4 logits could change which experts are chosen.
            self.exclude_node_from_quantization(f"{b}/MatMul")
            matmul = self.make_matmul(moe.router, f"{b}/MatMul", root_input)
            shape = f"/model/constants/INT64/{[-1, experts]}"
            self.make_reshape(f"{b}/Reshape", [f"{matmul}/output_0", shape], f32, rows)
            logits = f"{b}/Reshape/output_0"

            top2 = self.make_moe_router_shape(last_dim=2)
            self.make_topk(f"{b}/TopK", [logits, "/model/constants/INT64/[2]"], f32, top2)
            self.make_split(
                f"{b}/SplitValues", [f"{b}/TopK/output_0"], [f"{b}/m1", f"{b}/m2"],
                [f32, f32], [col, col], axis=-1, num_outputs=2,
            )  # fmt: skip
            self.make_split(
                f"{b}/SplitIndices", [f"{b}/TopK/output_1"], [f"{b}/i1", f"{b}/i2"],
                [ir.DataType.INT64] * 2, [col, col], axis=-1, num_outputs=2,
            )  # fmt: skip
            self.make_node("Abs", [logits], [f"{b}/Abs/output_0"], name=f"{b}/Abs")
            self.make_value(f"{b}/Abs/output_0", f32, rows)
            iota = f"/model/constants/INT64/{list(range(experts))}"
            self.make_equal(f"{b}/IsTop1", [iota, f"{b}/i1"], rows)

            threshold = f"/model/constants/FLOAT/{2.0 * self.router_jitter_noise}"
            weights = []
            for t in (1, 2):
                p, m = f"{b}/top{t}", f"{b}/m{t}"
                self.make_node(
                    "Max", [f"{b}/Abs/output_0", m], [f"{p}/Max/output_0"], name=f"{p}/Max"
                )
                self.make_value(f"{p}/Max/output_0", f32, rows)
                self.make_sub(f"{p}/Gap", [m, logits], f32, rows)
                self.make_div(f"{p}/RelGap", [f"{p}/Gap/output_0", f"{p}/Max/output_0"], f32, rows)
                self.make_greater(f"{p}/Masked", [f"{p}/RelGap/output_0", threshold], rows)
                masked = f"{p}/Masked/output_0"
                if t == 2:  # the first choice is left out of the second softmax
                    or_out = f"{p}/Or/output_0"
                    self.make_node("Or", [masked, f"{b}/IsTop1/output_0"], [or_out], name=f"{p}/Or")
                    self.make_value(or_out, ir.DataType.BOOL, rows)
                    masked = or_out
                self.make_sub(f"{p}/Shift", [logits, m], f32, rows)
                self.make_exp(f"{p}/Exp", f"{p}/Shift/output_0", f32, rows)
                zero = "/model/constants/FLOAT/0.0"
                self.make_where(f"{p}/Keep", [masked, zero, f"{p}/Exp/output_0"], f32, rows)
                axes = "/model/constants/INT64/[-1]"
                self.make_reduce_sum(
                    f"{p}/Sum", [f"{p}/Keep/output_0", axes], f32, col, keepdims=True
                )
                # softmax(masked L)[i_t] = exp(0) / sum over kept of exp(L - m_t)
                self.make_reciprocal(f"{p}/Weight", f"{p}/Sum/output_0", f32, col)
                weights.append(f"{p}/Weight/output_0")
            self.make_where(f"{b}/RouterWeights", [f"{b}/IsTop1/output_0", *weights], f32, rows)
            return logits, f"{b}/RouterWeights/output_0"

        def make_moe(self, layer_id, moe, root_input):
            """The builder's make_qmoe_op cannot pass input 14 (router_weights): emit QMoE here."""
            self.make_moe_preprocessing(layer_id, moe, root_input)
            router_logits, router_weights = self.make_moe_router(layer_id, moe, root_input)
            name = f"/model/layers.{layer_id}/moe/QMoE"
            n = self.make_moe_expert_names(layer_id)
            block = (
                {"block_size": self.moe_attrs["block_size"]}
                if "block_size" in self.moe_attrs
                else {}
            )
            # The INT4 export's MatMul activation precision applies to the experts too: at level 4
            # (int8 activations) a full-width layer decodes about 4x faster than with float32
            # activations here (README, "Phi-3.5-MoE speed").
            if self.onnx_dtype in (ir.DataType.INT4, ir.DataType.UINT4):
                block["accuracy_level"] = self.quant_attrs["accuracy_level"]
            no_fc3, no_zero_points = ["", "", ""], ["", "", ""]  # fused swiglu; symmetric
            self.make_node(
                "QMoE",
                inputs=[
                    root_input,
                    router_logits,  # top-k selection only
                    n["gate_up_weight"], n["gate_up_scales"], n["gate_up_bias"],
                    n["down_weight"], n["down_scales"], n["down_bias"],
                    *no_fc3,
                    *no_zero_points,
                    router_weights,  # mixing weights at the selected experts
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
                **block,
            )  # fmt: skip
            self.make_value(f"{name}/output_0", self.io_dtype, shape=self.make_hidden_state_shape())
            self.layernorm_attrs["skip_input"] = f"{name}/output_0"

    return PhimoeCPUModel


def create_model(
    builder: Any, source_dir: str, out_dir: str, precision: str, cache_dir: str, options: list[str]
) -> None:
    """``builder.create_model`` for Phi-3.5-MoE on CPU: the same steps in the same order, with our
    class where its architecture dispatch (which knows only CUDA for PhiMoE) would pick one.

    ``options`` are the builder's KEY=VALUE extra options and must include ``moe_quant_type``.
    """
    import torch

    extra = builder.parse_extra_options(
        None, source_dir, out_dir, precision, "cpu", cache_dir, options
    )
    effective = extra.pop("_effective_builder_config")
    hf = extra.pop("hf_details")
    extra_kwargs, hf_name, config = hf.pop("extra_kwargs"), hf.pop("hf_name"), hf.pop("hf_config")
    if config.architectures[0] not in ARCHITECTURES:
        raise ValueError(f"{source_dir} is a {config.architectures[0]}, not Phi-3.5-MoE")
    quant_config = extra.get("_quant_config")
    if quant_config is not None:
        io_dtype, onnx_dtype = quant_config.to_onnx_dtypes()
    else:
        io_dtype = builder.set_io_dtype(effective.precision, "cpu", extra)
        onnx_dtype = builder.set_onnx_dtype(effective.precision, extra)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(cache_dir, exist_ok=True)
    with torch.no_grad():
        model = model_class()(config, io_dtype, onnx_dtype, "cpu", cache_dir, extra)
        model.make_model(source_dir)
        model.save_model(out_dir)
    model.make_genai_config(config, extra_kwargs, out_dir)
    model.save_processing(hf_name, extra_kwargs, out_dir)
