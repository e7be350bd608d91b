"""Hugging Face Phi-3 checkpoint -> ONNX folder that onnxruntime-genai loads.

Input: a local checkpoint folder or a Hugging Face hub id, an output folder, a precision.
Output: the builder's model.onnx(+data), genai_config.json (with our thread settings) and tokenizer
files, plus ``phi3edge.json``: catalog id, precision, block size, context length, system-role
support and the source checksum. The folder appears only when complete (built in a temporary
sibling, then renamed).
Errors: ``ExportError`` with a one-line message for every bad input.

The conversion itself is onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3edge import catalog, kquant, phimoe_builder

if TYPE_CHECKING:
    from phi3edge.streaming_export import StreamStats

log = logging.getLogger(__name__)

MANIFEST = "phi3edge.json"
PRECISIONS = ("int4", "fp32")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
ACCURACY_LEVELS = (1, 2, 3, 4)  # MatMulNBits activations: 1 fp32, 2 fp16, 3 bf16, 4 int8
LM_HEADS = ("int4", "int8", "fp32")
EMBEDDINGS = ("fp32", "int4")
PHI3 = "Phi3ForCausalLM"  # Phi-3-mini, Phi-3-medium, Phi-3.5-mini
SMALL = "Phi3SmallForCausalLM"  # exported through phi3edge.phi3_small (imports torch: lazily)
MOE_EXPERTS = ("int4", "int8")  # onnxruntime's CPU QMoE kernel has no float experts
# Peak disk of an export (output and scratch) per byte of the checkpoint's weights in float32,
# from full-size Phi-3-mini (README, "Export of full-size Phi-3-mini-4k": 3.1, 18.1 and 15.7 GB
# for 15.3 GB), with a margin: RTN quantizes module by module as the weights stream in; k-quant
# runs in the builder's final pass, so until then every weight waits in the scratch file as
# float32; fp32 writes them all out.
DISK_PER_FLOAT32_BYTE = {"rtn": 0.22, "k_quant": 1.25, "fp32": 1.1}
CHECKPOINT_BYTES_PER_WEIGHT = {"float32": 4, "float16": 2, "bfloat16": 2}


# How the INT4 weights are rounded. "rtn" is the builder's default quantizer (MLAS round to
# nearest); the k-quant ones are llama.cpp's k-quant search for each block's scale and minimum,
# "_last" keeping the lm_head at int8 and "_mixed" also llama.cpp Q4_K_M's most sensitive MatMuls
# (first and last eighth of the layers and every third layer's qkv/down projections).
METHODS = ("rtn", "k_quant", "k_quant_last", "k_quant_mixed")
KEEPS_LM_HEAD_INT8 = ("k_quant_last", "k_quant_mixed")
# The builder's mixed-precision presets each k-quant method stands for (its legacy aliases).
METHOD_PRESETS = {
    "k_quant": (),
    "k_quant_last": ("last_matmul",),
    "k_quant_mixed": ("last_matmul", "mixed_layers"),
}
# Per-layer MatMuls that ``int8_matmuls`` can keep at int8 (the builder's names).
LAYER_MATMULS = {"qkv_proj": "attn", "o_proj": "attn", "down_proj": "mlp"}
# The layers whose ``int8_matmuls`` go int8: every layer, the layers llama.cpp's Q4_K_M keeps at
# higher precision (``mixed_layers``), or the others.
INT8_LAYERS = ("all", "mixed", "others")


def mixed_layers(layers: int) -> list[int]:
    """The layers llama.cpp's Q4_K_M upgrades, as the builder's ``mixed_layers`` preset (its
    ``make_matmul_mixed_precision``) picks them: the first and last eighth, and every third
    layer between."""
    eighth = layers / 8
    return [
        i for i in range(layers) if i < eighth or i >= 7 * eighth or (i - round(eighth)) % 3 == 2
    ]


@dataclass(frozen=True)
class Int4Options:
    """How the INT4 export quantizes. The field defaults are the plain layout (the builder's own,
    ``PLAIN``); an export given no options gets ``default_int4``'s (``RECOMMENDED``, chosen by
    ``scripts/bench_llamacpp.py``).

    ``symmetric``: RTN blocks without (True) or with (False) a zero point; None is the method's
    own layout (RTN symmetric; k-quant always stores a minimum per block, so it is asymmetric).
    ``int8_matmuls``: per-layer MatMuls (``LAYER_MATMULS``) kept at int8, in the layers that
    ``int8_layers`` (``INT8_LAYERS``) names.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = 4
    lm_head: str = "int4"
    embeddings: str = "fp32"
    method: str = "rtn"
    symmetric: bool | None = None
    int8_matmuls: tuple[str, ...] = ()
    int8_layers: str = "all"

    def check(self) -> None:
        for name, value, allowed in (
            ("block size", self.block_size, BLOCK_SIZES),
            ("accuracy level", self.accuracy_level, ACCURACY_LEVELS),
            ("lm_head", self.lm_head, LM_HEADS),
            ("embeddings", self.embeddings, EMBEDDINGS),
            ("quant method", self.method, METHODS),
            ("int8 layers", self.int8_layers, INT8_LAYERS),
        ):
            if value not in allowed:
                raise ExportError(f"{name} must be one of {allowed}, not {value!r}")
        if self.symmetric not in (None, True, False):
            raise ExportError(f"symmetric must be True, False or None, not {self.symmetric!r}")
        if self.method != "rtn" and self.symmetric:
            raise ExportError(
                f"quant method {self.method} is asymmetric (a scale and a minimum per block); "
                "symmetric blocks need quant method rtn"
            )
        if self.method in KEEPS_LM_HEAD_INT8 and self.lm_head != "int4":
            raise ExportError(
                f"quant method {self.method} sets the lm_head to int8 itself; "
                f"drop lm_head {self.lm_head!r} (or use quant method k_quant with it)"
            )
        unknown = [name for name in self.int8_matmuls if name not in LAYER_MATMULS]
        if unknown:
            raise ExportError(
                f"int8 MatMuls must be among {tuple(LAYER_MATMULS)}, not {', '.join(unknown)}"
            )
        if self.int8_layers != "all" and not self.int8_matmuls:
            raise ExportError(
                f"int8 layers {self.int8_layers!r} choose where int8 MatMuls go; name them too "
                f"(int8_matmuls, --int8-matmul)"
            )
        if self.int8_matmuls and self.method == "rtn":
            raise ExportError(
                "int8 MatMuls need a k-quant method (the builder's rtn quantizer takes no "
                "per-node bits)"
            )

    @property
    def is_symmetric(self) -> bool:
        """The layout the weights get: ``symmetric`` or the method's own."""
        return self.method == "rtn" if self.symmetric is None else self.symmetric

    def recorded(self) -> dict[str, Any]:
        """What the manifest records: the options with the layout resolved (and the lm_head
        the method implies), so a reader need not know the methods' defaults."""
        lm_head = "int8" if self.method in KEEPS_LM_HEAD_INT8 else self.lm_head
        return {
            **asdict(self),
            "symmetric": self.is_symmetric,
            "lm_head": lm_head,
            "int8_matmuls": list(self.int8_matmuls),
        }

    def int8_layer_indices(self, layers: int) -> list[int]:
        """The layers, of a model of ``layers``, whose ``int8_matmuls`` go int8."""
        if self.int8_layers == "all":
            return list(range(layers))
        mixed = mixed_layers(layers)
        if self.int8_layers == "mixed":
            return mixed
        return [i for i in range(layers) if i not in mixed]

    def builder_target_options(self, layers: int) -> dict[str, Any] | None:
        """The builder's ``target_options`` for a model of ``layers`` layers: per-node weight
        overrides when ``int8_matmuls`` asks for them, else None. Structured overrides replace
        the method's preset list, so the presets are spelled out here too."""
        if not self.int8_matmuls:
            return None
        overrides = [
            {"match": {"preset": preset}, "type": "int8"} for preset in METHOD_PRESETS[self.method]
        ]
        for name in self.int8_matmuls:
            overrides += [
                {
                    "match": {"name": f"/model/layers.{i}/{LAYER_MATMULS[name]}/{name}/MatMul"},
                    "type": "int8",
                }
                for i in self.int8_layer_indices(layers)
            ]
        return {"quant_config": {"weights": {"overrides": overrides}}}

    def builder_options(self) -> list[str]:
        """The builder's KEY=VALUE extra options for these choices."""
        options = [f"block_size={self.block_size}", f"accuracy_level={self.accuracy_level}"]
        if self.int8_matmuls:  # the method's presets are in builder_target_options
            options.append("algo_config=k_quant")
        elif self.method != "rtn":  # rtn is the builder's "default" quantizer: no algo_config
            options.append(f"algo_config={self.method}")
        elif not self.is_symmetric:
            options.append("is_symmetric=false")
        if self.lm_head == "int8":
            options.append("matmul_mixed_precision=last_matmul:int8")
        elif self.lm_head == "fp32":
            options.append("nodes_to_exclude=/lm_head/MatMul")
        if self.embeddings == "int4":
            options.append("op_types_to_quantize=MatMul/Gather")
        return options


