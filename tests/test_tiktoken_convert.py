"""Phi-3-small's cl100k_base.tiktoken converted to tokenizer.json, against tiktoken itself.

The random checkpoint ships the stand-in vocabulary as cl100k_base.tiktoken with a published-style
tokenizer_config.json; the conversion here is the export's (``write_phi3_small_tokenizer_files``).
onnxruntime-genai's tokenizer on an export is checked in tests/test_phi3_small_export.py.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiktoken_tools import FIXED_TEXTS, tiktoken_encoding, varied_texts

from phi3edge import tiktoken_convert
from phi3edge.tiktoken_convert import (
    PHI3_SMALL_SPECIAL_TOKENS,
    TIKTOKEN_FILE,
    TiktokenFileError,
)

pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def checkpoint(model_factory: Callable[..., Path]) -> Path:
    return model_factory("phi-3-small-8k")


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export's tokenizer files for the random checkpoint (as the export writes them)."""
    out = tmp_path_factory.mktemp("small-tokenizer")
    how = tiktoken_convert.write_phi3_small_tokenizer_files(checkpoint, out, 8192)
    assert how.startswith(f"tokenizer.json converted from {TIKTOKEN_FILE}")
    assert "not cl100k_base's bytes" in how  # the stand-in is not the real file
    return out


@pytest.fixture(scope="module")
def tokenizer(converted: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(converted / "tokenizer.json"))


@pytest.fixture(scope="module")
def encoding(checkpoint: Path) -> Any:
    return tiktoken_encoding(checkpoint / TIKTOKEN_FILE)


@pytest.fixture(scope="module")
def whole_only(tokenizer: Any, encoding: Any) -> list[bytes]:
    """Tokens a plain BPE over the derived merges never reaches from their bytes: tiktoken takes
    them whole (a pre-tokenized piece that is a token is one id), so must the conversion."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    data["model"]["ignore_merges"] = False
    plain = Tokenizer.from_str(json.dumps(data))
    candidates = []
    for token, rank in encoding._mergeable_ranks.items():
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(token) > 1 and encoding.encode_ordinary(text) == [rank]:
            candidates.append((token, text))
    found = plain.encode_batch([t for _, t in candidates], add_special_tokens=False)
    pairs = zip(candidates, found, strict=True)
    return sorted(token for (token, _), got in pairs if len(got.ids) > 1)[:50]


@pytest.fixture(scope="module")
def texts(encoding: Any, whole_only: list[bytes]) -> list[str]:
    return varied_texts(encoding._mergeable_ranks, whole_only)


def _mismatches(tokenizer: Any, encoding: Any, texts: list[str]) -> list[str]:
    got = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [
        text
        for text, ids in zip(texts, got, strict=True)
        if ids.ids != encoding.encode(text, allowed_special="all")
    ]


def test_random_checkpoint_ships_the_published_tokenizer_files(checkpoint: Path) -> None:
    assert not (checkpoint / "tokenizer.json").exists()
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Phi3SmallTokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_phi3_small.Phi3SmallTokenizer"
    assert config["added_tokens_decoder"] == {} and config["clean_up_tokenization_spaces"]
    assert config["bos_token"] == config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"].startswith("{{ bos_token }}")
    lines = (checkpoint / TIKTOKEN_FILE).read_text("ascii").splitlines()
    assert len(lines) == 100256
    assert lines[0] == "IQ== 0" and lines[198] == "Cg== 198"  # "!", "\n": cl100k's byte order
    special_map = json.loads((checkpoint / "special_tokens_map.json").read_text())
    assert set(special_map.values()) == {"<|endoftext|>"}


def test_converted_tokenizer_encodes_and_decodes_like_tiktoken(
    tokenizer: Any, encoding: Any, texts: list[str], whole_only: list[bytes]
) -> None:
    assert whole_only, "the stand-in has no token that needs whole-piece lookup"
    assert len(texts) > 700
    assert _mismatches(tokenizer, encoding, texts) == []
    for text in texts:
        ids = encoding.encode(text, allowed_special="all")
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        assert encoding.decode(ids) == text
    # and ids tiktoken never produces together (arbitrary byte splits) decode the same
    ranks = list(range(0, 100256, 37))
    assert tokenizer.decode(ranks) == encoding.decode(ranks)


def test_the_comparison_catches_a_wrong_conversion(
    tokenizer: Any, encoding: Any, texts: list[str]
) -> None:
    """Negative controls: without whole-piece lookup, with GPT-2's split regex, or with merges
    ordered by their left part instead of the merged token's rank, some text encodes otherwise."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    variants = {
        "ignore_merges off": lambda d: d["model"].update(ignore_merges=False),
        "gpt-2 regex": lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(
            Regex=gpt2
        ),
        "merges by left part": lambda d: d["model"].update(
            merges=sorted(d["model"]["merges"], key=lambda m: data["model"]["vocab"][m[0]])
        ),
    }
    for name, change in variants.items():
        variant = json.loads(json.dumps(data))
        change(variant)
        wrong = Tokenizer.from_str(json.dumps(variant))
        assert _mismatches(wrong, encoding, texts), name


