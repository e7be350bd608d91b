"""Models whose config.json names a sliding window (Phi-3-mini-4k, Phi-3-medium-4k: 2047 of 4096).

transformers' Phi3 attends to the last ``sliding_window`` positions at every layer; the export
must do the same, and the runtime must decode past the window (onnxruntime-genai 0.18 sized a
shared KV cache to the window when genai_config.json had a "sliding_window" section, so a
conversation longer than 2063 tokens failed). A tiny checkpoint with a 16-token window shows
both within a few dozen tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from parity_tools import onnx_logits  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from phi3edge import engine, export, fixtures, runtime  # noqa: E402
from phi3edge.benchmark import NO_END  # noqa: E402
from phi3edge.prompt import Prompt  # noqa: E402
from phi3edge.schema import SamplingConfig  # noqa: E402

WINDOW = 16
GREEDY = SamplingConfig(temperature=0.0, logit_bias=NO_END, logprobs=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("windowed")
    return fixtures.write_random_checkpoint(
        "phi-3-mini-4k", root / "checkpoint", size="tiny", overrides={"sliding_window": WINDOW}
    )


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> Path:
    return export.export(checkpoint, checkpoint.with_name("fp32"), precision="fp32")


def _reference_logits(checkpoint: Path, ids: np.ndarray, window: int | None) -> np.ndarray:
    """transformers' logits at every position, with the checkpoint's window or ``window``."""
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, sliding_window=window
    ).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()[0]


def test_the_export_attends_to_the_window_as_transformers_does(
    checkpoint: Path, exported: Path
) -> None:
    ids = np.random.default_rng(3).integers(0, 32000, size=(1, 4 * WINDOW))
    reference = _reference_logits(checkpoint, ids, WINDOW)
    full_attention = _reference_logits(checkpoint, ids, None)
    # the window matters from its end on, so this prompt tells windowed from full attention
    assert np.abs(full_attention - reference)[:WINDOW].max() < 1e-4
    assert np.abs(full_attention - reference)[WINDOW:].max(axis=-1).min() > 1e-2
    ours = onnx_logits(checkpoint, exported, ids)[0]
    assert np.abs(ours - reference).max() <= 1e-3
    decoder = json.loads((exported / "genai_config.json").read_text())["model"]["decoder"]
    assert "sliding_window" not in decoder


def _greedy(model: runtime.LoadedModel, ids: list[int], speculative: bool) -> list[Any]:
    """(token id, logprob) of a greedy answer of 3 x WINDOW tokens, through the engine."""
    cache = engine.PrefixCache(1)
    out = []
    for steps in engine.generate(
        model, Prompt(ids, 3 * WINDOW), GREEDY, cache=cache, speculative=speculative
    ):
        out += [(t.token_id, t.logprob) for step in steps for t in step.tokens]
    return out


def _prompt() -> list[int]:
    """Longer than a prefill chunk (two appends), with a repeat that speculation drafts from."""
    passage = [int(t) for t in np.random.default_rng(4).integers(100, 30000, size=60)]
    return passage + passage[:30]


@pytest.mark.parametrize("speculative", [False, True])
def test_the_engine_decodes_past_the_window_as_transformers_does(
    checkpoint: Path, exported: Path, speculative: bool
) -> None:
    model = runtime.load(exported, threads=1)
    assert model.shared_kv_limit is None
    ids = _prompt()
    answer = _greedy(model, ids, speculative)
    assert len(answer) == 3 * WINDOW
    tokens = [t for t, _ in answer]
    logits = _reference_logits(checkpoint, np.array([ids + tokens]), WINDOW)[len(ids) - 1 : -1]
    logits[:, list(NO_END)] += list(NO_END.values())
    logprobs = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
    chosen = logprobs[np.arange(len(tokens)), tokens]
    np.testing.assert_allclose([lp for _, lp in answer], chosen, atol=1e-3)
    assert (chosen >= logprobs.max(axis=-1) - 1e-4).all()  # each is transformers' greedy pick


def test_an_export_with_the_old_window_section_decodes_past_it(
    exported: Path, tmp_path: Path
) -> None:
    """Exports made before the fix keep their genai_config.json: past its window the engine
    gives the generator a growing KV cache instead of the buffer onnxruntime-genai sizes to the
    window, and answers as the new export does."""
    old = tmp_path / "old-export"
    shutil.copytree(exported, old)
    config = json.loads((old / "genai_config.json").read_text())
    config["model"]["decoder"]["sliding_window"] = {  # what the builder wrote until now
        "window_size": WINDOW,
        "slide_key_value_cache": False,
        "slide_inputs": False,
        "layers": [],
        "cache_slack": 0,
    }
    (old / "genai_config.json").write_text(json.dumps(config))
    model = runtime.load(old, threads=1)
    assert model.shared_kv_limit == WINDOW
    expected = _greedy(runtime.load(exported, threads=1), _prompt(), False)
    answer = _greedy(model, _prompt(), False)
    assert [t for t, _ in answer] == [t for t, _ in expected]
    np.testing.assert_allclose([lp for _, lp in answer], [lp for _, lp in expected], atol=1e-5)