# The INT4 layout of an export given none (chosen by scripts/bench_llamacpp.py; README): k-quant
# at block 128, int8 for the lm_head and llama.cpp Q4_K_M's layers (the builder's k_quant_mixed),
# and int8 o_proj in those same layers: o_proj is the MatMul where int8 buys the most accuracy
# per byte, nearly all of it in those layers (cosine 0.799 against 0.803 in every layer).
RECOMMENDED = Int4Options(
    block_size=128, method="k_quant_mixed", int8_matmuls=("o_proj",), int8_layers="mixed"
)
PLAIN = Int4Options()  # RTN, block 32: what the builder does by default


def default_int4(architecture: str) -> Int4Options:
    """The layout of an export given no INT4 options: RECOMMENDED for Phi3ForCausalLM (Phi-3-mini,
    Phi-3-medium, Phi-3.5-mini), where it was measured; PLAIN for Phi-3-small and Phi-3.5-MoE,
    whose graphs name their MatMuls otherwise and where it was not."""
    return RECOMMENDED if architecture == PHI3 else PLAIN


class ExportError(RuntimeError):
    """An export could not start or did not finish; the message is one line for the user."""


@dataclass(frozen=True)
class Manifest:
    """What phi3edge.json records about an exported folder."""

    catalog_id: str
    hf_id: str
    precision: str
    int4: dict[str, Any] | None
    context_length: int
    accepts_system_role: bool
    source: str
    source_sha256: str
    phi3edge_version: str
    onnxruntime_genai_version: str
    moe_experts: str | None = None
    # LoRA adapters served by name (``phi3edge.adapters``): name -> file, base, rank, targets...
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        """Write phi3edge.json (beside, then renamed: a reader never sees half of it)."""
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(folder / MANIFEST)

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        try:
            return cls(**json.loads(path.read_text("utf-8")))
        except FileNotFoundError:
            raise ExportError(
                f"{folder} is not a phi3edge model folder (no {MANIFEST}); "
                "make one with `phi3edge export`"
            ) from None
        except (TypeError, json.JSONDecodeError):
            raise ExportError(
                f"{path} was not written by this phi3edge version; export the model again"
            ) from None