def test_special_tokens_sit_at_the_published_ids(tokenizer: Any, converted: Path) -> None:
    assert tokenizer.get_vocab_size() == 100352
    for token, token_id in PHI3_SMALL_SPECIAL_TOKENS.items():
        assert tokenizer.token_to_id(token) == token_id
    ids = tokenizer.encode("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=False).ids
    assert ids[:2] == [100262, 198] and ids[-4:] == [100266, 198, 100263, 198]
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    assert config["model_max_length"] == 8192 and config["clean_up_tokenization_spaces"] is False
    assert len(config["added_tokens_decoder"]) == 96
    assert config["added_tokens_decoder"]["100266"]["content"] == "<|end|>"
    assert config["chat_template"].startswith("{{ bos_token }}")


def test_the_stand_in_is_shaped_by_cl100ks_regex(encoding: Any) -> None:
    """Like cl100k_base (trained on text split by its regex), every stand-in token that is text is
    one piece of that split, and whitespace around newlines has tokens as in cl100k."""
    regex = pytest.importorskip("regex")
    split = regex.compile(tiktoken_convert.CL100K_PATTERN)
    ranks = encoding._mergeable_ranks
    texts = []
    for token in ranks:
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    assert len(texts) > 90_000
    assert [t for t in texts if split.findall(t) != [t]] == []
    for token in (b"\n\n", b"\r\n", b"\t\t", b":\n", b"\n    \n", b"        "):
        assert token in ranks


def test_our_spelling_of_the_regex_differs_from_tiktokens_only_at_trailing_whitespace() -> None:
    """tokenizer.json keeps cl100k's original regex, which onnxruntime-genai recognises (it cannot
    load tiktoken 0.14's possessive spelling). Both split alike except a whitespace run that ends
    the text (or the stretch before a special token) after a newline: tiktoken 0.14 keeps it
    whole. A vocabulary without tokens spanning a newline and the whitespace after it (cl100k's
    kind, the stand-in) gives the same ids either way; the comparison with tiktoken checks that."""
    regex = pytest.importorskip("regex")
    from tiktoken_ext import openai_public

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
        theirs = regex.compile(openai_public.cl100k_base()["pat_str"])
    ours = regex.compile(tiktoken_convert.CL100K_PATTERN)
    for text in [*FIXED_TEXTS, "a \n b", "x\n\t\ny", "  \r\n  y", "word   "]:
        if not regex.search(r"\n[^\S\r\n]+\Z", text):
            assert ours.findall(text) == theirs.findall(text), repr(text)
    assert ours.findall("a\n  ") == ["a", "\n", "  "]
    assert theirs.findall("a\n  ") == ["a", "\n  "]


# ----------------------------------------------------------------------------- malformed input


def _write(path: Path, pairs: list[tuple[bytes, int]], extra: str = "") -> Path:
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in pairs]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


BYTES = [(bytes([b]), b) for b in range(256)]


@pytest.mark.parametrize(
    ("pairs", "extra", "message"),
    [
        (BYTES, "not-base64! 256\n", "not 'base64(token) rank'"),
        (BYTES, "YWI= 256 7\n", "not 'base64(token) rank'"),
        (BYTES + [(b"ab", 300)], "", "without gaps"),
        (BYTES + [(b"ab", 256), (b"ab", 257)], "", "repeated"),
        (BYTES[1:] + [(b"ab", 0)], "", "single bytes have no rank"),
    ],
)
def test_malformed_tiktoken_files_are_refused(
    tmp_path: Path, pairs: list, extra: str, message: str
) -> None:
    with pytest.raises(TiktokenFileError, match=re.escape(message)):
        tiktoken_convert.read_ranks(_write(tmp_path / "x.tiktoken", pairs, extra))


def test_small_files_round_trip_and_build_with_merges(tmp_path: Path) -> None:
    pairs = BYTES + [(b"ab", 256), (b"abab", 257), (b" a", 258)]
    path = _write(tmp_path / "x.tiktoken", pairs)
    ranks = tiktoken_convert.read_ranks(path)
    assert ranks == dict(pairs)
    tiktoken_convert.write_ranks(ranks, tmp_path / "y.tiktoken")
    assert (tmp_path / "y.tiktoken").read_text() == path.read_text()
    assert tiktoken_convert.merges_from_ranks(ranks) == [
        (b"a", b"b"),
        (b"ab", b"ab"),
        (b" ", b"a"),
    ]
    tokenizer = tiktoken_convert.build_tokenizer(ranks, {"<|x|>": 259})
    assert tokenizer.encode("abab ab<|x|>").ids == [257, 32, 256, 259]  # as tiktoken
    with pytest.raises(TiktokenFileError, match="follow the 259 ranks"):
        tiktoken_convert.build_tokenizer(ranks, {"<|x|>": 260})
    with pytest.raises(TiktokenFileError, match="Phi-3-small's special tokens start at"):
        tiktoken_convert.phi3_small_tokenizer(path)
