"""LoRA fine-tunes of an exported model: PEFT adapter folder -> ``.onnx_adapter`` served by name.

Input: an exported model folder (``phi3edge export``), a name and a Hugging Face PEFT LoRA folder
(``adapter_config.json`` + ``adapter_model.safetensors``, as ``save_pretrained`` writes it).
Output: ``adapters/NAME.onnx_adapter`` in the model folder (onnxruntime's adapter format: the
LoRA ``A`` and ``B`` weights, scaling folded into ``B``), LoRA inputs in model.onnx for the modules
the adapter targets (``lora_graph``), and an entry in ``phi3edge.json`` (file, base, rank,
targets, source checksum). A request whose ``model`` is NAME then runs with that adapter.
Errors: ``AdapterError`` (an ``ExportError``) with a one-line message: missing files, a LoRA
this runtime cannot apply (DoRA, biases, ``modules_to_save``, targets beyond the four decoder
projections), tensors whose shapes do not fit the model (an adapter trained for another base),
a name already taken.

Reading the adapter needs ``safetensors`` and numpy only (PEFT itself is not imported): PEFT's
scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per module when ``rank_pattern`` or
``alpha_pattern`` say so, matched as PEFT matches them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phi3edge import lora_graph
from phi3edge.export import ExportError, Manifest, files_checksum

ADAPTER_DIR = "adapters"
SUFFIX = ".onnx_adapter"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)"
    r"(?:\.[\w-]+)?\.weight$"
)
# PEFT options this runtime cannot apply (value that is fine, what to tell the user)
_UNSUPPORTED = {
    "use_dora": (False, "DoRA adapters"),
    "lora_bias": (False, "LoRA biases (lora_bias)"),
    "fan_in_fan_out": (False, "fan_in_fan_out layers"),
    "modules_to_save": (None, "fully trained modules (modules_to_save)"),
    "trainable_token_indices": (None, "trainable token embeddings"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "target_parameters"),
}


class AdapterError(ExportError):
    """An adapter could not be added; the message is one line for the user."""


@dataclass(frozen=True)
class Lora:
    """One module's LoRA of a PEFT adapter: ``delta = x A^T B^T * scaling``."""

    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scaling: float


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA folder, read and checked (but not yet against a model)."""

    folder: Path
    base: str  # base_model_name_or_path as PEFT recorded it
    modules: dict[tuple[int, str], Lora]  # (layer, PEFT module name) -> weights
    lora_alpha: float
    use_rslora: bool

    @property
    def targets(self) -> list[str]:
        return [t for t in lora_graph.TARGETS if any(m == t for _, m in self.modules)]

    @property
    def rank(self) -> int:
        return max(lora.a.shape[0] for lora in self.modules.values())


def read_peft(folder: str | os.PathLike[str]) -> PeftAdapter:
    """Read and check a PEFT LoRA folder (``save_pretrained``'s output)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG}: not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {config_path}: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{folder} is a {config.get('peft_type')} adapter; only LoRA adapters are supported"
        )
    for key, (fine, what) in _UNSUPPORTED.items():
        if config.get(key) not in (fine, None, [], {}):
            raise AdapterError(f"{folder}: {what} cannot be served (adapter_config '{key}')")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{folder}: trained biases cannot be served (bias={config['bias']!r})")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise AdapterError(f"{folder}: rsLoRA with rank_pattern/alpha_pattern (PEFT refuses it)")
    tensors = _read_weights(folder)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise AdapterError(
                f"{folder}: tensor {key} is not a LoRA weight of a decoder projection; "
                f"adapters may target {', '.join(lora_graph.TARGETS)}"
            )
        layer, block, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in lora_graph.TARGETS:
            raise AdapterError(
                f"{folder}: LoRA on '{module}' cannot be served; adapters may target "
                f"{', '.join(lora_graph.TARGETS)}"
            )
        if tensor.ndim != 2:
            raise AdapterError(f"{folder}: {key} has shape {list(tensor.shape)}, not 2-D")
        pairs.setdefault((layer, f"{block}.{module}"), {})[which] = tensor
    if not pairs:
        raise AdapterError(f"{folder}: the adapter holds no LoRA weights")
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = (
        config.get("rank_pattern") or {},
        config.get("alpha_pattern") or {},
    )
    modules = {}
    for (layer, qualified), pair in sorted(pairs.items()):
        module = qualified.split(".")[1]
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{folder}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        full_name = f"model.layers.{layer}.{qualified}"
        rank = int(rank_pattern.get(_pattern_key(rank_pattern, full_name), r))
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{folder}: layer {layer} {module}: lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)} do not have the rank {rank} the config gives"
            )
        module_alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, full_name), alpha))
        root = math.sqrt(rank) if config.get("use_rslora") else rank
        modules[(layer, module)] = Lora(a, b, module_alpha / root)
    return PeftAdapter(
        folder=folder,
        base=str(config.get("base_model_name_or_path") or "unknown"),
        modules=modules,
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora")),
    )


