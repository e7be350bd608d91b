"""The README's main job (`phi3edge demo`) and the other commands, run as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3edge.cli import build_parser, main


def test_demo_builds_exports_and_answers(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PHI3EDGE_CACHE", str(tmp_path))
    assert main(["demo", "--max-tokens", "5"]) == 0
    captured = capsys.readouterr()
    response = json.loads(captured.out)
    assert response["object"] == "chat.completion"
    assert response["usage"]["completion_tokens"] <= 5
    assert "random weights" in captured.err
    assert (tmp_path / "demo" / "tiny-phi-3-mini-4k-random-int4" / "phi3edge.json").exists()


def test_bench_and_info_on_an_export(tiny_int4: Path, capsys) -> None:
    assert (
        main(
            [
                "bench",
                str(tiny_int4),
                "--prompt-tokens",
                "32",
                "--new-tokens",
                "4",
                "--repeats",
                "1",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    figures = json.loads(capsys.readouterr().out)
    assert figures["threads"] == 1 and figures["decode_tokens_per_s"] > 0
    assert main(["info", str(tiny_int4)]) == 0
    assert json.loads(capsys.readouterr().out)["catalog_id"] == "phi-3-mini-4k"


def test_random_checkpoint_command(tmp_path: Path, capsys) -> None:
    assert main(["random-checkpoint", "phi-3.5-mini", str(tmp_path / "ck")]) == 0
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["rope_scaling"]["type"] == "longrope"
    assert main(["random-checkpoint", "phi-3-medium-128k", str(tmp_path / "m")]) == 2
    assert "rope lists incomplete" in capsys.readouterr().err


def test_info_on_a_folder_that_is_not_an_export(tmp_path: Path, capsys) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert "not a phi3edge model folder" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--max-queue", "0"], "max_queue must be >= 1"),
        (["--max-n", "17"], "max_n must be <= 16"),
        (["--batch-prefill-tokens", "0"], "batch_prefill_tokens must be >= 1"),
        (["--batch-padding", "-1"], "batch_padding_pct must be >= 0"),
        (["--time-budget", "-1"], "time_budget_s must be > 0"),
        (["--allowed-host", ""], "allowed"),
    ],
)
def test_serve_refuses_nonsense_limits_before_loading(
    tmp_path: Path, capsys, flags: list[str], words: str
) -> None:
    assert main(["serve", str(tmp_path / "no-model"), *flags]) == 2
    assert words in capsys.readouterr().err


def test_only_limits_that_may_be_unset_take_none(capsys) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "m", "--batch-padding", "none", "--max-prompt-tokens", "none"]
    )
    assert (args.batch_padding_pct, args.max_prompt_tokens) == (None, None)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["serve", "m", "--max-queue", "none"])
    assert info.value.code == 2
    assert "invalid int value: 'none'" in capsys.readouterr().err