def export(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    precision: str = "int4",
    int4: Int4Options | None = None,
    progress: Callable[[str], None] | None = None,
    moe_experts: str | None = None,
    adapters: list[tuple[str, str]] | None = None,
) -> Path:
    """Convert ``source`` (folder or hub id) into ``out`` and return ``out``.

    ``moe_experts`` (Phi-3.5-MoE only) is the experts' precision: int4 by default, int8 when
    ``precision`` is fp32 (the most exact the CPU kernel has). ``adapters``: (name, PEFT LoRA
    folder) pairs added to the export (``phi3edge.adapters``), checked before it starts.
    """
    say = progress or log.info
    out = Path(out).absolute()
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "int4" and int4 is not None:
        int4.check()  # before the checkpoint is read: a bad option fails at once
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output {out} already exists and is not an empty folder")

    started = time.monotonic()
    source_dir = _resolve_source(str(source), say)
    config = _read_config(source_dir)
    try:
        member, differences = catalog.identify_or_nearest(config)
    except catalog.UnknownModelError as exc:
        raise ExportError(f"{source}: {exc}") from None
    if differences:
        warning = (
            f"warning: {source} matches no published {member.architecture} "
            f"({', '.join(differences)}); exporting it as a {member.architecture} with its own "
            f"config, named after the nearest member, {member.id}"
        )
        log.warning(warning)
        say(warning)
    if not member.exports_on_cpu:
        raise ExportError(f"{member.id} cannot be exported for CPU: {member.cpu_note}")
    is_moe = member.architecture in phimoe_builder.ARCHITECTURES
    int4 = int4 or default_int4(member.architecture)
    if moe_experts is not None and not is_moe:
        raise ExportError(f"--moe-experts applies to Phi-3.5-MoE only, not to {member.id}")
    if is_moe:
        moe_experts = moe_experts or ("int4" if precision == "int4" else "int8")
        if moe_experts not in MOE_EXPERTS:
            raise ExportError(f"moe experts must be one of {MOE_EXPERTS}, not {moe_experts!r}")
    if member.architecture == SMALL and not any(
        (source_dir / name).is_file() for name in ("tokenizer.json", "cl100k_base.tiktoken")
    ):
        raise ExportError(
            f"{source}: no tokenizer: a Phi-3-small checkpoint needs tiktoken's "
            "cl100k_base.tiktoken (as published; converted at export) or a tokenizer.json"
        )
    if member.architecture == SMALL and not (source_dir / "tokenizer.json").is_file():
        from phi3edge import tiktoken_convert

        try:  # a malformed file fails here, not after the weights are exported
            tiktoken_convert.read_phi3_small_ranks(source_dir / tiktoken_convert.TIKTOKEN_FILE)
        except tiktoken_convert.TiktokenFileError as exc:
            raise ExportError(str(exc)) from None
    if not _has_chat_template(source_dir):
        raise ExportError(
            f"{source}: the checkpoint has no chat template (tokenizer_config.json "
            "'chat_template' or chat_template.jinja); phi3edge needs it to build prompts"
        )
    if adapters:
        from phi3edge import adapters as lora

        lora.check_before_export(adapters, member.id, config)
    if precision == "int4":
        _check_k_quant_blocks(int4, config)
        if int4.int8_matmuls and member.architecture != PHI3:
            raise ExportError(
                f"int8 MatMuls are for Phi-3-mini, Phi-3-medium and Phi-3.5-mini, not {member.id}"
            )
    _check_free_disk(out, source_dir, config, precision, int4)
    experts_note = f", experts {moe_experts}" if is_moe else ""
    say(f"exporting {member.id} from {source_dir} to {precision} ONNX{experts_note}")

    with staged_folder(out) as staging:
        options = int4.builder_options() if precision == "int4" else []
        if is_moe:
            options += [f"moe_quant_type={moe_experts}", f"qmoe_block_size={int4.block_size}"]
        target = (
            int4.builder_target_options(int(config["num_hidden_layers"]))
            if precision == "int4"
            else None
        )
        options += WINDOW_OPTIONS
        with windowed_attention(config, member.architecture):
            _run_builder(source_dir, staging, precision, options, say, member.architecture, target)
        if target:
            _check_int8_matmuls(staging, int4, int(config["num_hidden_layers"]))
        checksum = source_checksum(source_dir)
        Manifest(
            catalog_id=member.id,
            hf_id=member.hf_id,
            precision=precision,
            int4=int4.recorded() if precision == "int4" else None,
            context_length=int(config["max_position_embeddings"]),
            accepts_system_role=member.accepts_system_role,
            source=str(source),
            source_sha256=checksum,
            phi3edge_version=_version("phi3edge"),
            onnxruntime_genai_version=_version("onnxruntime-genai"),
            moe_experts=moe_experts,
        ).write(staging)
        for name, peft_dir in adapters or []:
            lora.add(staging, name, peft_dir, say)
    say(f"done in {time.monotonic() - started:.1f} s: {out}")
    return out


