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


def test_tiny_moe_keeps_experts_routing_and_the_known_rope_factors() -> None:
    member = catalog.get("phi-3.5-moe")
    published = member.published_config()
    tiny = fixtures.checkpoint_config("phi-3.5-moe", "tiny")
    for key in ("num_local_experts", "num_experts_per_tok", "router_jitter_noise", "lm_head_bias"):
        assert tiny[key] == published[key]
    assert tiny["hidden_size"] // tiny["num_attention_heads"] == member.head_dim
    rope = tiny["rope_scaling"]
    known = catalog.load_data_json("rope-scaling-fragments.partial.json")["phi-3.5-moe-instruct"]
    assert len(rope["long_factor"]) == len(rope["short_factor"]) == member.head_dim // 2
    assert rope["long_factor"][:36] == known["long_factor_first_36"]
    assert rope["original_max_position_embeddings"] == tiny["original_max_position_embeddings"]


def test_layers_override_and_its_bounds(tmp_path: Path) -> None:
    path = fixtures.write_random_checkpoint("phi-3-mini-4k", tmp_path / "one", layers=1)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(ValueError, match="at least 1"):
        fixtures.write_random_checkpoint("phi-3-mini-4k", tmp_path / "zero", layers=0)


def test_unbuildable_members_say_why() -> None:
    with pytest.raises(ValueError, match="rope lists incomplete"):
        fixtures.checkpoint_config("phi-3-medium-128k")
    assert set(fixtures.buildable_members()) == {m.id for m in catalog.CATALOG} - {
        "phi-3-medium-128k"
    }


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
