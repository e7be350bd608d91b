"""Random-weight checkpoints: real structure, Phi-3's special tokens, loadable by transformers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from phi3edge import catalog, fixtures


def test_full_configs_are_the_published_ones() -> None:
    for member_id in fixtures.buildable_members():
        published = catalog.get(member_id).published_config()
        built = fixtures.checkpoint_config(member_id, "full")
        for key, value in published.items():
            if key != "auto_map":
                assert built[key] == value, (member_id, key)


@pytest.mark.parametrize("member_id", ["phi-3-mini-128k", "phi-3.5-mini", "phi-3-medium-4k"])
def test_tiny_keeps_structure(member_id: str) -> None:
    member = catalog.get(member_id)
    tiny = fixtures.checkpoint_config(member_id, "tiny")
    assert tiny["hidden_size"] // tiny["num_attention_heads"] == member.head_dim
    assert (
        tiny["num_attention_heads"] // tiny["num_key_value_heads"]
        == member.num_heads // member.num_kv_heads
    )
    assert tiny["max_position_embeddings"] // tiny["original_max_position_embeddings"] == (
        member.context_length // member.original_context_length
    )
    assert tiny.get("rope_scaling") == member.published_config().get("rope_scaling")


def test_unbuildable_members_say_why() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        fixtures.checkpoint_config("phi-3.5-moe")
    # Phi-3-small is buildable since phi3edge.phi3_small (tests/test_phi3_small_export.py)
    assert {"phi-3-small-8k", "phi-3-small-128k"} <= set(fixtures.buildable_members())


def test_special_tokens_sit_at_their_real_ids(model_factory: Callable[..., Path]) -> None:
    from tokenizers import Tokenizer

    checkpoint = model_factory("phi-3-mini-4k")
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    published = json.loads((checkpoint / "tokenizer_config.json").read_text())
    for token_id, spec in published["added_tokens_decoder"].items():
        assert tokenizer.token_to_id(spec["content"]) == int(token_id)
    assert tokenizer.get_vocab_size() == 32011
    assert "<|user|>" in published["chat_template"]


def test_checkpoint_loads_in_transformers(model_factory: Callable[..., Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = model_factory("phi-3-mini-4k")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(model).__name__ == "Phi3ForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_output_folder_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        fixtures.write_random_checkpoint("phi-3-mini-4k", tmp_path)
    assert (tmp_path / "x").read_text() == "keep me"