def _check_int8_matmuls(folder: Path, int4: Int4Options, layers: int) -> None:
    """The ``int8_matmuls`` of the layers ``int4`` names came out int8: the builder skips an
    override naming no node without a word, so a renamed node would otherwise quietly stay INT4."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    bits_of = {
        node.name: attribute.i
        for node in graph.node
        if node.op_type == "MatMulNBits"
        for attribute in node.attribute
        if attribute.name == "bits"
    }
    for name in int4.int8_matmuls:
        for i in int4.int8_layer_indices(layers):
            prefix = f"/model/layers.{i}/{LAYER_MATMULS[name]}/{name}/MatMul"
            bits = [b for node, b in bits_of.items() if node.startswith(prefix)]
            if bits != [8]:
                raise ExportError(
                    f"the builder did not keep layer {i}'s {name} MatMul at int8: bits {bits}"
                )


def _check_k_quant_blocks(int4: Int4Options, config: dict[str, Any]) -> None:
    """k-quant's packer (onnxruntime's neural_compressor ``make_matmul_weight_only_node``) packs
    two 4-bit zero points per byte across rows, so it fails on a MatMul whose row has an odd
    number of blocks: refuse that before the export starts instead of with a reshape error."""
    if int4.method == "rtn":
        return
    for name in ("hidden_size", "intermediate_size"):
        size = config.get(name)
        if not isinstance(size, int):
            continue
        blocks = -(-size // int4.block_size)  # a partial last block counts
        if blocks % 2:
            raise ExportError(
                f"quant method {int4.method} needs an even number of blocks per row, but "
                f"{name} {size} / block size {int4.block_size} gives "
                f"{blocks}; use another block size or quant method rtn"
            )


def disk_needed(source_dir: Path, config: dict[str, Any], kind: str) -> int:
    """Bytes of disk an export of ``kind`` (a ``DISK_PER_FLOAT32_BYTE`` key) peaks at, estimated
    from the checkpoint's weight files and the dtype its config names."""
    stored = sum(f.stat().st_size for f in source_dir.glob("*.safetensors"))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    as_float32 = stored * 4 // CHECKPOINT_BYTES_PER_WEIGHT.get(dtype, 2)
    return int(as_float32 * DISK_PER_FLOAT32_BYTE[kind])


