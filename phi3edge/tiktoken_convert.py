"""tiktoken's BPE file (Phi-3-small's ``cl100k_base.tiktoken``) as a Hugging Face tokenizer.json.

Input: a ``.tiktoken`` file (one ``base64(token bytes) rank`` per line), the special tokens with
their ids, and the pre-tokenizer's split regex. Output: a byte-level BPE ``tokenizers.Tokenizer``
that encodes as tiktoken does: the ranks become the vocabulary (each token's bytes spelled with
GPT-2's byte-to-character map), and the merges are derived from the ranks (every split of a token
into two tokens, ordered by the merged token's rank), with ``ignore_merges`` so a pre-tokenized
piece that is itself a token is taken whole, as tiktoken does. Plus the export's
``tokenizer_config.json``. No tiktoken, no remote code: the file is read here.
Errors: ``TiktokenFileError`` (a ``ValueError``) for a malformed file or special ids that do not
follow the ranks.

transformers has a ``TikTokenConverter`` doing the same derivation, but it reads the file through
``tiktoken.load.load_tiktoken_bpe``, which caches local files in a temporary folder keyed by their
path and returns the cached copy (unchecked) on the next read of the same path; its argument names
also changed between transformers 4 and 5. This converter is checked against tiktoken's own
encoder in tests/test_tiktoken_convert.py.
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

TIKTOKEN_FILE = "cl100k_base.tiktoken"
# sha256 of tiktoken's published cl100k_base.tiktoken (tiktoken_ext.openai_public's expected_hash)
CL100K_BASE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# cl100k_base's pre-tokenizer pattern in its original spelling (the one Llama-3 later adopted, which
# onnxruntime-genai's tokenizer recognises). tiktoken 0.14 spells it with possessive quantifiers
# and keeps a whitespace run that ends the text after a newline whole; with no token spanning a
# newline and the whitespace after it (cl100k has none) the ids agree, which tests check.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Phi-3-small's tokenizer: cl100k_base (ranks 0-100255) plus its own special tokens, padded with
# dummies to the 100352-row embedding. The table is the published tokenization_phi3_small.py's
# SPECIAL_TOKENS (a public copy; see docs/research/phi3-small-cpu/FINDINGS.md), which it encodes
# with ``allowed_special="all"``: the strings are special wherever they appear in the text.
# <|end|> 100266 is the second eos id of the published generation_config.json.
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


class TiktokenFileError(ValueError):
    """A .tiktoken file (or its special tokens) that cannot become a tokenizer.json."""


@lru_cache(maxsize=1)
def byte_to_char() -> tuple[str, ...]:
    """GPT-2's byte-to-character map (``tokenizers``' ByteLevel): printable bytes stand for
    themselves, the others take the characters from U+0100 on, in byte order."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


def spell(token: bytes) -> str:
    """A token's bytes as its byte-level vocabulary string."""
    table = byte_to_char()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_to_char())}


