"""Run onnxruntime-genai's model builder one checkpoint module at a time.

Input: the builder module (``export.load_builder()``), a scratch folder on the output's disk and
a progress callback, given to the ``streaming`` context manager. Any builder model class that
keeps the base class's ``load_weights``, ``to_nbits`` and ``save_model`` (Phi-3, Phi-3.5 and our
Phi-3.5-MoE subclass do) is then built like this:

1. ``load_weights`` returns the transformers model built on the meta device, from the checkpoint's
   config, with the class and dtype ``from_pretrained`` would give. Each unit the builder emits (the
   embedding, each decoder layer, the final norm, the lm_head) gets its parameters from the
   safetensors shards, one tensor at a time, just before the builder reads it, and gives them back
   (to the meta device) just after. ``LAYOUTS`` maps checkpoint names to parameters per model class.
2. After each unit, every new MatMul/Gather weight is quantized by the builder's own ``to_nbits``
   run on a one-node copy of the graph (so the same ``MatMulNBitsQuantizer``, options and passes,
   int8 lm_head and int4 embeddings included), and the quantizer's outputs, like every other new
   initializer, go to one scratch file. Nothing weight-sized stays in memory.
3. ``save_model`` runs the builder's own ``to_nbits`` on the whole graph, whose quantizer replays
   the recorded result for each node instead of quantizing again, then the builder's own save,
   which copies the tensors out of the scratch file in the stock order. Ranges already copied are
   punched out of the scratch file (Linux), so scratch plus output stay near the output's size.

Output: byte-identical model.onnx, model.onnx.data and genai_config.json to the stock builder's,
with peak memory near one unit's weights (the largest layer or the lm_head, in float32) instead of
three copies of the model. Checkpoints it cannot stream (GGUF, pre-quantized, PEFT adapters,
remote code, no safetensors, a class whose parameters are not all found) load the stock way, and
the rest of the machinery still applies.
Errors: ``StreamingError`` when a checkpoint tensor has the wrong shape or a recorded weight would
reach the output unquantized; the builder's own errors otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRATCH_FILE = "tensors.bin"
WEIGHT_FILE = "weight.bin"  # the float weight being quantized, one at a time
DROPPED = "phi3edge-quantized-float-weight"  # placeholder location of a float weight: never read
QUANTIZED_DTYPES = ("INT4", "UINT4", "INT8", "UINT8")


class StreamingError(RuntimeError):
    """The checkpoint or the builder did something the streaming export cannot reproduce."""


@dataclass
class StreamStats:
    """What one streaming export did; tests read it, progress lines report it."""

    streamed: bool = False  # parameters came from the shards unit by unit
    units: int = 0
    peak_params: int = 0  # parameters materialized at once
    peak_param_bytes: int = 0
    leaked_tensors: int = 0  # materialized parameters still alive after their unit's release
    mapped_checkpoint_bytes: int = 0  # of shard files still mapped after a release (Linux)
    quantized: int = 0  # weights quantized as they streamed
    replayed: int = 0  # of those, replayed into the final graph
    scratch_bytes: int = 0  # written to the scratch file
    peak_scratch_bytes: int = 0  # on disk at once (holes punched behind the final copy)


# --- checkpoint layouts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one parameter comes from: checkpoint ``keys`` and how to make the tensor of them.

    ``assemble(read)`` gets a function that reads one checkpoint tensor and returns the parameter;
    without it the parameter is the single key's tensor.
    """

    keys: tuple[str, ...]
    assemble: Callable[[Callable[[str], Any]], Any] | None = None


def _same_name(name: str, config: Any) -> list[Source]:
    return [Source((name,))]


