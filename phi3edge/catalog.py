"""The Phi-3 / Phi-3.5 family as data.

Input: nothing (the published configs ship inside the package, under ``data/phi3-family``).
Output: ``CATALOG``, one frozen ``FamilyMember`` per model; lookups by id or by checkpoint config.
Errors: ``UnknownModelError`` when a config matches no member.

The numbers are facts copied from the published ``config.json`` files (see
``data/phi3-family/SOURCES.md``); the package never reads anything outside itself at run time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

_DATA = "data/phi3-family"


class UnknownModelError(ValueError):
    """Raised when a name or a checkpoint config is not a member of the Phi-3 / 3.5 family."""


@dataclass(frozen=True)
class FamilyMember:
    """One published Phi-3 / 3.5 model and what phi3edge knows about it."""

    id: str
    hf_id: str
    architecture: str
    config_file: str
    config_complete: bool
    context_length: int
    original_context_length: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    parameters: str
    accepts_system_role: bool
    exports_on_cpu: bool
    cpu_note: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def uses_longrope(self) -> bool:
        return self.context_length != self.original_context_length

    def published_config(self) -> dict[str, Any]:
        """The published config.json (or the part of it that is known, when partial)."""
        return load_data_json(self.config_file)


# The cloud endpoint's model docs state that Phi-3 / Phi-3.5 deployments do not accept
# role="system"; the endpoint folds system messages into the first user message.
_NO_SYSTEM = False

_SMALL_NOTE = (
    "through our own PyTorch reference (phi3edge.phi3_small; no remote code); the published "
    "cl100k_base.tiktoken is converted to tokenizer.json at export"
)

CATALOG: tuple[FamilyMember, ...] = (
    FamilyMember(
        id="phi-3-mini-4k",
        hf_id="microsoft/Phi-3-mini-4k-instruct",
        architecture="Phi3ForCausalLM",
        config_file="phi-3-mini-4k-instruct.config.json",
        config_complete=True,
        context_length=4096,
        original_context_length=4096,
        hidden_size=3072,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        vocab_size=32064,
        parameters="3.8B",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note="",
    ),
    FamilyMember(
        id="phi-3-mini-128k",
        hf_id="microsoft/Phi-3-mini-128k-instruct",
        architecture="Phi3ForCausalLM",
        config_file="phi-3-mini-128k-instruct.config.partial.json",
        config_complete=False,
        context_length=131072,
        original_context_length=4096,
        hidden_size=3072,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        vocab_size=32064,
        parameters="3.8B",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note="",
    ),
    FamilyMember(
        id="phi-3-small-8k",
        hf_id="microsoft/Phi-3-small-8k-instruct",
        architecture="Phi3SmallForCausalLM",
        config_file="phi-3-small-8k-instruct.config.json",
        config_complete=True,
        context_length=8192,
        original_context_length=8192,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        vocab_size=100352,
        parameters="7B",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note=_SMALL_NOTE,
    ),
    FamilyMember(
        id="phi-3-small-128k",
        hf_id="microsoft/Phi-3-small-128k-instruct",
        architecture="Phi3SmallForCausalLM",
        config_file="phi-3-small-128k-instruct.config.partial.json",
        config_complete=False,
        context_length=131072,
        original_context_length=8192,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        vocab_size=100352,
        parameters="7B",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note=_SMALL_NOTE,
    ),
    FamilyMember(
        id="phi-3-medium-4k",
        hf_id="microsoft/Phi-3-medium-4k-instruct",
        architecture="Phi3ForCausalLM",
        config_file="phi-3-medium-4k-instruct.config.json",
        config_complete=True,
        context_length=4096,
        original_context_length=4096,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=10,
        vocab_size=32064,
        parameters="14B",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note="",
    ),
    FamilyMember(
        id="phi-3-medium-128k",
        hf_id="microsoft/Phi-3-medium-128k-instruct",
        architecture="Phi3ForCausalLM",
        config_file="phi-3-medium-128k-instruct.config.partial.json",
        config_complete=False,
        context_length=131072,
        original_context_length=4096,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=10,
        vocab_size=32064,
        parameters="14B",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note="real checkpoints export; no random checkpoint (published rope lists incomplete)",
    ),
    FamilyMember(
        id="phi-3.5-mini",
        hf_id="microsoft/Phi-3.5-mini-instruct",
        architecture="Phi3ForCausalLM",
        config_file="phi-3.5-mini-instruct.config.json",
        config_complete=True,
        context_length=131072,
        original_context_length=4096,
        hidden_size=3072,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        vocab_size=32064,
        parameters="3.8B",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note="",
    ),
    FamilyMember(
        id="phi-3.5-moe",
        hf_id="microsoft/Phi-3.5-MoE-instruct",
        architecture="PhiMoEForCausalLM",
        config_file="phi-3.5-moe-instruct.config.partial.json",
        config_complete=False,
        context_length=131072,
        original_context_length=4096,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        vocab_size=32064,
        parameters="42B (6.6B active)",
        accepts_system_role=_NO_SYSTEM,
        exports_on_cpu=True,
        cpu_note="",
    ),
)


def load_data_json(name: str) -> Any:
    """Read one of the family data files shipped inside the package."""
    return json.loads(resources.files("phi3edge").joinpath(_DATA, name).read_text("utf-8"))


@lru_cache(maxsize=1)
def chat_templates() -> dict[str, Any]:
    return load_data_json("chat-templates.json")


def get(member_id: str) -> FamilyMember:
    """Look up a member by catalog id (``phi-3-mini-4k``) or Hugging Face id."""
    for member in CATALOG:
        if member_id in (member.id, member.hf_id, member.hf_id.split("/")[1]):
            return member
    known = ", ".join(m.id for m in CATALOG)
    raise UnknownModelError(f"unknown model {member_id!r}; the Phi-3 family is: {known}")


def identify(config: dict[str, Any]) -> FamilyMember:
    """Find the member whose architecture a checkpoint's config.json has.

    Matching is by structure (class, width, depth-independent head layout, context), so scaled-down
    random checkpoints made by ``phi3edge.fixtures`` name their member explicitly instead.
    """
    member, differences = identify_or_nearest(config)
    if differences:
        raise UnknownModelError(
            f"the checkpoint's shape matches no published {member.architecture} "
            f"(nearest: {member.id}; {', '.join(differences)})"
        )
    return member


def identify_or_nearest(config: dict[str, Any]) -> tuple[FamilyMember, list[str]]:
    """The member a checkpoint is, or, for a checkpoint of a family class whose shape matches no
    member (pruned, custom-sized, scaled down), the nearest member of that class and how the
    checkpoint differs from it (``["hidden_size 64 (not 3072)", ...]``; empty when it matches).

    Raises ``UnknownModelError`` for a class outside the family."""
    declared = config.get("phi3edge_catalog_id")
    if declared:
        return get(declared), []
    architectures = {a.lower() for a in config.get("architectures") or []}
    same_class = [m for m in CATALOG if m.architecture.lower() in architectures]
    if not same_class:
        raise UnknownModelError(
            f"not a Phi-3 / Phi-3.5 checkpoint (architectures={config.get('architectures')}, "
            f"hidden_size={config.get('hidden_size')}, "
            f"max_position_embeddings={config.get('max_position_embeddings')})"
        )
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    longrope = "longrope" in (rope.get("type"), rope.get("rope_type"))
    ranked = sorted(
        same_class, key=lambda m: (len(_differences(config, m)), m.uses_longrope != longrope)
    )
    member, differences = ranked[0], _differences(config, ranked[0])
    if not differences and member.id in ("phi-3-mini-128k", "phi-3.5-mini"):
        member = _mini_long_variant(config)
    return member, differences


def _differences(config: dict[str, Any], member: FamilyMember) -> list[str]:
    """How ``config`` differs from ``member`` in the fields that identify a member."""
    fields = {
        "hidden_size": member.hidden_size,
        "num_attention_heads": member.num_heads,
        "num_key_value_heads": member.num_kv_heads,
        "max_position_embeddings": member.context_length,
    }
    found = {**fields, **{k: config[k] for k in fields if config.get(k) is not None}}
    if config.get("num_key_value_heads") is None:  # absent: as many as attention heads
        found["num_key_value_heads"] = found["num_attention_heads"]
    return [f"{k} {found[k]} (not {v})" for k, v in fields.items() if found[k] != v]


def _mini_long_variant(config: dict[str, Any]) -> FamilyMember:
    """Phi-3-mini-128k and Phi-3.5-mini share a shape; their rope factors differ."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    for member_id in ("phi-3.5-mini", "phi-3-mini-128k"):
        published = get(member_id).published_config()["rope_scaling"]
        if rope.get("long_factor") == published["long_factor"]:
            return get(member_id)
    return get("phi-3.5-mini")


def describe() -> str:
    """The catalog as a plain-text table (``phi3edge info --catalog``)."""
    header = f"{'id':<18}{'params':<18}{'context':>8}  {'kv/heads':<9}{'system role':<13}CPU export"
    lines = [header, "-" * len(header)]
    for m in CATALOG:
        cpu = "yes" if m.exports_on_cpu else "no"
        if m.cpu_note:
            cpu += f" ({m.cpu_note})"
        system = "yes" if m.accepts_system_role else "no -> user"
        lines.append(
            f"{m.id:<18}{m.parameters:<18}{m.context_length:>8}  "
            f"{f'{m.num_kv_heads}/{m.num_heads}':<9}{system:<13}{cpu}"
        )
    return "\n".join(lines)
