"""The catalog against the published configs it was copied from."""

from __future__ import annotations

import pytest

from phi3edge import catalog
from phi3edge.cli import main


@pytest.mark.parametrize("member", catalog.CATALOG, ids=lambda m: m.id)
def test_catalog_numbers_match_the_published_config(member: catalog.FamilyMember) -> None:
    config = member.published_config()
    assert config["architectures"] == [member.architecture]
    assert config["hidden_size"] == member.hidden_size
    assert config["num_hidden_layers"] == member.num_layers
    assert config["num_attention_heads"] == member.num_heads
    assert config.get("num_key_value_heads", member.num_heads) == member.num_kv_heads
    assert config["max_position_embeddings"] == member.context_length
    assert config.get("original_max_position_embeddings", member.context_length) == (
        member.original_context_length
    )
    if "vocab_size" in config:
        assert config["vocab_size"] == member.vocab_size


def test_all_eight_members_and_lookup_by_any_name() -> None:
    assert len(catalog.CATALOG) == 8
    assert catalog.get("microsoft/Phi-3.5-mini-instruct").id == "phi-3.5-mini"
    assert catalog.get("Phi-3-medium-4k-instruct").id == "phi-3-medium-4k"
    with pytest.raises(catalog.UnknownModelError, match="phi-3-mini-4k"):
        catalog.get("llama-3")


def test_identify_real_configs_by_structure() -> None:
    for member in catalog.CATALOG:
        if member.config_complete:
            assert catalog.identify(member.published_config()).id == member.id
    mini128k = dict(catalog.get("phi-3-mini-128k").published_config(), vocab_size=32064)
    assert catalog.identify(mini128k).id == "phi-3-mini-128k"


def test_identify_rejects_other_models() -> None:
    with pytest.raises(catalog.UnknownModelError, match="not a Phi-3"):
        catalog.identify({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096})


def test_a_family_class_of_another_shape_gets_the_nearest_member() -> None:
    pruned = dict(catalog.get("phi-3-mini-4k").published_config(), hidden_size=2048)
    member, differences = catalog.identify_or_nearest(pruned)
    assert member.id == "phi-3-mini-4k" and differences == ["hidden_size 2048 (not 3072)"]
    with pytest.raises(catalog.UnknownModelError, match="nearest: phi-3-mini-4k"):
        catalog.identify(pruned)
    long_small = dict(
        catalog.get("phi-3.5-mini").published_config(), hidden_size=64, max_position_embeddings=2048
    )
    assert catalog.identify_or_nearest(long_small)[0].uses_longrope  # longrope: a long member
    moe = {  # transformers' own spelling of the class
        "architectures": ["PhimoeForCausalLM"],
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
    }
    assert catalog.identify_or_nearest(moe) == (catalog.get("phi-3.5-moe"), [])


def test_no_member_takes_system_messages() -> None:
    # The cloud docs: Phi-3 / 3.5 deployments fold system messages into the user turn.
    assert not any(m.accepts_system_role for m in catalog.CATALOG)


def test_info_catalog_prints_every_member_and_cpu_status(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "--catalog"]) == 0
    out = capsys.readouterr().out
    for member in catalog.CATALOG:
        assert member.id in out
    assert "cl100k_base.tiktoken is converted" in out  # Phi-3-small's tokenizer, from tiktoken
    moe = next(line for line in out.splitlines() if line.startswith("phi-3.5-moe"))
    assert moe.endswith("yes")