_PHIMOE_EXPERTS = re.compile(r"^(.*\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PHIMOE_ROUTER = re.compile(r"^(.*\.layers\.\d+)\.mlp\.router\.weight$")


def _phimoe(name: str, config: Any) -> list[Source]:
    """transformers 5's ``PhimoeForCausalLM`` parameters from either its own layout or the hub's
    (``PhiMoEForCausalLM``), as ``conversion_mapping.py``'s "phimoe" entry maps them:
    ``block_sparse_moe.`` -> ``mlp.``, ``gate.weight`` -> ``router.weight``, experts' ``w1``/``w3``
    stacked then concatenated into ``gate_up_proj`` [E, 2I, H] (``w1`` first), ``w2`` stacked into
    ``down_proj`` [E, H, I]."""
    sources = [Source((name,))]
    if match := _PHIMOE_ROUTER.match(name):
        sources.append(Source((f"{match[1]}.block_sparse_moe.gate.weight",)))
    elif match := _PHIMOE_EXPERTS.match(name):
        prefix = f"{match[1]}.block_sparse_moe.experts"
        experts = range(config.num_local_experts)
        if match[2] == "gate_up_proj":
            parts = [(f"{prefix}.{e}.w1.weight", f"{prefix}.{e}.w3.weight") for e in experts]
        else:
            parts = [(f"{prefix}.{e}.w2.weight",) for e in experts]
        sources.append(Source(tuple(k for keys in parts for k in keys), _stack_experts(parts)))
    return sources


def _stack_experts(parts: list[tuple[str, ...]]) -> Callable[[Callable[[str], Any]], Any]:
    """Expert e's tensors concatenated along rows, stacked over e; one expert read at a time."""

    def assemble(read: Callable[[str], Any]) -> Any:
        import torch

        out = None
        for e, keys in enumerate(parts):
            rows = [read(k) for k in keys]
            if out is None:
                height = sum(r.shape[0] for r in rows)
                out = torch.empty((len(parts), height, *rows[0].shape[1:]), dtype=rows[0].dtype)
            torch.cat(rows, dim=0, out=out[e])
        return out

    return assemble


# Model class name -> where each parameter comes from (alternatives, first complete one wins).
LAYOUTS: dict[str, Callable[[str, Any], list[Source]]] = {
    "Phi3ForCausalLM": _same_name,
    "PhimoeForCausalLM": _phimoe,
}


class Checkpoint:
    """The safetensors shards of a checkpoint folder, read one tensor at a time."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self._where: dict[str, Path] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            self._where = {key: folder / name for key, name in weight_map.items()}
        else:
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as shard:
                    self._where.update(dict.fromkeys(shard.keys(), path))
        self._handles: dict[Path, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def read(self, key: str) -> Any:
        path = self._where[key]
        if path not in self._handles:
            self._handles[path] = self._open(str(path), framework="pt")
        return self._handles[path].get_tensor(key)

    def first_float_dtype(self) -> Any:
        """The dtype of the first floating-point tensor of the first shard (what transformers'
        ``dtype="auto"`` falls back to when the config names none)."""
        import torch

        path = self.files()[0]
        with self._open(str(path), framework="pt") as shard:
            for key in shard.keys():
                dtype = shard.get_slice(key).get_dtype()
                torch_dtype = _SAFETENSORS_DTYPES.get(dtype)
                if torch_dtype is not None and getattr(torch, torch_dtype).is_floating_point:
                    return getattr(torch, torch_dtype)
        return torch.get_default_dtype()

    def close(self) -> None:
        """Drop the open shards (their mappings with them); ``read`` reopens as needed."""
        self._handles.clear()


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


# --- scratch file -----------------------------------------------------------------------------


class _Scratch:
    """One append-only file of tensor bytes; ``consume`` frees ranges already copied out."""

    def __init__(self, folder: Path, stats: StreamStats) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.path = folder / SCRATCH_FILE
        self._file: Any = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._stats = stats
        self._punched = 0
        self._punch_fd: int | None = None
        self._can_punch = sys.platform.startswith("linux")

    @property
    def size(self) -> int:
        return self._stats.scratch_bytes

    def _grew(self, nbytes: int) -> None:
        self._stats.scratch_bytes += nbytes
        live = self._stats.scratch_bytes - self._punched
        self._stats.peak_scratch_bytes = max(self._stats.peak_scratch_bytes, live)

    def write_tensor(self, tensor: Any) -> Any:
        """Append ``tensor``'s bytes and return an external tensor reading them back."""
        import onnx_ir as ir

        offset = self.size
        tensor.tofile(self._file) if hasattr(tensor, "tofile") else self._file.write(
            tensor.tobytes()
        )
        written = self._file.tell() - offset
        if written != tensor.nbytes:
            raise StreamingError(
                f"{tensor.name}: wrote {written} bytes for a {tensor.nbytes}-byte tensor"
            )
        self._grew(written)
        return ir.ExternalTensor(
            SCRATCH_FILE,
            offset,
            written,
            tensor.dtype,
            shape=ir.Shape(tensor.shape),
            name=tensor.name,
            base_dir=str(self.folder),
        )

    def write_temporary(self, tensor: Any, name: str) -> Any:
        """``tensor`` alone in file ``name`` (counted in the scratch peak while it exists)."""
        import onnx_ir as ir

        with open(self.folder / name, "wb") as file:
            tensor.tofile(file) if hasattr(tensor, "tofile") else file.write(tensor.tobytes())
            written = file.tell()
        if written != tensor.nbytes:
            raise StreamingError(f"{tensor.name}: wrote {written} of {tensor.nbytes} bytes")
        live = self._stats.scratch_bytes - self._punched + written
        self._stats.peak_scratch_bytes = max(self._stats.peak_scratch_bytes, live)
        return ir.ExternalTensor(
            name, 0, written, tensor.dtype, shape=ir.Shape(tensor.shape), name=tensor.name,
            base_dir=str(self.folder),
        )  # fmt: skip

    def write_bytes(self, data: bytes) -> int:
        offset = self.size
        self._file.write(data)
        self._grew(len(data))
        return offset

    def finish_writing(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def consume(self, offset: int, length: int) -> None:
        """Give the disk blocks of ``[offset, offset + length)`` back (they were copied out)."""
        if not self._can_punch or length <= 0:
            return
        try:
            if self._punch_fd is None:
                self._punch_fd = os.open(self.path, os.O_RDWR)
            libc = ctypes.CDLL(None, use_errno=True)
            fallocate = libc.fallocate
            fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            punch_hole_keep_size = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if fallocate(self._punch_fd, punch_hole_keep_size, offset, length) != 0:
                self._can_punch = False  # filesystem without holes: scratch stays until the end
                return
            self._punched += length
        except (OSError, AttributeError):
            self._can_punch = False

    def close(self) -> None:
        self.finish_writing()
        if self._punch_fd is not None:
            os.close(self._punch_fd)
            self._punch_fd = None


def _consumed_tensor_class() -> type:
    import onnx_ir as ir

    class ConsumedExternalTensor(ir.ExternalTensor):
        """An external tensor in the scratch file whose range is freed once it is written out."""

        scratch: _Scratch

        def tofile(self, file: Any) -> None:
            super().tofile(file)
            self.scratch.consume(self.offset or 0, self.length or self.nbytes)

    return ConsumedExternalTensor


# --- the streaming session ----------------------------------------------------------------------


@dataclass
class _Record:
    """What the quantizer did for one node: the nodes it returned and the initializers it added
    (already written to the scratch file, referenced as external data)."""

    weight: str
    nodes: list[Any]
    initializers: list[Any]


@dataclass
class _Unit:
    module: Any
    params: list[tuple[Any, str, str]] = field(default_factory=list)  # (module, leaf, full name)


class _Session:
    """The state of one streaming export: scratch file, checkpoint, recorded quantizations."""

    def __init__(self, builder: Any, scratch_dir: Path, say: Callable[[str], None]) -> None:
        self.builder = builder
        self.say = say
        self.stats = StreamStats()
        self.scratch = _Scratch(scratch_dir, self.stats)
        self.records: dict[tuple[Any, ...], _Record] = {}
        self.mode: str | None = None  # "record" while quantizing one node, "replay" at save
        self.checkpoint: Checkpoint | None = None
        self.seen_nodes: set[Any] = set()
        self.alive: list[weakref.ref[Any]] = []  # tensors materialized for released units
        self.consumed_class = _consumed_tensor_class()

    def close(self) -> None:
        self.scratch.close()
        if self.checkpoint is not None:
            self.checkpoint.close()

    # -- 1. loading ---------------------------------------------------------------------------

    def load_weights(self, model: Any, input_path: str, original: Callable[..., Any]) -> Any:
        plan = self._streaming_plan(model, input_path)
        if plan is None:
            return original(model, input_path)
        torch_model, checkpoint, sources = plan
        self.checkpoint = checkpoint
        self.stats.streamed = True
        units = self._units(model, torch_model)
        all_modules = torch_model.modules

        def modules() -> Iterator[Any]:
            current: _Unit | None = None
            try:
                for module in all_modules():
                    if id(module) in units:
                        if current is not None:
                            self._release(model, current)
                        current = self._materialize(module, units[id(module)], sources)
                    yield module
                if current is not None:
                    self._release(model, current)
                    current = None
            finally:
                if current is not None:  # the builder failed midway
                    self._free(current)

        torch_model.modules = modules  # make_model iterates self.weights.modules()
        return torch_model

    def _streaming_plan(self, model: Any, input_path: str) -> Any:
        """(meta model, checkpoint, parameter name -> Source), or None to load the stock way."""
        folder = Path(str(model.model_name_or_path))
        if (
            str(input_path).endswith(".gguf")
            or model.quant_type is not None
            or "adapter_path" in model.extra_options
            or model.hf_remote
            or "ForCausalLM" not in model.model_type
            or not folder.is_dir()
            or not any(folder.glob("*.safetensors"))
        ):
            return None
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        extra = (
            {"num_hidden_layers": model.num_layers}
            if "num_hidden_layers" in model.extra_options
            else {}
        )
        config = AutoConfig.from_pretrained(str(folder), **extra)
        checkpoint = Checkpoint(folder)
        # from_pretrained's dtype="auto": the config's dtype, else the first float tensor's
        dtype = getattr(config, "dtype", None) or checkpoint.first_float_dtype()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with torch.device("meta"):
            torch_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        torch_model.eval()
        layout = LAYOUTS.get(type(torch_model).__name__, _same_name)
        sources: dict[str, Source] = {}
        tied = getattr(torch_model, "_tied_weights_keys", None)  # {"lm_head.weight": "model.e…"}
        tied = tied if isinstance(tied, dict) else {}
        tie = bool(getattr(config, "tie_word_embeddings", False))
        for name, _ in torch_model.named_parameters(remove_duplicate=False):
            options = layout(name, config)
            if tie and name in tied:
                options += layout(tied[name], config)
            found = next((s for s in options if all(k in checkpoint for k in s.keys)), None)
            if found is None:
                checkpoint.close()
                self.say(f"  streaming off: no checkpoint tensor for {name}; loading it whole")
                return None
            sources[name] = found
        return torch_model, checkpoint, sources

    def _units(self, model: Any, torch_model: Any) -> dict[int, _Unit]:
        """The modules the builder emits on its own: decoder layers (its ``is_layer``) and the
        outermost modules holding parameters directly (embedding, final norm, lm_head)."""
        units: dict[int, _Unit] = {}
        covered: list[str] = []
        for name, module in torch_model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in covered):
                continue
            direct = list(module.named_parameters(recurse=False))
            if model.is_layer(module) or direct:
                unit = _Unit(module)
                for pname, _ in module.named_parameters(remove_duplicate=False):
                    owner_name, _, leaf = pname.rpartition(".")
                    owner = module.get_submodule(owner_name) if owner_name else module
                    full = f"{name}.{pname}" if name else pname
                    unit.params.append((owner, leaf, full))
                units[id(module)] = unit
                covered.append(name)
        return units

    def _materialize(self, module: Any, unit: _Unit, sources: dict[str, Source]) -> _Unit:
        import torch

        assert self.checkpoint is not None
        nbytes = 0
        for owner, leaf, full in unit.params:
            meta = owner._parameters[leaf]
            source = sources[full]
            if source.assemble is None:
                tensor = self.checkpoint.read(source.keys[0])
            else:
                tensor = source.assemble(self.checkpoint.read)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise StreamingError(
                    f"checkpoint tensor for {full} has shape {tuple(tensor.shape)}, "
                    f"the model wants {tuple(meta.shape)}"
                )
            if tensor.dtype != meta.dtype and tensor.is_floating_point():
                tensor = tensor.to(meta.dtype)  # as from_pretrained casts to the model's dtype
            param = torch.nn.Parameter(tensor, requires_grad=meta.requires_grad)
            owner._parameters[leaf] = param
            self.alive.append(weakref.ref(param))  # must die once the unit is released
            nbytes += tensor.numel() * tensor.element_size()
        self.checkpoint.close()  # no shard stays mapped between units
        self.stats.units += 1
        self.stats.peak_params = max(self.stats.peak_params, len(unit.params))
        self.stats.peak_param_bytes = max(self.stats.peak_param_bytes, nbytes)
        return unit

    def _free(self, unit: _Unit) -> None:
        """Put every parameter and buffer under the unit back on the meta device, including
        those the builder attached while emitting it (its unpacked ``mlp.gate_proj`` and
        ``up_proj`` are views of ``gate_up_proj``)."""
        import torch

        for module in unit.module.modules():
            for slots in (module._parameters, module._buffers):
                for leaf, tensor in slots.items():
                    if tensor is None or tensor.device.type == "meta":
                        continue
                    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                    if isinstance(tensor, torch.nn.Parameter):
                        empty = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
                    slots[leaf] = empty

    def _release(self, model: Any, unit: _Unit) -> None:
        import gc

        self.flush(model)
        self._free(unit)
        self.alive = [ref for ref in self.alive if ref() is not None]
        if self.alive:  # only reference cycles left: collect them (a full collection is slow)
            gc.collect()
            self.alive = [ref for ref in self.alive if ref() is not None]
        self.stats.leaked_tensors = max(self.stats.leaked_tensors, len(self.alive))
        mapped = _mapped_bytes(self.checkpoint.files()) if self.checkpoint else 0
        self.stats.mapped_checkpoint_bytes = max(self.stats.mapped_checkpoint_bytes, mapped)

    # -- 2. quantize and spill as the units come --------------------------------------------------

    def quantizes_as_it_goes(self, model: Any) -> bool:
        """Whether ``save_model`` will quantize with the default MatMulNBits quantizer, the case
        recorded here (RTN/k-quant, exact overrides and pre-quantized checkpoints are left to the
        final pass, which still reads each weight from the scratch file)."""
        return (
            _will_quantize(model)
            and getattr(model, "quantization_algo", "default") == "default"
            and not getattr(model, "exact_quant_override_names", None)
            and model.quant_type is None
        )

    def flush(self, model: Any) -> None:
        """Quantize the weights of nodes made since the last flush, then move every new
        initializer's bytes to the scratch file."""
        import onnx_ir as ir

        if self.quantizes_as_it_goes(model):
            for node in list(model.model.graph):
                if node in self.seen_nodes:
                    continue
                self.seen_nodes.add(node)
                self._quantize_alone(model, node)
        for graph in model.model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.ExternalTensor):
                    continue
                if tensor.nbytes == 0:
                    continue
                value.const_value = self.scratch.write_tensor(tensor)

    def _quantize_alone(self, model: Any, node: Any) -> None:
        import onnx_ir as ir

        index = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if index is None or not node.name or len(node.inputs) <= index:
            return
        # to_nbits' passes quantize a node unless excluded, when its op type is listed or it has
        # a bit width of its own (the int8 lm_head); skip the others without writing the weight
        attrs = model.quant_attrs
        upgraded = getattr(model, "int4_customized_weight_config", None) or {}
        if node.name in attrs["nodes_to_exclude"] or (
            node.op_type not in attrs["op_types_to_quantize"] and node.name not in upgraded
        ):
            return
        weight = node.inputs[index]
        if (
            weight is None
            or not weight.is_initializer()
            or weight.const_value is None
            or isinstance(weight.const_value, ir.ExternalTensor)
            or len(weight.uses()) != 1
        ):
            return  # no float weight of its own: the final pass handles it as the stock one does
        # The weight goes to a file of its own, referenced as external data, as the stock path
        # would serialize it (same bytes): the quantizer then reads it memory-mapped instead of
        # through three in-memory copies (contiguous, bytes, protobuf).
        tensor = weight.const_value
        spilled = self.scratch.write_temporary(tensor, WEIGHT_FILE)
        mini = _one_node_model(model.model, node, index, spilled)
        before = len(self.records)
        whole = model.model
        model.model = mini
        self.mode = "record"
        cwd = os.getcwd()
        os.chdir(self.scratch.folder)  # the quantizer resolves external data against the cwd
        try:
            _ORIGINALS["to_nbits"](model)
        finally:
            os.chdir(cwd)
            self.mode = None
            model.model = whole
            spilled.release()
            (self.scratch.folder / WEIGHT_FILE).unlink()
        if len(self.records) > before:
            weight.const_value = ir.ExternalTensor(
                DROPPED, 0, tensor.nbytes, tensor.dtype, shape=ir.Shape(tensor.shape),
                name=tensor.name,
            )  # fmt: skip
            self.stats.quantized += 1

    def quantize_node(self, quantizer: Any, node: Any, graph_stack: list[Any]) -> list[Any]:
        """``DefaultWeightOnlyQuantizer.quantize`` while this session is active."""
        original = _ORIGINALS["quantize"]
        if self.mode is None:
            return original(quantizer, node, graph_stack)
        weight_name = node.input[0 if node.op_type == "Gather" else 1] if node.input else ""
        key = _record_key(quantizer, node)
        if self.mode == "replay":
            record = self.records.get(key)
            if record is not None and record.weight == weight_name:
                return self._replay(record, weight_name, graph_stack)
            if _is_dropped(weight_name, graph_stack):
                raise StreamingError(
                    f"{node.name}: quantized as it streamed with other settings than the final "
                    f"pass (bits {getattr(quantizer.config, 'bits', None)})"
                )
            return original(quantizer, node, graph_stack)

        # record: run the real quantizer, keep what it returned and added
        lengths = [len(g.initializer) for g in graph_stack]
        result = original(quantizer, node, graph_stack)
        if len(result) == 1 and result[0] is node:
            return result  # not quantized (no constant weight, unsupported case)
        from onnxruntime.quantization.matmul_nbits_quantizer import get_initializer

        _, home = get_initializer(weight_name, graph_stack)
        added: list[Any] = []
        for graph, length in zip(graph_stack, lengths, strict=True):
            new = list(graph.initializer[length:])
            if new and graph is not home:
                return result  # added somewhere we would not know how to replay: don't record
            added.extend(new)
        import onnx

        nodes = []
        for n in result:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            nodes.append(copy)
        self.records[key] = _Record(weight_name, nodes, [self._externalize(t) for t in added])
        return result

    def _replay(self, record: _Record, weight_name: str, graph_stack: list[Any]) -> list[Any]:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import get_initializer

        _, home = get_initializer(weight_name, graph_stack)
        if home is None:
            raise StreamingError(f"{weight_name}: the quantized weight is not in the graph")
        for graph_input in home.input:  # as the quantizer does
            if graph_input.name == weight_name:
                home.input.remove(graph_input)
                break
        home.initializer.extend(record.initializers)
        self.stats.replayed += 1
        out = []
        for n in record.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            out.append(copy)
        return out

    def _externalize(self, proto: Any) -> Any:
        """The quantizer's in-memory tensor, written to the scratch file and referenced there."""
        import onnx
        import onnx_ir as ir

        data = ir.serde.TensorProtoTensor(proto).tobytes()
        offset = self.scratch.write_bytes(data)
        # A fresh message, not CopyFrom + ClearField: protobuf's arena would keep the cleared
        # bytes alive as long as the message, and these messages live until the save.
        external = onnx.TensorProto(name=proto.name, data_type=proto.data_type, dims=proto.dims)
        if proto.HasField("doc_string"):
            external.doc_string = proto.doc_string
        if proto.HasField("segment"):
            external.segment.CopyFrom(proto.segment)
        external.metadata_props.extend(proto.metadata_props)
        external.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", SCRATCH_FILE), ("offset", offset), ("length", len(data))):
            entry = external.external_data.add()
            entry.key, entry.value = key, str(value)
        return external

    # -- 3. saving ----------------------------------------------------------------------------

    def save_model(self, model: Any, out_dir: str, original: Callable[..., Any]) -> None:
        self.flush(model)  # what was made after the last unit (post-processing nodes)
        self.scratch.finish_writing()
        if not _will_quantize(model):
            self._point_at_scratch(model.model)
        if self.stats.streamed:
            self.say(
                f"  streamed {self.stats.units} modules; quantized {self.stats.quantized} weights "
                f"as they came; scratch {self.stats.scratch_bytes / 1e9:.2f} GB"
            )
        original(model, out_dir)

    def to_nbits(self, model: Any) -> Any:
        """The builder's ``to_nbits`` on the whole graph, replaying recorded quantizations; the
        remaining float weights (if any) are read from the scratch file."""
        cwd = os.getcwd()
        os.chdir(self.scratch.folder)  # the quantizer resolves external data against the cwd
        self.mode = "replay"
        try:
            quantized = _ORIGINALS["to_nbits"](model)
        finally:
            self.mode = None
            os.chdir(cwd)
        self._point_at_scratch(quantized)
        return quantized

    def _point_at_scratch(self, ir_model: Any) -> None:
        """Make every scratch-file tensor absolute and consumed as it is written out."""
        import onnx_ir as ir

        for graph in ir_model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if not isinstance(tensor, ir.ExternalTensor):
                    continue
                if str(tensor.location) == DROPPED:
                    raise StreamingError(
                        f"{value.name} was quantized as it streamed but is still used unquantized"
                    )
                if str(tensor.location) != SCRATCH_FILE:
                    continue
                consumed = self.consumed_class(
                    SCRATCH_FILE, tensor.offset, tensor.length, tensor.dtype,
                    shape=ir.Shape(tensor.shape), name=tensor.name,
                    base_dir=str(self.scratch.folder),
                )  # fmt: skip
                consumed.scratch = self.scratch
                value.const_value = consumed


