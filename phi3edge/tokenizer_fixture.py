"""A generated stand-in for Phi-3's 32k SentencePiece-BPE tokenizer.

Input: nothing (the training text is the Python standard library's own source, which every machine
has). Output: a ``tokenizers.Tokenizer`` shaped like Phi-3's ``tokenizer.json`` (BPE with byte
fallback, ``<unk> <s> </s>`` at 0-2, the 256 byte tokens at 3-258, learned pieces up to id 31999 and
Phi-3's special tokens at their real ids 32000-32010), plus the matching ``tokenizer_config.json``.

Only ASCII is learned, so every other character takes the byte-fallback path: multi-byte UTF-8
characters are split across tokens, which is what the engine's incremental detokenizer must handle.

For Phi-3-small: a stand-in for cl100k_base's ranks (written as ``cl100k_base.tiktoken``) and the
published-style tokenizer_config.json; the export converts them as it does a real checkpoint's.
"""

from __future__ import annotations

import json
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

from phi3edge import catalog
from phi3edge.tiktoken_convert import (  # noqa: F401  (re-exported for tests)
    CL100K_PATTERN,
    PHI3_SMALL_BASE_VOCAB_SIZE,
    PHI3_SMALL_PADDED_VOCAB_SIZE,
    PHI3_SMALL_SPECIAL_TOKENS,
    byte_to_char,
    unspell,
)

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
    _pad_with_concatenations(pieces, merges, known, seeds, suffixes, target)
    return pieces[:target], merges


def _pad_with_concatenations(
    pieces: list[str],
    merges: list[tuple[str, ...]],
    known: set[str],
    lefts: list[str],
    rights: list[str],
    target: int,
) -> None:
    """Append ``left + right`` pieces (each with its merge, at the lowest priority) until there
    are ``target`` pieces: a stand-in vocabulary reaches the real one's size."""
    for left in lefts:
        for right in rights:
            if len(pieces) >= target:
                return
            if left + right not in known:
                pieces.append(left + right)
                merges.append((left, right))
                known.add(left + right)


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


# ----------------------------------------------------------------------------- Phi-3-small

# Phi-3-small's tokenizer is tiktoken's cl100k_base (ranks 0-100255) plus its own special tokens
# (phi3edge.tiktoken_convert). A published checkpoint ships it as cl100k_base.tiktoken, the remote
# tokenization_phi3_small.py and this tokenizer_config.json (the published file's fields, from a
# public copy of microsoft/Phi-3-small-8k-instruct's; the chat template is the member's own).
_PHI3_SMALL_PUBLISHED_TOKENIZER_CONFIG: dict[str, Any] = {
    "added_tokens_decoder": {},
    "auto_map": {
        "AutoTokenizer": [
            "tokenization_phi3_small.Phi3SmallTokenizer",
            "tokenization_phi3_small.Phi3SmallTokenizer",
        ]
    },
    "bos_token": "<|endoftext|>",
    "chat_template": None,
    "clean_up_tokenization_spaces": True,
    "eos_token": "<|endoftext|>",
    "model_max_length": None,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "Phi3SmallTokenizer",
}
PHI3_SMALL_SPECIAL_TOKENS_MAP = {
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def phi3_small_dummy_token_ids() -> list[int]:
    """Ids the model never produces: the dummies plus fill-in-the-middle and <|endofprompt|> (the
    published tokenizer's ``dummy_token_indices``; the config class masks their logits)."""
    unused = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")
    return sorted(i for t, i in PHI3_SMALL_SPECIAL_TOKENS.items() if "dummy_id" in t or t in unused)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character map in its own order (printable bytes first), which is also the
    order of cl100k_base's 256 single-byte ranks ('!' is rank 0)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = byte_to_char()
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def _small_corpus() -> list[str]:
    """Multi-line blocks of the same stdlib text, so whitespace around newlines gets merges as in
    cl100k_base (``"\\n\\n"``, ``":\\n"``, ``"\\n    \\n"``...): every third block indented with
    tabs, every fourth with indented blank lines, every fifth with CRLF line ends."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    blocks: list[str] = []
    for package in _CORPUS_PACKAGES:
        for path in sorted((stdlib / package).rglob("*.py")):
            lines = path.read_text("utf-8", errors="ignore").splitlines()
            for start in range(0, len(lines), 6):
                block = "\n".join(lines[start : start + 6]) + "\n"
                if not block.isascii():
                    continue
                if len(blocks) % 3 == 1:
                    block = block.replace("    ", "\t")
                if len(blocks) % 5 == 2:
                    block = block.replace("\n", "\r\n")
                if len(blocks) % 4 == 3:  # blank lines that keep their indentation
                    block = block.replace("\n\n", "\n    \n")
                blocks.append(block)
    return blocks


@lru_cache(maxsize=1)
def _small_learned_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE pieces (ids 256 up) and merges, padded to cl100k_base's 100256 ranks."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = _byte_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=PHI3_SMALL_BASE_VOCAB_SIZE,
        initial_alphabet=alphabet,
        show_progress=False,
        min_frequency=2,
    )
    trainer_tok.train_from_iterator(_small_corpus(), trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    singles = set(alphabet)
    pieces = [p for p in sorted(vocab, key=vocab.__getitem__) if p not in singles]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    known = singles | set(pieces)
    target = PHI3_SMALL_BASE_VOCAB_SIZE - len(alphabet)
    # Pad with concatenations of learned pieces (each with its merge, lowest priority): " word"
    # + "suffix", ASCII letters only (whitespace's byte-level characters count as letters in
    # str.isalpha, and would make tokens cl100k's regex never produces, such as "  se").
    words = [p for p in pieces if p.startswith("\u0120") and unspell(p[1:]).isalpha()][:600]
    suffixes = [p for p in pieces if unspell(p).isalpha() and len(p) <= 4][:600]
    _pad_with_concatenations(pieces, merges, known, words, suffixes, target)
    if len(pieces) < target:
        raise AssertionError(f"could only make {len(pieces)} of {target} pieces")
    return pieces[:target], merges


@lru_cache(maxsize=1)
def phi3_small_stand_in_ranks() -> dict[bytes, int]:
    """A stand-in for cl100k_base's mergeable ranks, in the same shape: the 256 single bytes first
    in cl100k's order (``!`` = 0, ``\\n`` = 198), then byte-level BPE tokens learned here from
    stdlib text in merge order (so every token's parts rank below it), padded to 100256 ranks. Write
    it with ``tiktoken_convert.write_ranks`` as cl100k_base.tiktoken. Ordinary text gets other ids
    than with the real cl100k_base."""
    pieces, _ = _small_learned_pieces()
    return {unspell(piece): rank for rank, piece in enumerate(_byte_alphabet() + pieces)}


def phi3_small_tokenizer_config(chat_template: str, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as a published Phi-3-small ships it (remote Phi3SmallTokenizer,
    bos = eos = pad = <|endoftext|>, no added tokens listed), with the member's chat template."""
    config = json.loads(json.dumps(_PHI3_SMALL_PUBLISHED_TOKENIZER_CONFIG))
    config["chat_template"] = chat_template
    config["model_max_length"] = model_max_length
    return config
