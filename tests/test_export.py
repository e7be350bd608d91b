"""Export: manifest, bad inputs as one-line errors, nothing half-written, genai loads the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from phi3edge import export


def test_manifest_records_the_export(tiny_int4: Path, model_factory: Callable) -> None:
    manifest = export.Manifest.read(tiny_int4)
    assert manifest.catalog_id == "phi-3-mini-4k"
    assert manifest.precision == "int4"
    assert manifest.int4 == {  # the recommended layout, the lm_head int8 by its method
        "block_size": 128,
        "accuracy_level": 4,
        "lm_head": "int8",
        "embeddings": "fp32",
        "method": "k_quant_mixed",
        "symmetric": False,
        "int8_matmuls": ["o_proj"],
        "int8_layers": "mixed",
    }
    assert manifest.context_length == 2048
    assert manifest.accepts_system_role is False
    assert manifest.source_sha256 == export.source_checksum(model_factory("phi-3-mini-4k"))
    assert not list(tiny_int4.parent.glob(".*partial*"))


def test_exported_folder_loads_in_onnxruntime_genai(tiny_int4: Path) -> None:
    import onnxruntime_genai as og

    model = og.Model(str(tiny_int4))
    tokenizer = og.Tokenizer(model)
    assert list(tokenizer.encode("<|user|>"))[0] == 32010


def test_missing_folder(cli_error: Callable[..., str], tmp_path: Path) -> None:
    err = cli_error("export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert "no such folder" in err


def test_not_a_phi3_checkpoint(cli_error: Callable[..., str], tmp_path: Path) -> None:
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert "not a Phi-3" in cli_error("export", str(src), str(tmp_path / "out"))


def test_phi_3_small_without_a_tokenizer_is_refused_before_export(
    cli_error: Callable[..., str], tmp_path: Path
) -> None:
    """Neither cl100k_base.tiktoken (as published) nor tokenizer.json: say so up front."""
    from phi3edge import catalog

    src = tmp_path / "small"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(catalog.get("phi-3-small-8k").published_config()))
    err = cli_error("export", str(src), str(tmp_path / "out"))
    assert "no tokenizer" in err and "cl100k_base.tiktoken" in err and "tokenizer.json" in err
    assert not (tmp_path / "out").exists()


def test_phi_3_small_with_a_malformed_tiktoken_file_is_refused_before_export(
    cli_error: Callable[..., str], tmp_path: Path
) -> None:
    from phi3edge import catalog

    src = tmp_path / "small"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(catalog.get("phi-3-small-8k").published_config()))
    (src / "cl100k_base.tiktoken").write_text("IQ== 0\nIg== 1\n")  # 2 ranks, 254 bytes missing
    err = cli_error("export", str(src), str(tmp_path / "out"))
    assert "cl100k_base.tiktoken: 254 single bytes have no rank" in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output(cli_error: Callable[..., str], tmp_path: Path, model_factory) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    err = cli_error("export", str(model_factory("phi-3-mini-4k")), str(out))
    assert "not an empty folder" in err
    assert (out / "keep").read_text() == "x"


def test_hub_unreachable(
    cli_error: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = cli_error("export", "microsoft/Phi-3-mini-4k-instruct", str(tmp_path / "o"))
    assert "cannot download microsoft/Phi-3-mini-4k-instruct" in err


def test_bad_block_size(cli_error: Callable[..., str], tmp_path: Path, model_factory) -> None:
    src = str(model_factory("phi-3-mini-4k"))
    assert "block size" in cli_error("export", src, str(tmp_path / "o"), "--block-size", "7")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--accuracy-level", "7", "accuracy level"), ("--block-size", "48", "block size")],
)
def test_bad_int4_options(
    cli_error: Callable[..., str], tmp_path: Path, model_factory, flag, value, message
) -> None:
    src = str(model_factory("phi-3-mini-4k"))
    assert message in cli_error("export", src, str(tmp_path / "o"), flag, value)


def test_int4_options_reach_the_model(tmp_path: Path, tiny_int4: Path, model_factory) -> None:
    """int4 embeddings and an int8 lm_head: a smaller file that still loads and runs."""
    import onnxruntime_genai as og

    options = export.Int4Options(lm_head="int8", embeddings="int4", block_size=64)
    out = export.export(model_factory("phi-3-mini-4k"), tmp_path / "o", int4=options)
    size = (out / "model.onnx.data").stat().st_size
    assert size < (tiny_int4 / "model.onnx.data").stat().st_size
    graph = (out / "model.onnx").read_bytes()
    assert b"GatherBlockQuantized" in graph
    generator_params = og.GeneratorParams(og.Model(str(out)))
    assert generator_params is not None
    assert export.Manifest.read(out).int4["lm_head"] == "int8"


@pytest.mark.parametrize(
    ("flags", "kind", "hint"),
    [([], "k_quant", "--quant-method rtn needs about"), (["--quant-method", "rtn"], "rtn", None)],
)
def test_too_little_free_disk_is_refused_before_export(
    cli_error: Callable[..., str],
    tmp_path: Path,
    model_factory,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    kind: str,
    hint: str | None,
) -> None:
    """The estimate comes from the weight files (tiny ones here), and the check sees the disk
    the output folder would be on, before anything is written."""
    source = model_factory("phi-3-mini-4k")
    needed = export.disk_needed(source, json.loads((source / "config.json").read_text()), kind)
    seen: list[Path] = []

    def disk_usage(path: os.PathLike[str]) -> Any:
        seen.append(Path(path))
        return SimpleNamespace(total=10 * needed, used=9 * needed, free=needed - 1)

    monkeypatch.setattr(export.shutil, "disk_usage", disk_usage)
    out = tmp_path / "new" / "out"
    err = cli_error("export", str(source), str(out), *flags)
    assert f"not enough free disk in {tmp_path}: this {kind} export needs about" in err
    assert (hint in err) if hint else ("--quant-method rtn" not in err)
    assert seen == [tmp_path]
    assert not (tmp_path / "new").exists()


def test_failed_export_leaves_nothing(tmp_path: Path, model_factory) -> None:
    src = tmp_path / "broken"
    shutil.copytree(model_factory("phi-3-mini-4k"), src)
    for shard in src.glob("model-0000[12].safetensors"):
        shard.unlink()  # weights missing: the builder fails midway
    with pytest.raises(Exception):  # noqa: B017 - whatever the builder raises
        export.export(src, tmp_path / "out", progress=lambda _: None)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_progress_is_reported(tmp_path: Path, model_factory) -> None:
    lines: list[str] = []
    export.export(
        model_factory("phi-3-mini-4k"), tmp_path / "o", precision="fp32", progress=lines.append
    )
    assert any("Reading layer 1" in line for line in lines)
    assert lines[-1].startswith("done in")


def _stock_export(
    checkpoint: Path,
    out: Path,
    precision: str,
    options: list[str],
    target_options: dict[str, Any] | None = None,
) -> Path:
    """onnxruntime-genai's builder exactly as its CLI runs it (whole model in memory, onnxruntime's
    own k-quant loop), with the sliding window of ``export.windowed_attention``;
    ``target_options``: its ``--target_options``."""
    builder = export.load_builder()
    cache = str(out.parent / f"{out.name}-cache")
    extra = builder.parse_extra_options(
        None,
        str(checkpoint),
        str(out),
        precision,
        "cpu",
        cache,
        options + export.WINDOW_OPTIONS,
        target_options=target_options,
    )
    config = json.loads((checkpoint / "config.json").read_text())
    with export.windowed_attention(config, export.PHI3):
        builder.create_model(None, str(checkpoint), str(out), precision, "cpu", cache, **extra)
    return out


def _assert_same_files(a: Path, b: Path) -> None:
    import filecmp

    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


MIXED = export.Int4Options(lm_head="int8", embeddings="int4")
K_QUANT_MIXED = export.Int4Options(method="k_quant_mixed", embeddings="int4", block_size=16)
INT8_MATMULS = export.Int4Options(method="k_quant_mixed", int8_matmuls=("o_proj", "down_proj"))


@pytest.mark.parametrize(
    ("precision", "int4"),
    [
        ("int4", None),
        ("int4", MIXED),
        ("int4", export.Int4Options(symmetric=False)),
        ("int4", export.Int4Options(method="k_quant")),
        ("int4", export.Int4Options(method="k_quant_last")),
        ("int4", K_QUANT_MIXED),
        ("int4", INT8_MATMULS),
        ("fp32", None),
    ],
    ids=[
        "int4",
        "int4-lm_head-int8-embeddings-int4",
        "int4-asymmetric",
        "k_quant",
        "k_quant_last",
        "k_quant_mixed-embeddings-int4-block16",
        "k_quant_mixed-int8-o_proj-down_proj",
        "fp32",
    ],
)
def test_streaming_export_is_byte_identical_to_the_stock_builder(
    tmp_path: Path, model_factory: Callable[..., Path], precision: str, int4: Any
) -> None:
    """Streaming the checkpoint module by module and quantizing each weight as it comes must not
    change a single byte of the model (the int8 lm_head pass and int4 embeddings included), and
    neither may our k-quant in pieces on every core (``phi3edge.kquant``)."""
    checkpoint = model_factory("phi-3-mini-4k")
    if int4 is None:
        ours = model_factory("phi-3-mini-4k", precision)  # the session's export
    else:
        ours = export.export(checkpoint, tmp_path / "ours", int4=int4, progress=lambda _: None)
    int4 = int4 or export.RECOMMENDED
    options = int4.builder_options() if precision == "int4" else []
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    target = int4.builder_target_options(layers) if precision == "int4" else None
    stock = _stock_export(checkpoint, tmp_path / "stock", precision, options, target)
    _assert_same_files(stock, ours)


def _deeper_checkpoint(tiny: Path, out: Path, layers: int) -> Path:
    """The tiny checkpoint with ``layers`` decoder layers (copies of its own, renamed)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors: dict[str, Any] = {}
    for shard in sorted(tiny.glob("*.safetensors")):
        tensors.update(load_file(shard))
    for layer in range(2, layers):
        for key in [k for k in tensors if k.startswith(f"model.layers.{layer % 2}.")]:
            tensors[key.replace(f"layers.{layer % 2}.", f"layers.{layer}.", 1)] = tensors[key]
    save_file({k: v.clone() for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_streaming_export_holds_one_module_at_a_time(
    tmp_path: Path, model_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted from outside, every time the builder emits a decoder layer: only that layer's
    parameters are real (the rest of the model is on the meta device), no earlier weight is
    still in the graph's memory, and every released parameter has been garbage-collected."""
    import onnx_ir as ir

    layers = 6
    checkpoint = _deeper_checkpoint(model_factory("phi-3-mini-4k"), tmp_path / "deep", layers)
    builder = export.load_builder()
    seen: list[tuple[int, int, int, int]] = []
    make_layer = builder.Model.make_layer

    def counting_make_layer(self: Any, layer_id: int, layer: Any) -> Any:
        real = sum(p.numel() for p in self.weights.parameters() if p.device.type != "meta")
        own = sum(p.numel() for p in layer.parameters())
        in_memory = sum(
            v.const_value.nbytes
            for v in self.model.graph.initializers.values()
            if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
        )
        seen.append((layer_id, real, own, in_memory))
        return make_layer(self, layer_id, layer)

    monkeypatch.setattr(builder.Model, "make_layer", counting_make_layer)
    out = tmp_path / "out"
    out.mkdir()
    options = export.Int4Options().builder_options()
    stats = export._run_builder(checkpoint, out, "int4", options, lambda _: None, "Phi3ForCausalLM")
    assert [layer_id for layer_id, *_ in seen] == list(range(layers))
    for _, real, own, in_memory in seen:
        assert real == own  # embedding released, next layers not loaded yet
        assert in_memory == 0  # earlier weights quantized or moved to the scratch file
    assert stats.streamed and stats.units == layers + 3  # + embedding, final norm, lm_head
    assert stats.leaked_tensors == 0 and stats.mapped_checkpoint_bytes == 0
    assert stats.quantized == stats.replayed == 5 * layers + 1  # qkv, o, gate, up, down; lm_head
    assert (out / "model.onnx.data").is_file() and not list(out.glob(".phi3edge-scratch-*"))


def _rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streaming_export_memory_stays_near_one_module(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    """A 530 MB float32 checkpoint (48 wide layers) exports with the exporting process's anonymous
    memory growing by well under all of it (measured 160-225 MB: float32 copies of the largest
    weights and the graph itself): the stock builder holds all of it, plus float32 copies."""

    import torch
    from safetensors.torch import save_file

    layers, inter = 48, 4096
    src = tmp_path / "wide"
    shutil.copytree(model_factory("phi-3-mini-4k"), src, ignore=shutil.ignore_patterns("model*"))
    config = json.loads((src / "config.json").read_text())
    config.update(num_hidden_layers=layers, intermediate_size=inter)
    (src / "config.json").write_text(json.dumps(config))
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(vocab, hidden, generator=generator),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.qkv_proj.weight": torch.randn(3 * hidden, hidden, generator=generator),
            p + "self_attn.o_proj.weight": torch.randn(hidden, hidden, generator=generator),
            p + "mlp.gate_up_proj.weight": torch.randn(2 * inter, hidden, generator=generator),
            p + "mlp.down_proj.weight": torch.randn(hidden, inter, generator=generator),
        })  # fmt: skip
    size = sum(t.numel() * 4 for t in tensors.values())
    save_file(tensors, str(src / "model.safetensors"))
    del tensors
    out = tmp_path / "out"
    out.mkdir()
    # A fresh interpreter, so what earlier tests left in this process's heap cannot blur the peak.
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE_EXPORT_MEMORY)
    warm_up = model_factory("phi-3-mini-4k")
    result = subprocess.run(
        [sys.executable, str(script), str(src), str(out), str(warm_up), str(tmp_path / "warm")],
        capture_output=True, text=True, check=True,
        env={**os.environ, "MALLOC_ARENA_MAX": "1"},  # one heap: growth, not per-thread arenas
    )  # fmt: skip
    growth, streamed, quantized = json.loads(result.stdout.strip().splitlines()[-1])
    assert streamed and quantized == 5 * layers + 1
    assert size > 520e6
    print(f"anonymous memory growth {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint")
    # the stock builder holds the whole checkpoint, plus float32 copies: growth > size
    assert growth < 0.6 * size, growth / 1e6


_MEASURE_EXPORT_MEMORY = """
import json, sys, threading, time
from pathlib import Path
from phi3edge import export

def rss_anon():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0

source, out, warm_source, warm_out = (Path(a) for a in sys.argv[1:5])
options = export.Int4Options().builder_options()
# One tiny export first: imports and the quantizer's one-time setup are not the export's memory.
warm_out.mkdir()
export._run_builder(warm_source, warm_out, "int4", options, lambda _: None, "Phi3ForCausalLM")
start, peak, done = rss_anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.005)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
stats = export._run_builder(source, out, "int4", options, lambda _: None, "Phi3ForCausalLM")
done.set()
sampler.join()
print(json.dumps([peak[0] - start, stats.streamed, stats.quantized]))
"""


def _tiny_phimoe(out: Path, layout: str) -> Path:
    """A tiny random transformers ``PhimoeForCausalLM`` (LayerNorm, biases, longrope, 4 experts)
    with a Phi-3 tokenizer, saved in the hub's layout (``save_pretrained`` writes
    ``block_sparse_moe.experts.N.w1/w2/w3`` and ``block_sparse_moe.gate``) or in transformers 5's
    own (``mlp.router``, packed ``mlp.experts.gate_up_proj`` / ``down_proj``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from phi3edge import catalog
    from phi3edge.tokenizer_fixture import build_phi3_tokenizer, phi3_tokenizer_config

    half = 8  # head_dim 16
    config = PhimoeConfig(
        vocab_size=32064, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        attention_bias=True, lm_head_bias=True, original_max_position_embeddings=256,
        max_position_embeddings=8192, sliding_window=8192, dtype="float32",
        rope_scaling={
            "type": "longrope", "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "short_mscale": 1.24, "long_mscale": 1.24, "original_max_position_embeddings": 256,
        },
    )  # fmt: skip
    config.architectures = ["PhimoeForCausalLM"]
    torch.manual_seed(0)
    model = PhimoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(out)
    if layout == "transformers":
        for shard in out.glob("*.safetensors*"):
            shard.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    template = catalog.chat_templates()["Phi-3.5-MoE-instruct"]["chat_template"]
    build_phi3_tokenizer().save(str(out / "tokenizer.json"))
    tokenizer_config = phi3_tokenizer_config(template, config.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_phimoe_parameters_stream_as_from_pretrained_loads_them(
    tmp_path: Path, layout: str
) -> None:
    """Both checkpoint layouts of Phi-3.5-MoE give, parameter by parameter, exactly the tensors
    transformers' ``from_pretrained`` (conversion_mapping's "phimoe" entry) gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from phi3edge.streaming_export import LAYOUTS, Checkpoint

    folder = _tiny_phimoe(tmp_path / "moe", layout)
    checkpoint = Checkpoint(folder)
    hub_keys = any(".block_sparse_moe.experts.0.w1." in key for key in checkpoint._where)
    assert hub_keys == (layout == "hub")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    for name, expected in reference.state_dict().items():
        sources = LAYOUTS["PhimoeForCausalLM"](name, reference.config)
        source = next(s for s in sources if all(k in checkpoint for k in s.keys))
        got = source.assemble(checkpoint.read) if source.assemble else checkpoint.read(*source.keys)
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_a_phimoe_builder_subclass_streams_byte_identical(tmp_path: Path, layout: str) -> None:
    """The same machinery under our Phi-3.5-MoE builder subclass, which quantizes its experts
    itself (QMoE) during make_layer: streamed or not, the same bytes."""
    from phi3edge import phimoe_builder
    from phi3edge.streaming_export import streaming

    builder = export.load_builder()
    folder = str(_tiny_phimoe(tmp_path / "moe", layout))
    options = ["moe_quant_type=int4", "qmoe_block_size=32", *export.Int4Options().builder_options()]
    phimoe_builder.create_model(
        builder, folder, str(tmp_path / "stock"), "int4", str(tmp_path / "c1"), options
    )
    with streaming(builder, tmp_path / "scratch") as stats:
        phimoe_builder.create_model(
            builder, folder, str(tmp_path / "ours"), "int4", str(tmp_path / "c2"), options
        )
    _assert_same_files(tmp_path / "stock", tmp_path / "ours")
    assert stats.streamed and stats.leaked_tensors == 0
    assert stats.quantized == 5  # qkv and o of both layers, lm_head; experts and router are not


