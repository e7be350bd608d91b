"""Give an exported Phi-3 graph LoRA inputs: one pair of low-rank MatMuls per adapted projection.

Input: the ``model.onnx`` of a Phi-3 export (fp32 or INT4) and the PEFT module names to adapt
(``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``).
Output: the same graph where each such projection ``y = x W`` becomes ``y = x W + (x A) B``, with
``A`` [in, r] and ``B`` [r, out] graph inputs whose defaults are empty ([in, 0] and [0, out]):
without an adapter the extra term is zero and the model is the base model; an adapter file
(``.onnx_adapter``) that onnxruntime-genai activates per generator supplies ``A`` and ``B``.
Errors: ``LoraGraphError`` when a projection is missing or the graph is not a Phi-3 export.

Why a pass over the saved graph rather than the builder's own LoRA path: the builder's
``adapter_path`` bakes one adapter's weights in as constants, loads the whole PyTorch model through
PEFT (no streaming) and unpacks the fused projections. Added after export, the LoRA MatMuls are
never quantized (the INT4 base stays byte-for-byte what ``phi3edge export`` wrote, in
model.onnx.data), and an existing export can take adapters later: only model.onnx, a few kB, is
rewritten. The rank is a symbolic dimension, so adapters of any rank fit the same graph.

The builder splits the MLP's fused ``gate_up_proj`` into ``gate_proj`` and ``up_proj`` MatMuls
(and may split ``qkv_proj`` into q/k/v): a fused PEFT module then shares one ``A`` product and gets
one ``B`` per split MatMul (the matching rows of PEFT's ``lora_B``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # PEFT names on Phi3ForCausalLM

# PEFT module -> (graph block, the ways the builder may lay it out: one MatMul or split ones,
# in the order of lora_B's rows)
_LAYOUTS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "qkv_proj": ("attn", (("qkv_proj",), ("q_proj", "k_proj", "v_proj"))),
    "o_proj": ("attn", (("o_proj",),)),
    "gate_up_proj": ("mlp", (("gate_up_proj",), ("gate_proj", "up_proj"))),
    "down_proj": ("mlp", (("down_proj",),)),
}
_MATMUL = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul(_Q\d+)?$")


class LoraGraphError(RuntimeError):
    """The graph cannot take LoRA inputs; the message is one line for the user."""


@dataclass(frozen=True)
class Part:
    """One MatMul of the graph that a PEFT module's LoRA term adds to."""

    projection: str  # the graph's name for it (gate_proj for half of PEFT's gate_up_proj)
    out_features: int
    b_input: str  # graph input name of its B


@dataclass(frozen=True)
class Site:
    """Where a PEFT module of one layer gets its LoRA term."""

    layer: int
    module: str
    in_features: int
    a_input: str
    parts: tuple[Part, ...]

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)


def a_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{module}.lora_A"