def _pattern_key(patterns: dict[str, Any], key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy arrays."""
    path = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if path is None:
        raise AdapterError(f"{folder} has no {' or '.join(WEIGHTS)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k).float().numpy() for k in f.keys()}
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    except Exception as exc:  # a truncated or foreign file: one line for the user
        raise AdapterError(f"cannot read {path}: {exc}") from None


# ----------------------------------------------------------------------------- fitting a model


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each PEFT target module of a Phi-3 ``config.json`` (checked before an export
    starts; the graph is the authority after it)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head = hidden // heads
    inter = int(config["intermediate_size"])
    return {
        "qkv_proj": (hidden, (heads + 2 * kv) * head),
        "o_proj": (heads * head, hidden),
        "gate_up_proj": (hidden, 2 * inter),
        "down_proj": (inter, hidden),
    }


def check_fits(
    name: str, adapter: PeftAdapter, shapes: dict[str, tuple[int, int]], layers: int, model: str
) -> None:
    """Refuse ``adapter`` unless every LoRA fits the model's projection of that layer."""
    for (layer, module), lora in adapter.modules.items():
        hint = f"(the adapter was trained on {adapter.base}; this model is {model})"
        if layer >= layers:
            raise AdapterError(
                f"adapter '{name}' adapts layer {layer} but the model has {layers} layers {hint}"
            )
        want_in, want_out = shapes[module]
        if lora.a.shape[1] != want_in or lora.b.shape[0] != want_out:
            raise AdapterError(
                f"adapter '{name}' does not fit this model: layer {layer} {module} maps "
                f"{lora.a.shape[1]} -> {lora.b.shape[0]} features, the model's {want_in} -> "
                f"{want_out} {hint}"
            )


def parameters(adapter: PeftAdapter, sites: list[lora_graph.Site]) -> dict[str, np.ndarray]:
    """The adapter file's tensors, named as the graph's LoRA inputs: ``A^T`` [in, r] and, per
    graph MatMul, its rows of ``B`` times the scaling, transposed [r, out]."""
    by_key = {(s.layer, s.module): s for s in sites}
    params = {}
    for key, lora in adapter.modules.items():
        site = by_key[key]
        params[site.a_input] = np.ascontiguousarray(lora.a.T, dtype=np.float32)
        row = 0
        for part in site.parts:
            rows = lora.b[row : row + part.out_features] * np.float32(lora.scaling)
            params[part.b_input] = np.ascontiguousarray(rows.T, dtype=np.float32)
            row += part.out_features
    return params


def write_adapter_file(params: dict[str, np.ndarray], path: Path) -> None:
    """``params`` in onnxruntime's adapter format (written beside, then renamed)."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    adapter.export_adapter(str(tmp))
    tmp.replace(path)


# ----------------------------------------------------------------------------- the model folder


ARCHITECTURE = "Phi3ForCausalLM"  # mini, medium, 3.5-mini: the graph lora_graph knows


def check_architecture(catalog_id: str) -> None:
    from phi3edge.catalog import get as catalog_member

    member = catalog_member(catalog_id)
    if member.architecture != ARCHITECTURE:
        raise AdapterError(
            f"LoRA adapters are supported on {ARCHITECTURE} models (Phi-3-mini, Phi-3-medium, "
            f"Phi-3.5-mini), not on {member.id}"
        )


def check_name(name: str, catalog_id: str, taken: list[str]) -> None:
    """Refuse a name that is malformed or that requests could not tell apart from another."""
    if not NAME.match(name):
        raise AdapterError(
            f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    from phi3edge.catalog import get as catalog_member

    member = catalog_member(catalog_id)
    base_names = {member.id, member.hf_id, member.hf_id.split("/")[1], "phi3edge"}
    if name.lower() in {n.lower() for n in base_names}:
        raise AdapterError(f"adapter name '{name}' is a name of the base model; choose another")
    if name.lower() in {n.lower() for n in taken}:
        raise AdapterError(f"the model already has an adapter named '{name}'")


def add(
    model_dir: str | os.PathLike[str],
    name: str,
    peft_dir: str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Add PEFT adapter ``peft_dir`` to the export ``model_dir`` as ``name``; return its
    manifest entry. A server already running on the folder sees it after a restart."""
    say = progress or (lambda _: None)
    folder = Path(model_dir)
    manifest = Manifest.read(folder)
    check_architecture(manifest.catalog_id)
    check_name(name, manifest.catalog_id, list(manifest.adapters))
    adapter = read_peft(peft_dir)
    graph = lora_graph.load(folder / "model.onnx")
    try:
        sites = lora_graph.sites(graph, adapter.targets)
    except lora_graph.LoraGraphError as exc:
        raise AdapterError(f"{folder}: {exc}") from None
    shapes = {s.module: (s.in_features, s.out_features) for s in sites}
    check_fits(name, adapter, shapes, lora_graph.num_layers(graph), manifest.hf_id)
    if not _same_base(adapter.base, manifest):
        say(
            f"warning: adapter '{name}' was trained on {adapter.base}, this model was exported "
            f"from {manifest.source}; its shapes fit, so it is added"
        )
    (folder / ADAPTER_DIR).mkdir(exist_ok=True)
    file = Path(ADAPTER_DIR) / f"{name}{SUFFIX}"
    write_adapter_file(parameters(adapter, sites), folder / file)
    added = lora_graph.add_lora_inputs(graph, adapter.targets)
    if added:
        say(f"model.onnx: LoRA inputs added for {', '.join(added)} (empty: the base is unchanged)")
        lora_graph.save(graph, folder / "model.onnx")
    entry = {
        "file": str(file),
        "base": adapter.base,
        "rank": adapter.rank,
        "lora_alpha": adapter.lora_alpha,
        "use_rslora": adapter.use_rslora,
        "targets": adapter.targets,
        "layers": len({layer for layer, _ in adapter.modules}),
        "source": str(peft_dir),
        "source_sha256": _checksum(adapter.folder),
    }
    adapters = {**manifest.adapters, name: entry}
    dataclasses.replace(manifest, adapters=adapters).write(folder)
    size = (folder / file).stat().st_size
    say(
        f"adapter '{name}': rank {adapter.rank} on {', '.join(adapter.targets)}, "
        f"{size / 1e6:.2f} MB in {file}"
    )
    return entry


def remove(model_dir: str | os.PathLike[str], name: str) -> None:
    """Remove adapter ``name`` (any case) from the export ``model_dir``: its manifest entry and
    file. The graph keeps its LoRA inputs (empty, they cost the base model nothing measurable)."""
    folder = Path(model_dir)
    manifest = Manifest.read(folder)
    found = next((n for n in manifest.adapters if n.lower() == name.lower()), None)
    if found is None:
        have = ", ".join(manifest.adapters) or "none"
        raise AdapterError(f"{folder} has no adapter named '{name}' (its adapters: {have})")
    entry = manifest.adapters[found]
    rest = {n: e for n, e in manifest.adapters.items() if n != found}
    dataclasses.replace(manifest, adapters=rest).write(folder)
    (folder / entry["file"]).unlink(missing_ok=True)


def check_before_export(
    requested: list[tuple[str, str]], catalog_id: str, config: dict[str, Any]
) -> None:
    """Check ``export --adapter NAME=DIR`` choices against the checkpoint's config before the
    (long) export starts; ``add`` checks them against the graph after it."""
    check_architecture(catalog_id)
    names: list[str] = []
    for name, peft_dir in requested:
        check_name(name, catalog_id, names)
        names.append(name)
        adapter = read_peft(peft_dir)
        layers = int(config["num_hidden_layers"])
        check_fits(name, adapter, expected_shapes(config), layers, str(config.get("_name_or_path")))


def _same_base(base: str, manifest: Manifest) -> bool:
    """Whether PEFT's recorded base names this model (hub id or the folder it came from)."""
    names = {manifest.hf_id, manifest.source, Path(manifest.source).name}
    return base in names or Path(base).name in {Path(n).name for n in names}


def _checksum(folder: Path) -> str:
    return files_checksum([folder / n for n in (CONFIG, *WEIGHTS) if (folder / n).is_file()])
