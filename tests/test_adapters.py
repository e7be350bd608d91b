"""LoRA adapters served by name, against transformers + PEFT on the same random weights.

A tiny random Phi-3-mini and two random PEFT LoRA adapters written by PEFT itself, of different
ranks and target modules ("terse": rank 4 on qkv_proj + o_proj; "pirate": rank 8 rsLoRA on
qkv_proj + gate_up_proj + down_proj, whose fused gate_up_proj the builder splits in two). The fp32
export takes one adapter at export (``--adapter``) and the other later (``adapter add``); the INT4
one gets both with ``adapter add`` on an existing export.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from parity_tools import cosines  # noqa: E402

from phi3edge import adapters, engine, fixtures, lora_graph, runtime  # noqa: E402
from phi3edge.cli import main  # noqa: E402
from phi3edge.errors import ApiError  # noqa: E402

BASE_NAME = "Phi-3-mini-4k-instruct"
SPECS: dict[str, dict[str, Any]] = {
    "terse": {"targets": ("qkv_proj", "o_proj"), "rank": 4, "alpha": 8.0, "seed": 1},
    "pirate": {
        "targets": ("qkv_proj", "gate_up_proj", "down_proj"),
        "rank": 8,
        "alpha": 16.0,
        "seed": 2,
        "use_rslora": True,
    },
}
HELLO = [{"role": "user", "content": "Tell me a story about a fox."}]


@pytest.fixture(scope="module")
def base(model_factory: Callable[..., Path]) -> Path:
    return model_factory("phi-3-mini-4k")


@pytest.fixture(scope="module")
def peft_dirs(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {
        name: fixtures.write_random_lora(base, root / name, **spec) for name, spec in SPECS.items()
    }


@pytest.fixture(scope="module")
def fp32_dir(
    base: Path, peft_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "model"
    terse = f"terse={peft_dirs['terse']}"
    assert main(["export", str(base), str(out), "--precision", "fp32", "--adapter", terse]) == 0
    assert main(["adapter", "add", str(out), "pirate", str(peft_dirs["pirate"])]) == 0
    return out


@pytest.fixture(scope="module")
def int4_dir(
    tiny_int4: Path, peft_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("int4") / "model"
    shutil.copytree(tiny_int4, out)
    for name, folder in peft_dirs.items():
        adapters.add(out, name, folder)
    return out


def _reference_model(base: Path, peft_dir: Path | None) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, peft_dir)
    return model.eval()


@pytest.fixture(scope="module")
def references(base: Path, peft_dirs: dict[str, Path]) -> dict[str | None, Any]:
    """transformers (+ PEFT) models: the base (None) and each adapter."""
    out: dict[str | None, Any] = {None: _reference_model(base, None)}
    out.update({name: _reference_model(base, folder) for name, folder in peft_dirs.items()})
    return out


def _reference_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()[0]


def _run_generators_together(
    model: runtime.LoadedModel, ids: np.ndarray, prompt: int
) -> dict[str | None, np.ndarray]:
    """Base and both adapters as three live generators of one loaded model, advanced in turn:
    the prompt in one append, then the rest one token at a time (through the KV cache). Returns
    each one's logits at positions prompt-1 ... len-1."""
    names: list[str | None] = [None, *model.adapter_names]
    generators = {n: engine._new_generator(model, ids.shape[1] + 4, 1, n) for n in names}
    logits: dict[str | None, list[np.ndarray]] = {n: [] for n in names}
    for generator in generators.values():
        generator.append_tokens(ids[:, :prompt].astype(np.int32))
    for name, generator in generators.items():
        logits[name].append(generator.get_logits()[0, -1].copy())
    for position in range(prompt, ids.shape[1]):
        for name, generator in generators.items():
            generator.append_tokens(ids[:, position : position + 1].astype(np.int32))
            logits[name].append(generator.get_logits()[0, -1].copy())
    return {n: np.stack(v) for n, v in logits.items()}


IDS = np.random.default_rng(7).integers(0, 32000, size=(1, 40))
PROMPT = 28