def unspell(piece: str) -> bytes:
    """The inverse of ``spell``."""
    inverse = _char_to_byte()
    return bytes(inverse[c] for c in piece)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """The mergeable ranks of a .tiktoken file, checked: every line ``base64 rank``, no token or
    rank twice, ranks 0..n-1, all 256 single bytes present (byte-level BPE needs them)."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError("not two fields")
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (ValueError, binascii.Error) as exc:
                raise TiktokenFileError(
                    f"{path}:{number}: not 'base64(token) rank' ({exc})"
                ) from None
            if not token or token in ranks or rank in seen:
                raise TiktokenFileError(f"{path}:{number}: empty or repeated token or rank {rank}")
            ranks[token] = rank
            seen.add(rank)
    if seen != set(range(len(ranks))):
        raise TiktokenFileError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TiktokenFileError(
            f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]})"
        )
    return ranks


def write_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """A .tiktoken file in tiktoken's own layout (rank order)."""
    lines = (
        f"{base64.b64encode(token).decode('ascii')} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    )
    Path(path).write_text("".join(lines), "ascii")


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of a token into two tokens, ordered by the merged token's rank (then the left's
    and the right's rank). tiktoken merges, at each step, the adjacent pair whose concatenation has
    the lowest rank; a BPE whose merge priority is that rank does the same."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_tokenizer(
    ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str = CL100K_PATTERN
) -> Any:
    """The byte-level BPE ``tokenizers.Tokenizer``; special tokens must take the ids right after
    the ranks (they do for Phi-3-small: 100256-100351) and match anywhere in the text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ids = sorted(special_tokens.values())
    if ids != list(range(len(ranks), len(ranks) + len(ids))):
        raise TiktokenFileError(
            f"special token ids must follow the {len(ranks)} ranks without gaps, "
            f"got {ids[0] if ids else None}..{ids[-1] if ids else None}"
        )
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for left, right in merges_from_ranks(ranks)]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = sorted(special_tokens.items(), key=lambda item: item[1])
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token, _ in specials]
    )
    for token, token_id in specials:
        if tokenizer.token_to_id(token) != token_id:
            raise AssertionError(
                f"{token} landed at {tokenizer.token_to_id(token)}, not {token_id}"
            )
    return tokenizer


def read_phi3_small_ranks(tiktoken_file: str | Path) -> dict[bytes, int]:
    """``read_ranks``, and exactly cl100k_base's count: the special tokens' ids follow it."""
    ranks = read_ranks(tiktoken_file)
    if len(ranks) != PHI3_SMALL_BASE_VOCAB_SIZE:
        raise TiktokenFileError(
            f"{tiktoken_file}: {len(ranks)} ranks; Phi-3-small's special tokens start at "
            f"{PHI3_SMALL_BASE_VOCAB_SIZE}, right after cl100k_base's {PHI3_SMALL_BASE_VOCAB_SIZE}"
        )
    return ranks


def phi3_small_tokenizer(tiktoken_file: str | Path) -> Any:
    """Phi-3-small's tokenizer from its cl100k_base.tiktoken and the published special tokens."""
    return build_tokenizer(read_phi3_small_ranks(tiktoken_file), PHI3_SMALL_SPECIAL_TOKENS)


def export_tokenizer_config(source: dict[str, Any], context_length: int) -> dict[str, Any]:
    """The export's tokenizer_config.json from the checkpoint's: its chat template and special-token
    strings, the special tokens listed, ``model_max_length`` = the context. The published one names
    its remote ``Phi3SmallTokenizer`` (``auto_map``); the export's tokenizer is tokenizer.json, so
    the generic fast class. ``clean_up_tokenization_spaces`` is off: the published tokenizer decodes
    through tiktoken, which never cleans up spaces, whatever its config says."""
    config = {k: v for k, v in source.items() if k not in ("auto_map", "added_tokens_decoder")}
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, token_id in sorted(PHI3_SMALL_SPECIAL_TOKENS.items(), key=lambda item: item[1])
    }
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["clean_up_tokenization_spaces"] = False
    config["model_max_length"] = context_length
    return config


def write_phi3_small_tokenizer_files(
    source: str | Path, out_dir: str | Path, context_length: int
) -> str:
    """tokenizer.json (the checkpoint's own, else converted from its cl100k_base.tiktoken) and
    tokenizer_config.json into ``out_dir``; returns a line saying which."""
    import hashlib
    import shutil

    source, out_dir = Path(source), Path(out_dir)
    tiktoken_file = source / TIKTOKEN_FILE
    if (source / "tokenizer.json").is_file():
        shutil.copyfile(source / "tokenizer.json", out_dir / "tokenizer.json")
        how = "tokenizer.json copied from the checkpoint"
    elif tiktoken_file.is_file():
        phi3_small_tokenizer(tiktoken_file).save(str(out_dir / "tokenizer.json"))
        digest = hashlib.sha256(tiktoken_file.read_bytes()).hexdigest()
        which = (
            "tiktoken's cl100k_base" if digest == CL100K_BASE_SHA256 else "not cl100k_base's bytes"
        )
        how = f"tokenizer.json converted from {TIKTOKEN_FILE} ({which}, sha256 {digest[:12]})"
    else:
        raise FileNotFoundError(f"{source} has neither tokenizer.json nor {TIKTOKEN_FILE}")
    config = json.loads((source / "tokenizer_config.json").read_text("utf-8"))
    config = export_tokenizer_config(config, context_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if (source / "special_tokens_map.json").is_file():
        shutil.copyfile(source / "special_tokens_map.json", out_dir / "special_tokens_map.json")
    return how
