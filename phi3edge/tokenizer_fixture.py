"""A generated stand-in for Phi-3's 32k SentencePiece-BPE tokenizer.

Input: nothing (the training text is the Python standard library's own source, which every machine
has). Output: a ``tokenizers.Tokenizer`` shaped like Phi-3's ``tokenizer.json`` (BPE with byte
fallback, ``<unk> <s> </s>`` at 0-2, the 256 byte tokens at 3-258, learned pieces up to id 31999 and
Phi-3's special tokens at their real ids 32000-32010), plus the matching ``tokenizer_config.json``.

Only ASCII is learned, so every other character takes the byte-fallback path: multi-byte UTF-8
characters are split across tokens, which is what the engine's incremental detokenizer must handle.
"""

from __future__ import annotations

import json
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

from phi3edge import catalog

BASE_VOCAB_SIZE = 32000
_CORPUS_PACKAGES = ("email", "json", "http", "logging", "unittest", "asyncio", "xml", "urllib")
_SPECIALS = ("<unk>", "<s>", "</s>")


def special_tokens() -> dict[int, dict[str, Any]]:
    """Phi-3's added tokens (ids 0-2 and 32000-32010) with their published flags."""
    fields = _published_tokenizer_config()
    return {int(k): v for k, v in fields["added_tokens_decoder"].items()}


def _published_tokenizer_config() -> dict[str, Any]:
    data = catalog.load_data_json("tokenizer-special-tokens.json")
    return data["phi3_llama_sentencepiece_tokenizer"][
        "tokenizer_config_json_fields_phi_3_mini_4k_instruct"
    ]


def phi3_tokenizer_config(chat_template: str, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the published Phi-3 fields plus the member's chat template."""
    config = dict(_published_tokenizer_config())
    config["chat_template"] = chat_template
    config["model_max_length"] = model_max_length
    return config


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for package in _CORPUS_PACKAGES:
        for path in sorted((stdlib / package).rglob("*.py")):
            text = path.read_text("utf-8", errors="ignore")
            lines.extend(line for line in text.splitlines() if line.isascii() and line.strip())
    return lines


@lru_cache(maxsize=1)
def _learned_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """Train a BPE on ASCII text; return pieces (in id order) and merges."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always"
    )
    alphabet = [chr(c) for c in range(32, 127)] + ["\u2581", "\t"]
    target = BASE_VOCAB_SIZE - len(_SPECIALS) - 256
    trainer = trainers.BpeTrainer(
        vocab_size=target,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
        min_frequency=2,
    )
    trainer_tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    pieces = sorted(vocab, key=vocab.__getitem__)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    known = set(pieces)
    # Pad with concatenations of existing pieces so the base vocabulary is exactly 32000 ids.
    seeds = [p for p in pieces if p.startswith("\u2581") and p[1:].isalpha()][:400]
    suffixes = [p for p in pieces if p.isalpha() and len(p) <= 3][:400]
    for left in seeds:
        for right in suffixes:
            if len(pieces) >= target:
                break
            if left + right not in known:
                pieces.append(left + right)
                merges.append((left, right))
                known.add(left + right)
    return pieces[:target], merges


def build_phi3_tokenizer() -> Any:
    """The tokenizer object (``tokenizers.Tokenizer``); save it as ``tokenizer.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces, merges = _learned_pieces()
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    kept = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=kept, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    added = []
    for token_id, spec in sorted(special_tokens().items()):
        if token_id < BASE_VOCAB_SIZE:
            continue
        assert token_id == len(vocab) + len(added), "Phi-3 special ids must follow the base vocab"
        added.append(
            AddedToken(
                spec["content"],
                single_word=spec["single_word"],
                lstrip=spec["lstrip"],
                rstrip=spec["rstrip"],
                normalized=spec["normalized"],
                special=spec["special"],
            )
        )
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    for token_id, spec in special_tokens().items():
        if tokenizer.token_to_id(spec["content"]) != token_id:
            raise AssertionError(f"{spec['content']} landed at the wrong id")
    return tokenizer