def test_fp32_logits_of_each_adapter_match_transformers_with_peft(
    fp32_dir: Path, references: dict[str | None, Any]
) -> None:
    model = runtime.load(fp32_dir, threads=1)
    assert set(model.adapter_names) == set(SPECS)
    ours = _run_generators_together(model, IDS, PROMPT)
    base_reference = _reference_logits(references[None], IDS)[PROMPT - 1 :]
    for name, logits in ours.items():
        reference = _reference_logits(references[name], IDS)[PROMPT - 1 :]
        diff = np.abs(logits - reference).max()
        print(f"fp32 {name or 'base'}: max abs diff {diff:.2e} over {len(reference)} positions")
        assert diff <= 1e-4
        if name is not None:  # the adapter really changes the model, so the check can fail
            assert np.abs(reference - base_reference).max() > 0.1


def test_int4_logits_of_each_adapter_close_to_transformers_with_peft(
    int4_dir: Path, references: dict[str | None, Any]
) -> None:
    model = runtime.load(int4_dir, threads=1)
    ours = _run_generators_together(model, IDS, PROMPT)
    for name, logits in ours.items():
        reference = _reference_logits(references[name], IDS)[PROMPT - 1 :]
        cosine = cosines(logits, reference)
        print(f"int4 {name or 'base'}: cosine min {cosine.min():.4f} mean {cosine.mean():.4f}")
        # per position, INT4 noise alone (the base's too) reaches 0.978 on this random model
        assert cosine.mean() >= 0.98 and cosine.min() >= 0.97


def test_int4_lora_matmuls_stay_float_and_base_weights_untouched(
    int4_dir: Path, tiny_int4: Path
) -> None:
    graph = lora_graph.load(int4_dir / "model.onnx")
    lora_nodes = [n for n in graph.graph.node if "/lora_" in n.name]
    assert lora_nodes and {n.op_type for n in lora_nodes} == {"MatMul"}
    inputs = {i.name for i in graph.graph.input}
    assert all(n.input[1] in inputs for n in lora_nodes)  # weights come from the adapter
    before = lora_graph.load(tiny_int4 / "model.onnx")
    quantized = [n.name for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert quantized == [n.name for n in before.graph.node if n.op_type == "MatMulNBits"]
    data = (int4_dir / "model.onnx.data").read_bytes()
    assert data == (tiny_int4 / "model.onnx.data").read_bytes()


def test_manifest_records_each_adapter(fp32_dir: Path, peft_dirs: dict[str, Path], capsys) -> None:
    assert main(["info", str(fp32_dir)]) == 0
    recorded = json.loads(capsys.readouterr().out)["adapters"]
    assert set(recorded) == {"terse", "pirate"}
    for name, spec in SPECS.items():
        entry = recorded[name]
        assert entry["rank"] == spec["rank"]
        assert entry["targets"] == list(spec["targets"])
        assert Path(entry["base"]).name == "phi-3-mini-4k"
        assert (fp32_dir / entry["file"]).is_file()
    assert recorded["pirate"]["use_rslora"] is True


# ----------------------------------------------------------------------------- serving by name


def _eos_ids(model_dir: Path) -> set[int]:
    eos = json.loads((model_dir / "genai_config.json").read_text())["model"]["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


@pytest.fixture(scope="module")
def greedy(base: Path, fp32_dir: Path, references: dict[str | None, Any]) -> dict[str | None, str]:
    """What transformers (+ PEFT) answers to HELLO, greedy, ``MAX_TOKENS`` tokens at most, for
    the base (None) and each adapter; the prompt from the checkpoint's own tokenizer and chat
    template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eos = _eos_ids(fp32_dir)
    out = {}
    for name, model in references.items():
        tokens = list(ids)
        for _ in range(MAX_TOKENS):
            with torch.no_grad():
                token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
        out[name] = tokenizer.decode(tokens[len(ids) :])
    assert len(set(out.values())) == len(out), "the adapters must answer differently"
    return out


MAX_TOKENS = 10
# the same messages every time, so a KV cache kept from another adapter would be a full match
ORDER: list[str | None] = [None, "terse", "pirate", "terse", None, "pirate", "PIRATE"]


@pytest.fixture(scope="module")
def client(fp32_dir: Path) -> Iterator[Any]:
    from phi3edge.client import ChatCompletionsClient

    with ChatCompletionsClient(fp32_dir, threads=1) as client:
        yield client


def test_client_switches_adapters_between_requests(
    client: Any, greedy: dict[str | None, str]
) -> None:
    for name in ORDER:
        kwargs = {"model": name} if name else {}
        response = client.complete(messages=HELLO, temperature=0, max_tokens=MAX_TOKENS, **kwargs)
        expected = greedy[name.lower() if name else None]
        assert response.choices[0].message.content == expected, name
        assert response.model == (name.lower() if name else BASE_NAME)
    stream = client.complete(
        messages=HELLO, temperature=0, max_tokens=MAX_TOKENS, model="terse", stream=True
    )
    updates = list(stream)
    assert (
        "".join(u.choices[0].delta.content or "" for u in updates if u.choices) == greedy["terse"]
    )
    assert {u.model for u in updates} == {"terse"}


def test_complete_batch_groups_requests_by_adapter(
    client: Any, greedy: dict[str | None, str]
) -> None:
    names: list[str | None] = ["terse", None, "pirate", "terse", None]
    stats = client._service.core.stats
    before = stats.batches
    results = client.complete_batch(
        [
            {
                "messages": HELLO,
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
                **({"model": n} if n else {}),
            }
            for n in names
        ]
    )
    assert [r.choices[0].message.content for r in results] == [greedy[n] for n in names]
    assert stats.batches - before == 3  # terse x2, base x2, pirate: one generator per adapter


def test_a_batch_file_selects_adapters_by_model(
    fp32_dir: Path, greedy: dict[str | None, str], tmp_path: Path
) -> None:
    """Batch API lines whose body's model names an adapter run it (one file mixes them); the
    others, naming the file's one cloud deployment or nothing, run the base."""
    from phi3edge import batch

    names = ["gpt-4o-mini", "terse", None, "PIRATE", "terse"]
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": HELLO,
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
                **({"model": name} if name else {}),
            },
        }
        for i, name in enumerate(names)
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    bodies = {o["custom_id"]: o["response"]["body"] for o in batch.run(fp32_dir, path, threads=1)}
    for i, name in enumerate(names):
        adapter = name.lower() if name in ("terse", "PIRATE") else None
        assert bodies[f"r{i}"]["choices"][0]["message"]["content"] == greedy[adapter], name
        assert bodies[f"r{i}"]["model"] == (adapter or BASE_NAME)
    lines[2]["body"]["model"] = "gpt-4o"  # a second deployment: refused, adapters or not
    with pytest.raises(batch.BatchInputError, match="gpt-4o"):
        batch.run(fp32_dir, lines)