def _check_free_disk(
    out: Path, source_dir: Path, config: dict[str, Any], precision: str, int4: Int4Options
) -> None:
    """Refuse up front an export that would run out of disk halfway (minutes in, with ENOSPC)."""
    kind = "fp32" if precision == "fp32" else "rtn" if int4.method == "rtn" else "k_quant"
    needed = disk_needed(source_dir, config, kind)
    folder = next(p for p in (out, *out.parents) if p.exists())  # out and its parents may be new
    free = shutil.disk_usage(folder).free
    if free >= needed:
        return
    hint = ""
    if kind == "k_quant":
        rtn = disk_needed(source_dir, config, "rtn")
        hint = (
            f"; k-quant keeps every weight as float32 in a scratch file until the builder's "
            f"final pass, --quant-method rtn needs about {rtn / 1e9:.1f} GB"
        )
    raise ExportError(
        f"not enough free disk in {folder}: this {kind} export needs about {needed / 1e9:.1f} GB "
        f"(output and scratch), {free / 1e9:.1f} GB are free{hint}"
    )


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it to ``out`` only when complete, so a
    failure (or Ctrl-C) never leaves a half-written ``out`` behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _resolve_source(source: str, say: Callable[[str], None]) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ExportError(f"{source} has no config.json: not a Hugging Face checkpoint folder")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ExportError(f"{source}: no such folder (and not a hub id of the form owner/name)")
    say(f"downloading {source} from the Hugging Face hub")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                source,
                allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.model", "*.tiktoken"],
            )
        )
    except Exception as exc:  # network, auth, missing repo: all one line for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot download {source} from the hub: {reason}") from None