def _mapped_bytes(files: list[Path]) -> int:
    """Bytes of ``files`` mapped into this process (safetensors maps the tensors it returns, so
    a mapping that outlives its unit is a leaked tensor); 0 where /proc is missing."""
    names = {str(f.resolve()) for f in files}
    total = 0
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() in names:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    total += end - start
    except OSError:
        return 0
    return total


def _will_quantize(model: Any) -> bool:
    """The stock ``save_model``'s condition for running ``to_nbits``."""
    already_qdq = model.quant_type is not None and model.quant_attrs["use_qdq"]
    return model.onnx_dtype.name in QUANTIZED_DTYPES and not already_qdq


def _is_dropped(weight_name: str, graph_stack: list[Any]) -> bool:
    """Whether the quantizer's graph holds ``weight_name`` as a dropped-float placeholder."""
    from onnxruntime.quantization.matmul_nbits_quantizer import get_initializer

    tensor, _ = get_initializer(weight_name, graph_stack)
    return tensor is not None and any(
        entry.key == "location" and entry.value == DROPPED for entry in tensor.external_data
    )


def _record_key(quantizer: Any, node: Any) -> tuple[Any, ...]:
    config = quantizer.config
    return (
        node.name,
        node.op_type,
        tuple(node.input),
        tuple(node.output),
        getattr(config, "bits", None),
        getattr(config, "block_size", None),
        getattr(config, "is_symmetric", None),
        str(getattr(config, "quant_format", None)),
        getattr(config, "accuracy_level", None),
    )