def test_structured_output_under_an_adapter(client: Any) -> None:
    """The grammar mask and the adapter apply together (the mask is per request, not per model)."""
    regex = "(yes|no), [0-9]{3}"
    for name in ("pirate", None):
        kwargs = {"model": name} if name else {}
        response = client.complete(
            messages=HELLO, temperature=1.0, seed=3, model_extras={"guided_regex": regex}, **kwargs
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop" and re.fullmatch(regex, choice.message.content)


def test_unknown_model_is_still_404(client: Any) -> None:
    with pytest.raises(ApiError) as info:
        client.complete(messages=HELLO, model="no-such-adapter")
    assert info.value.status == 404 and info.value.param == "model"
    assert "terse" in info.value.message and "pirate" in info.value.message


def test_engine_process_serves_adapters(fp32_dir: Path, greedy: dict[str | None, str]) -> None:
    from phi3edge.client import ChatCompletionsClient

    with ChatCompletionsClient(fp32_dir, threads=1, engine_process=True) as client:
        for name in ("pirate", None):
            kwargs = {"model": name} if name else {}
            response = client.complete(
                messages=HELLO, temperature=0, max_tokens=MAX_TOKENS, **kwargs
            )
            assert response.choices[0].message.content == greedy[name]


@pytest.fixture(scope="module")
def live_url(fp32_dir: Path) -> Iterator[str]:
    from phi3edge.server import ServerSettings, create_app, running
    from phi3edge.service import ChatService

    service = ChatService(fp32_dir, threads=1)
    with running(create_app(service, ServerSettings(api_key="k"))) as url:
        yield url
    service.close()


@pytest.mark.parametrize("route", ["/v1", ""], ids=["openai-route", "azure-route"])
def test_openai_client_selects_adapters_by_model(
    live_url: str, route: str, greedy: dict[str | None, str]
) -> None:
    import openai

    with openai.OpenAI(base_url=live_url + route, api_key="k", max_retries=0, timeout=60) as oa:
        for name in ORDER:
            response = oa.chat.completions.create(
                model=name or BASE_NAME, messages=HELLO, temperature=0, max_tokens=MAX_TOKENS
            )
            assert response.choices[0].message.content == greedy[name.lower() if name else None]
            assert response.model == (name.lower() if name else BASE_NAME)
        chunks = list(
            oa.chat.completions.create(
                model="pirate", messages=HELLO, temperature=0, max_tokens=MAX_TOKENS, stream=True
            )
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            == greedy["pirate"]
        )
        assert {c.model for c in chunks} == {"pirate"}
        with pytest.raises(openai.NotFoundError) as info:
            oa.chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
        assert info.value.code == "model_not_found"


def test_models_list_and_info(live_url: str) -> None:
    import openai
    from azure.ai.inference import ChatCompletionsClient
    from azure.core.credentials import AzureKeyCredential

    with openai.OpenAI(base_url=live_url + "/v1", api_key="k", max_retries=0) as oa:
        listed = {m.id: m for m in oa.models.list().data}
    assert set(listed) == {BASE_NAME, "terse", "pirate"}
    assert listed["terse"].model_extra["parent"] == BASE_NAME
    with ChatCompletionsClient(endpoint=live_url, credential=AzureKeyCredential("k")) as azure:
        assert azure.get_model_info().model_name == BASE_NAME  # /info describes the base


def test_azure_sdk_selects_an_adapter(live_url: str, greedy: dict[str | None, str]) -> None:
    from azure.ai.inference import ChatCompletionsClient
    from azure.ai.inference.models import UserMessage
    from azure.core.credentials import AzureKeyCredential

    with ChatCompletionsClient(endpoint=live_url, credential=AzureKeyCredential("k")) as azure:
        response = azure.complete(
            messages=[UserMessage(HELLO[0]["content"])], model="terse", temperature=0,
            max_tokens=MAX_TOKENS,
        )  # fmt: skip
    assert response.choices[0].message.content == greedy["terse"]
    assert response.model == "terse"


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def unchanged(fp32_dir: Path) -> Iterator[None]:
    """The model folder is exactly as before the failed command."""
    before = {
        p.name: p.read_bytes()
        for p in fp32_dir.rglob("*")
        if p.is_file() and p.stat().st_size < 1e6
    }
    yield
    after = {
        p.name: p.read_bytes()
        for p in fp32_dir.rglob("*")
        if p.is_file() and p.stat().st_size < 1e6
    }
    assert after == before


def _add_fails(fp32_dir: Path, name: str, folder: Path, capsys: Any) -> str:
    capsys.readouterr()
    assert main(["adapter", "add", str(fp32_dir), name, str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_adapter_for_another_base_is_refused(
    fp32_dir: Path,
    base: Path,
    model_factory: Callable[..., Path],
    tmp_path: Path,
    unchanged: None,
    capsys: Any,
) -> None:
    medium = fixtures.write_random_lora(model_factory("phi-3-medium-4k"), tmp_path / "medium")
    err = _add_fails(fp32_dir, "medium", medium, capsys)
    assert "does not fit this model" in err and "phi-3-medium-4k" in err
    # at export, before the export starts
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["export", str(base), str(out), "--adapter", f"medium={medium}"])
    assert code == 2 and "does not fit this model" in capsys.readouterr().err
    assert not out.exists()


def test_missing_files_are_named(
    fp32_dir: Path, peft_dirs: dict[str, Path], tmp_path: Path, unchanged: None, capsys: Any
) -> None:
    assert "does not exist" in _add_fails(fp32_dir, "x", tmp_path / "nowhere", capsys)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(peft_dirs["terse"] / adapters.CONFIG, no_weights)
    assert "adapter_model.safetensors" in _add_fails(fp32_dir, "x", no_weights, capsys)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(peft_dirs["terse"] / "adapter_model.safetensors", no_config)
    assert "adapter_config.json" in _add_fails(fp32_dir, "x", no_config, capsys)
    truncated = tmp_path / "truncated"
    shutil.copytree(peft_dirs["terse"], truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "cannot read" in _add_fails(fp32_dir, "x", truncated, capsys)
    assert "not a phi3edge model folder" in _add_fails(tmp_path, "x", peft_dirs["terse"], capsys)


@pytest.mark.parametrize(
    "name, words",
    [
        ("terse", "already has an adapter named 'terse'"),
        ("TERSE", "already has an adapter named"),
        ("Phi-3-mini-4k-instruct", "is a name of the base model"),
        ("phi3edge", "is a name of the base model"),
        ("a/b", "must be 1-64 letters"),
        ("", "must be 1-64 letters"),
    ],
)
def test_name_clashes_are_refused(
    fp32_dir: Path,
    peft_dirs: dict[str, Path],
    name: str,
    words: str,
    unchanged: None,
    capsys: Any,
) -> None:
    assert words in _add_fails(fp32_dir, name, peft_dirs["pirate"], capsys)


def test_export_refuses_two_adapters_of_one_name(
    base: Path, peft_dirs: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "out"
    flags = ["--adapter", f"a={peft_dirs['terse']}", "--adapter", f"A={peft_dirs['pirate']}"]
    assert main(["export", str(base), str(out), *flags]) == 2
    assert "already has an adapter named 'A'" in capsys.readouterr().err
    assert main(["export", str(base), str(out), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PEFT_DIR" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "trained biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
    ],
)
def test_adapters_this_runtime_cannot_apply_are_refused(
    fp32_dir: Path,
    peft_dirs: dict[str, Path],
    tmp_path: Path,
    change: dict[str, Any],
    words: str,
    unchanged: None,
    capsys: Any,
) -> None:
    folder = tmp_path / "changed"
    shutil.copytree(peft_dirs["terse"], folder)
    config = json.loads((folder / adapters.CONFIG).read_text())
    (folder / adapters.CONFIG).write_text(json.dumps({**config, **change}))
    assert words in _add_fails(fp32_dir, "x", folder, capsys)


def test_lora_on_other_modules_is_refused(
    fp32_dir: Path, base: Path, tmp_path: Path, unchanged: None, capsys: Any
) -> None:
    folder = fixtures.write_random_lora(base, tmp_path / "head", targets=("lm_head",))
    err = _add_fails(fp32_dir, "x", folder, capsys)
    assert "lm_head" in err and "qkv_proj, o_proj, gate_up_proj, down_proj" in err


def test_grouped_query_attention_member_takes_adapters(
    model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """Phi-3-medium (40 query / 10 kv heads, scaled down): qkv_proj's B rows split unevenly."""
    checkpoint = model_factory("phi-3-medium-4k")
    lora = fixtures.write_random_lora(
        checkpoint, tmp_path / "lora", targets=("qkv_proj", "down_proj"), rank=6, seed=3
    )
    out = tmp_path / "model"
    shutil.copytree(model_factory("phi-3-medium-4k", "fp32"), out)
    adapters.add(out, "medium-tune", lora)
    model = runtime.load(out, threads=1)
    ours = _run_generators_together(model, IDS, PROMPT)
    for name, folder in ((None, None), ("medium-tune", lora)):
        reference = _reference_logits(_reference_model(checkpoint, folder), IDS)[PROMPT - 1 :]
        diff = np.abs(ours[name] - reference).max()
        print(f"phi-3-medium-4k fp32 {name or 'base'}: max abs diff {diff:.2e}")
        assert diff <= 1e-4


def test_remove_then_add_again_and_a_missing_file(
    int4_dir: Path, peft_dirs: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(int4_dir, folder)
    assert main(["adapter", "remove", str(folder), "TERSE"]) == 0
    manifest = json.loads((folder / "phi3edge.json").read_text())
    assert set(manifest["adapters"]) == {"pirate"}
    assert not (folder / "adapters" / "terse.onnx_adapter").exists()
    assert runtime.load(folder, threads=1).adapter_names == ("pirate",)
    capsys.readouterr()
    assert main(["adapter", "remove", str(folder), "terse"]) == 2
    assert "no adapter named 'terse' (its adapters: pirate)" in capsys.readouterr().err
    assert main(["adapter", "add", str(folder), "terse", str(peft_dirs["terse"])]) == 0
    (folder / "adapters" / "pirate.onnx_adapter").unlink()
    with pytest.raises(adapters.ExportError, match="pirate.onnx_adapter is missing"):
        runtime.load(folder, threads=1)
