"""Export: manifest, bad inputs as one-line errors, nothing half-written, genai loads the result."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from phi3edge import export
from phi3edge.cli import main


def test_manifest_records_the_export(tiny_int4: Path, model_factory: Callable) -> None:
    manifest = export.Manifest.read(tiny_int4)
    assert manifest.catalog_id == "phi-3-mini-4k"
    assert manifest.precision == "int4"
    assert manifest.int4 == {
        "block_size": 32,
        "accuracy_level": 4,
        "lm_head": "int4",
        "embeddings": "fp32",
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


def _cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert not any(line.startswith(("Traceback", "  File")) for line in err)
    return err[-1]


def test_missing_folder(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = _cli_error(capsys, "export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert "no such folder" in err


def test_not_a_phi3_checkpoint(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert "not a Phi-3" in _cli_error(capsys, "export", str(src), str(tmp_path / "out"))


def test_phi_3_small_without_a_tokenizer_is_refused_before_export(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """Neither cl100k_base.tiktoken (as published) nor tokenizer.json: say so up front."""
    from phi3edge import catalog

    src = tmp_path / "small"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(catalog.get("phi-3-small-8k").published_config()))
    err = _cli_error(capsys, "export", str(src), str(tmp_path / "out"))
    assert "no tokenizer" in err and "cl100k_base.tiktoken" in err and "tokenizer.json" in err
    assert not (tmp_path / "out").exists()


def test_phi_3_small_with_a_malformed_tiktoken_file_is_refused_before_export(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    from phi3edge import catalog

    src = tmp_path / "small"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(catalog.get("phi-3-small-8k").published_config()))
    (src / "cl100k_base.tiktoken").write_text("IQ== 0\nIg== 1\n")  # 2 ranks, 254 bytes missing
    err = _cli_error(capsys, "export", str(src), str(tmp_path / "out"))
    assert "cl100k_base.tiktoken: 254 single bytes have no rank" in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output(capsys: pytest.CaptureFixture, tmp_path: Path, model_factory) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    err = _cli_error(capsys, "export", str(model_factory("phi-3-mini-4k")), str(out))
    assert "not an empty folder" in err
    assert (out / "keep").read_text() == "x"


def test_hub_unreachable(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _cli_error(capsys, "export", "microsoft/Phi-3-mini-4k-instruct", str(tmp_path / "o"))
    assert "cannot download microsoft/Phi-3-mini-4k-instruct" in err


def test_bad_block_size(capsys, tmp_path: Path, model_factory) -> None:
    src = str(model_factory("phi-3-mini-4k"))
    assert "block size" in _cli_error(
        capsys, "export", src, str(tmp_path / "o"), "--block-size", "7"
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--accuracy-level", "7", "accuracy level"), ("--block-size", "48", "block size")],
)
def test_bad_int4_options(capsys, tmp_path: Path, model_factory, flag, value, message) -> None:
    src = str(model_factory("phi-3-mini-4k"))
    assert message in _cli_error(capsys, "export", src, str(tmp_path / "o"), flag, value)


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


def test_low_memory_export_is_byte_identical_to_the_stock_builder(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    """Our spill-before-quantize path must not change a single byte of the model."""
    import filecmp

    builder = export.load_builder()
    checkpoint = str(model_factory("phi-3-mini-4k"))
    stock = tmp_path / "stock"
    extra = builder.parse_extra_options(
        None, checkpoint, str(stock), "int4", "cpu", str(tmp_path / "c"), ["block_size=32"]
    )
    builder.create_model(None, checkpoint, str(stock), "int4", "cpu", str(tmp_path / "c"), **extra)
    ours = export.export(checkpoint, tmp_path / "ours", progress=lambda _: None)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert filecmp.cmp(stock / name, ours / name, shallow=False), name


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


def test_moe_experts_option_is_for_phi_3_5_moe_only(capsys, tmp_path: Path, model_factory) -> None:
    checkpoint = str(model_factory("phi-3-mini-4k"))
    err = _cli_error(capsys, "export", checkpoint, str(tmp_path / "o"), "--moe-experts", "int8")
    assert "--moe-experts applies to Phi-3.5-MoE only" in err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_without_a_chat_template_is_refused_before_export(
    capsys, tmp_path: Path, model_factory
) -> None:
    checkpoint = tmp_path / "no-template"
    shutil.copytree(model_factory("phi-3-mini-4k"), checkpoint)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    err = _cli_error(capsys, "export", str(checkpoint), str(tmp_path / "o"))
    assert "has no chat template" in err