def _one_node_model(whole: Any, node: Any, weight_index: int, weight: Any) -> Any:
    """A model holding a copy of ``node`` and ``weight``, for quantizing that node alone."""
    import onnx_ir as ir

    inputs: list[Any] = []
    graph_inputs = []
    for i, value in enumerate(node.inputs):
        if value is None:
            inputs.append(None)
            continue
        copy = ir.Value(name=value.name, type=value.type, shape=value.shape)
        if i == weight_index:
            copy.const_value = weight
        else:
            graph_inputs.append(copy)
        inputs.append(copy)
    outputs = [ir.Value(name=v.name, type=v.type, shape=v.shape) for v in node.outputs]
    copy_node = ir.Node(
        node.domain,
        node.op_type,
        inputs,
        attributes=list(node.attributes.values()),
        outputs=outputs,
        name=node.name,
        overload=node.overload,
        version=node.version,
    )
    graph = ir.Graph(
        graph_inputs,
        outputs,
        nodes=[copy_node],
        initializers=[inputs[weight_index]],
        opset_imports=dict(whole.graph.opset_imports),
        name="phi3edge_one_node",
    )
    return ir.Model(graph, ir_version=whole.ir_version)


_ORIGINALS: dict[str, Any] = {}
_ACTIVE: list[_Session] = []


