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


# ----------------------------------------------------------------------------- Phi-3-small

# Phi-3-small's tokenizer is tiktoken's cl100k_base (ranks 0-100255) plus its own special tokens,
# padded with dummies to the 100352-row embedding. The table is the published
# tokenization_phi3_small.py's SPECIAL_TOKENS (a public copy; see
# docs/research/phi3-small-cpu/FINDINGS.md). <|end|> 100266 is the second eos id of the published
# generation_config.json.
PHI3_SMALL_BASE_VOCAB_SIZE = 100256
PHI3_SMALL_PADDED_VOCAB_SIZE = 100352
PHI3_SMALL_SPECIAL_TOKENS: dict[str, int] = {
    "<|dummy_id_2|>": 100256,  # cl100k_base has no token 100256
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|system|>": 100261,
    "<|user|>": 100262,
    "<|assistant|>": 100263,
    "<|dummy_id_0|>": 100264,
    "<|dummy_id_1|>": 100265,
    "<|end|>": 100266,
    **{f"<|dummy_id_{i}|>": 100264 + i for i in range(3, 12)},  # 100267-100275
    "<|endofprompt|>": 100276,
    **{f"<|dummy_id_{11 + k}|>": 100276 + k for k in range(1, 76)},  # 100277-100351
}
# cl100k_base's pre-tokenizer pattern (the same one Llama-3 later adopted).
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def phi3_small_dummy_token_ids() -> list[int]:
    """Ids the model never produces: the dummies plus fill-in-the-middle and <|endofprompt|> (the
    published tokenizer's ``dummy_token_indices``; the config class masks their logits)."""
    unused = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")
    return sorted(i for t, i in PHI3_SMALL_SPECIAL_TOKENS.items() if "dummy_id" in t or t in unused)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character map in its own order (printable bytes first), which is also the
    order of cl100k_base's 256 single-byte ranks ('!' is rank 0)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


@lru_cache(maxsize=1)
def _small_learned_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE pieces (ids 256 up) and merges, padded to cl100k_base's 100256 ranks."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = _cl100k_pre_tokenizer(pre_tokenizers, Regex)
    alphabet = _byte_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=PHI3_SMALL_BASE_VOCAB_SIZE,
        initial_alphabet=alphabet,
        show_progress=False,
        min_frequency=2,
    )
    trainer_tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    singles = set(alphabet)
    pieces = [p for p in sorted(vocab, key=vocab.__getitem__) if p not in singles]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    known = singles | set(pieces)
    target = PHI3_SMALL_BASE_VOCAB_SIZE - len(alphabet)
    # Pad with concatenations of learned pieces (each with its merge, lowest priority).
    words = [p for p in pieces if p.startswith("\u0120") and p[1:].isalpha()][:600]
    suffixes = [p for p in pieces if p.isalpha() and len(p) <= 4][:600]
    for left in words:
        for right in suffixes:
            if len(pieces) >= target:
                break
            if left + right not in known:
                pieces.append(left + right)
                merges.append((left, right))
                known.add(left + right)
    if len(pieces) < target:
        raise AssertionError(f"could only make {len(pieces)} of {target} pieces")
    return pieces[:target], merges


def _cl100k_pre_tokenizer(pre_tokenizers: Any, regex: Any) -> Any:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_phi3_small_tokenizer() -> Any:
    """A stand-in shaped like Phi-3-small's tokenizer as a Hugging Face ``tokenizers.Tokenizer``
    (byte-level BPE, cl100k_base's pre-tokenizer, 100256 base ids, the published special tokens at
    100256-100351); save it as ``tokenizer.json``. The merges are learned here, so ids of ordinary
    text differ from the real tokenizer's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pieces, merges = _small_learned_pieces()
    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    kept = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=kept, ignore_merges=False))
    tokenizer.pre_tokenizer = _cl100k_pre_tokenizer(pre_tokenizers, Regex)
    tokenizer.decoder = decoders.ByteLevel()
    specials = sorted(PHI3_SMALL_SPECIAL_TOKENS.items(), key=lambda item: item[1])
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, _ in specials]
    )
    for token, token_id in specials:
        if tokenizer.token_to_id(token) != token_id:
            raise AssertionError(
                f"{token} landed at {tokenizer.token_to_id(token)}, not {token_id}"
            )
    return tokenizer


def phi3_small_tokenizer_config(chat_template: str, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for the stand-in: the published special-token strings (bos = eos =
    pad = <|endoftext|>), the chat template, and the generic fast-tokenizer class (the published
    one names its own Phi3SmallTokenizer, remote code that needs tiktoken)."""
    decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in sorted(PHI3_SMALL_SPECIAL_TOKENS.items(), key=lambda item: item[1])
    }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