def test_a_checkpoint_of_no_published_shape_exports_with_a_warning(
    model_factory: Callable, tmp_path: Path
) -> None:
    """A scaled-down Phi3ForCausalLM that does not name its member (as a pruned model would)."""
    checkpoint = tmp_path / "custom"
    shutil.copytree(model_factory("phi-3-mini-4k"), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["phi3edge_catalog_id"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    said: list[str] = []
    out = export.export(checkpoint, tmp_path / "out", precision="fp32", progress=said.append)
    warning = next(line for line in said if line.startswith("warning:"))
    assert "nearest member, phi-3-mini-4k" in warning and "hidden_size" in warning
    assert export.Manifest.read(out).catalog_id == "phi-3-mini-4k"


def test_moe_experts_option_is_for_phi_3_5_moe_only(
    cli_error: Callable[..., str], tmp_path: Path, model_factory
) -> None:
    checkpoint = str(model_factory("phi-3-mini-4k"))
    err = cli_error("export", checkpoint, str(tmp_path / "o"), "--moe-experts", "int8")
    assert "--moe-experts applies to Phi-3.5-MoE only" in err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_without_a_chat_template_is_refused_before_export(
    cli_error: Callable[..., str], tmp_path: Path, model_factory
) -> None:
    checkpoint = tmp_path / "no-template"
    shutil.copytree(model_factory("phi-3-mini-4k"), checkpoint)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    err = cli_error("export", str(checkpoint), str(tmp_path / "o"))
    assert "has no chat template" in err