@contextlib.contextmanager
def streaming(
    builder: Any, scratch_dir: Path, say: Callable[[str], None] = lambda _: None
) -> Iterator[StreamStats]:
    """Patch the builder's ``Model`` (and its quantizer) for one streaming export; yields the
    export's statistics."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    if _ACTIVE:
        raise RuntimeError("one streaming export at a time")
    model_class = builder.Model
    _ORIGINALS.update(
        load_weights=model_class.load_weights,
        to_nbits=model_class.to_nbits,
        save_model=model_class.save_model,
        quantize=DefaultWeightOnlyQuantizer.quantize,
    )
    session = _Session(builder, scratch_dir, say)
    _ACTIVE.append(session)

    def load_weights(self: Any, input_path: str) -> Any:
        return session.load_weights(self, input_path, _ORIGINALS["load_weights"])

    def to_nbits(self: Any) -> Any:
        return session.to_nbits(self)

    def save_model(self: Any, out_dir: str) -> None:
        session.save_model(self, out_dir, _ORIGINALS["save_model"])

    def quantize(self: Any, node: Any, graph_stack: list[Any]) -> list[Any]:
        return session.quantize_node(self, node, graph_stack)

    model_class.load_weights = load_weights
    model_class.to_nbits = to_nbits
    model_class.save_model = save_model
    DefaultWeightOnlyQuantizer.quantize = quantize
    try:
        yield session.stats
    finally:
        model_class.load_weights = _ORIGINALS["load_weights"]
        model_class.to_nbits = _ORIGINALS["to_nbits"]
        model_class.save_model = _ORIGINALS["save_model"]
        DefaultWeightOnlyQuantizer.quantize = _ORIGINALS["quantize"]
        _ORIGINALS.clear()
        _ACTIVE.clear()
        session.close()