def b_name(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.{projection}.lora_B"


def load(model_path: Path) -> Any:
    """The graph of ``model_path`` without its weights (they stay in model.onnx.data)."""
    import onnx

    return onnx.load(str(model_path), load_external_data=False)


def num_layers(model: Any) -> int:
    layers = {int(m[1]) for n in model.graph.node if (m := _MATMUL.match(n.name))}
    return max(layers) + 1 if layers else 0


def sites(model: Any, modules: tuple[str, ...] | list[str]) -> list[Site]:
    """Where each of ``modules`` sits in every layer of ``model``, with its shapes."""
    matmuls = _projection_matmuls(model)
    layers = num_layers(model)
    if layers == 0:
        raise LoraGraphError("the graph has no Phi-3 decoder projections to adapt")
    found = []
    for module in modules:
        if module not in _LAYOUTS:
            raise LoraGraphError(
                f"cannot adapt '{module}': LoRA targets must be among {', '.join(TARGETS)}"
            )
        block, layouts = _LAYOUTS[module]
        for layer in range(layers):
            for layout in layouts:
                nodes = [matmuls.get((layer, block, p)) for p in layout]
                if all(nodes):
                    break
            else:
                raise LoraGraphError(f"layer {layer} has no {module} projection in the graph")
            shapes = [_matmul_shape(model, n) for n in nodes]
            if len({k for k, _ in shapes}) != 1:
                raise LoraGraphError(f"layer {layer}: the parts of {module} differ in input width")
            parts = tuple(
                Part(p, n, b_name(layer, p)) for p, (_, n) in zip(layout, shapes, strict=True)
            )
            found.append(Site(layer, module, shapes[0][0], a_name(layer, module), parts))
    return found


def adapted_modules(model: Any) -> list[str]:
    """The PEFT modules that already have LoRA inputs in ``model``."""
    inputs = {i.name for i in model.graph.input}
    return [m for m in TARGETS if a_name(0, m) in inputs]


def add_lora_inputs(model: Any, modules: list[str]) -> list[str]:
    """Add LoRA inputs for each of ``modules`` not yet adapted; return the modules added."""
    from onnx import helper

    new = [m for m in modules if m not in adapted_modules(model)]
    if not new:
        return []
    graph = model.graph
    elem = _activation_type(model)
    by_name = {n.name: n for n in graph.node}
    matmuls = _projection_matmuls(model)
    after: dict[str, list[Any]] = {}  # node name -> LoRA nodes to insert after it
    for site in sites(model, new):
        block = _LAYOUTS[site.module][0]
        rank = f"lora_rank_{site.layer}_{site.module}"
        first = by_name[matmuls[(site.layer, block, site.parts[0].projection)]]
        x = first.input[0]
        prefix = f"/model/layers.{site.layer}/{block}/{site.module}/lora"
        graph.input.append(
            helper.make_tensor_value_info(site.a_input, elem, [site.in_features, rank])
        )
        graph.initializer.append(_empty(site.a_input, elem, [site.in_features, 0]))
        xa = f"{prefix}_A/MatMul/output_0"
        inserted = [helper.make_node("MatMul", [x, site.a_input], [xa], name=f"{prefix}_A/MatMul")]
        for part in site.parts:
            node = by_name[matmuls[(site.layer, block, part.projection)]]
            graph.input.append(
                helper.make_tensor_value_info(part.b_input, elem, [rank, part.out_features])
            )
            graph.initializer.append(_empty(part.b_input, elem, [0, part.out_features]))
            y = node.output[0]
            base = f"{y}/base"
            node.output[0] = base
            part_prefix = f"/model/layers.{site.layer}/{block}/{part.projection}/lora"
            xab = f"{part_prefix}_B/MatMul/output_0"
            after.setdefault(node.name, []).extend(
                [
                    helper.make_node(
                        "MatMul", [xa, part.b_input], [xab], name=f"{part_prefix}_B/MatMul"
                    ),
                    helper.make_node("Add", [base, xab], [y], name=f"{part_prefix}/Add"),
                ]
            )
        # A's product goes right after the first MatMul, so every B MatMul follows it
        after.setdefault(first.name, [])[:0] = inserted
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(after.get(node.name, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return new


def save(model: Any, model_path: Path) -> None:
    """Write ``model`` over ``model_path`` atomically (a running server keeps the old file)."""
    import onnx

    tmp = model_path.with_name(f".{model_path.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(model_path)


def _empty(name: str, elem: int, dims: list[int]) -> Any:
    from onnx import helper

    return helper.make_tensor(name, elem, dims, vals=b"", raw=True)


def _projection_matmuls(model: Any) -> dict[tuple[int, str, str], str]:
    """(layer, block, projection) -> MatMul / MatMulNBits node name."""
    out = {}
    for node in model.graph.node:
        match = _MATMUL.match(node.name)
        if match and node.op_type in ("MatMul", "MatMulNBits"):
            out[(int(match[1]), match[2], match[3])] = node.name
    return out


def _matmul_shape(model: Any, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection MatMul, from its weight or attributes."""
    node = next(n for n in model.graph.node if n.name == name)
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs["K"], attrs["N"]
    weight = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
    if weight is None or len(weight.dims) != 2:
        raise LoraGraphError(f"{name}: its weight is not a 2-D initializer")
    return int(weight.dims[0]), int(weight.dims[1])


def _activation_type(model: Any) -> int:
    """The element type of the projections' activations (the logits' type)."""
    for output in model.graph.output:
        if output.name == "logits":
            return int(output.type.tensor_type.elem_type)
    raise LoraGraphError("the graph has no logits output")