def _read_config(source_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((source_dir / "config.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {source_dir / 'config.json'}: {exc}") from None


def _has_chat_template(source_dir: Path) -> bool:
    if (source_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((source_dir / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return bool(config.get("chat_template"))


def load_builder() -> Any:
    """onnxruntime-genai's model builder module (it imports its siblings as top-level modules,
    which ``onnxruntime_genai.models`` makes importable by extending sys.path)."""
    import importlib

    importlib.import_module("onnxruntime_genai.models")
    return importlib.import_module("builder")


# The builder's options for every export: no "sliding_window" section in genai_config.json
# (``windowed_attention``).
WINDOW_OPTIONS = ["windowed_kv_cache=false"]


@contextlib.contextmanager
def windowed_attention(config: dict[str, Any], architecture: str) -> Iterator[None]:
    """While the builder runs, every attention layer of a Phi-3 checkpoint whose config.json
    names a ``sliding_window`` shorter than its context attends to its last ``sliding_window``
    positions, as transformers' Phi3 does (Phi-3-mini-4k and Phi-3-medium-4k: 2047 of 4096).

    The builder windows only the layers that ``config.layer_types`` marks "sliding_attention",
    which Phi-3 configs lack, so by itself it exports full attention. It also writes a
    "sliding_window" section into genai_config.json, with which onnxruntime-genai 0.18 sizes a
    shared KV cache to the window (2063 positions) while that graph attends to everything: a
    conversation longer than that failed. ``WINDOW_OPTIONS`` drop the section, so the KV cache
    spans the whole context and rewinds as before."""
    window = config.get("sliding_window") if architecture == PHI3 else None
    if not window or window >= config["max_position_embeddings"]:
        yield
        return
    load_builder()
    base = sys.modules["builders.base"]  # where the builder's Model class lives
    original = base.Model.is_local
    base.Model.is_local = lambda self, layer_id: True
    try:
        yield
    finally:
        base.Model.is_local = original


def _run_builder(
    source_dir: Path,
    out: Path,
    precision: str,
    options: list[str],
    say: Callable[[str], None],
    architecture: str,
    target_options: dict[str, Any] | None = None,
) -> StreamStats:
    """Run onnxruntime-genai's builder one checkpoint module at a time (``streaming_export``),
    turning its prints into progress lines; returns what the streaming did. Phi-3.5-MoE goes
    through our subclass of the builder; Phi-3-small through the builder patched to load our
    reference model (no remote code). ``target_options``: the builder's structured options
    (``Int4Options.builder_target_options``)."""
    from phi3edge.streaming_export import streaming

    builder = load_builder()
    with (
        tempfile.TemporaryDirectory(prefix="phi3edge-builder-cache-") as cache_dir,
        # scratch tensors live on the output's disk, inside the staging folder
        tempfile.TemporaryDirectory(prefix=".phi3edge-scratch-", dir=out) as scratch,
    ):
        with (
            _builder_output_as_progress(say),
            _quiet_quantizer_logs(),
            streaming(builder, Path(scratch), say) as stats,
            kquant.parallel(),
            contextlib.ExitStack() as stack,
        ):
            if architecture in phimoe_builder.ARCHITECTURES:
                phimoe_builder.create_model(
                    builder, str(source_dir), str(out), precision, cache_dir, options
                )
                return stats
            if architecture == SMALL:
                from phi3edge.phi3_small_export import patched_builder

                stack.enter_context(patched_builder(builder, source_dir))
            extra = builder.parse_extra_options(
                None,
                str(source_dir),
                str(out),
                precision,
                "cpu",
                cache_dir,
                options,
                target_options=target_options,
            )
            builder.create_model(
                None, str(source_dir), str(out), precision, "cpu", cache_dir, **extra
            )
    return stats


class _LineForwarder(io.TextIOBase):
    """A stdout stand-in that forwards the builder's 'Reading layer N' lines as progress (and
    Phi-3-small's 'tokenizer.json converted from ...')."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            line = line.strip()
            if line.startswith(
                ("Reading", "Saving GenAI", "Saving ONNX", "Quantizing", "tokenizer.json")
            ):
                self._say(f"  builder: {line}")
        return len(text)


@contextlib.contextmanager
def _builder_output_as_progress(say: Callable[[str], None]) -> Iterator[None]:
    with contextlib.redirect_stdout(_LineForwarder(say)):
        yield


class _NoProgressBars(io.TextIOBase):
    """A stderr stand-in that drops progress-bar redraws and passes everything else on."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def write(self, text: str) -> int:
        if "\r" not in text and "it/s]" not in text and "%|" not in text:
            self._target.write(text)
        return len(text)

    def flush(self) -> None:
        self._target.flush()


@contextlib.contextmanager
def _quiet_quantizer_logs() -> Iterator[None]:
    levels = {
        "onnxruntime.quantization.matmul_nbits_quantizer": logging.WARNING,
        "onnxruntime.quantization": logging.WARNING,
        # k-quant's "time consuming, consider cupy" (INFO, once per MatMul) and "model size >
        # 2GB, use a model path" (WARNING, about the builder's call, not the user's)
        "neural_compressor": logging.ERROR,
    }
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    before = {lg: lg.level for lg in loggers}
    for lg, level in loggers.items():
        lg.setLevel(level)
    original = sys.stderr
    sys.stderr = _NoProgressBars(original)  # per-tensor bars; our progress lines replace them
    try:
        yield
    finally:
        sys.stderr = original
        for lg, level in before.items():
            lg.setLevel(level)


def source_checksum(source_dir: Path) -> str:
    """sha256 over config.json and the weight files (name + content), in name order."""
    files = sorted(source_dir.glob("*.safetensors")) + sorted(source_dir.glob("*.bin"))
    return files_checksum([source_dir / "config.json", *files])


def files_checksum(paths: list[Path]) -> str:
    """sha256 over each file's name and content, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
