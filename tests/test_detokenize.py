"""Incremental detokenization and stop-string hold-back, against the tokenizers library's decode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi3edge.detokenize import IncrementalDecoder, StopFilter, TokenTable

# Phi-3's SentencePiece-style vocabulary and Phi-3-small's byte-level one: the first id that is
# a special token (generated text never contains those).
FIRST_SPECIAL = {"phi-3-mini-4k": 32000, "phi-3-small-8k": 100256}


@pytest.fixture(scope="module", params=list(FIRST_SPECIAL))
def member(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer_json(
    member: str, model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    checkpoint = model_factory(member)
    if member.startswith("phi-3-small"):  # ships cl100k_base.tiktoken: the export's conversion
        from phi3edge.tiktoken_convert import write_phi3_small_tokenizer_files

        out = tmp_path_factory.mktemp("small-tokenizer")
        write_phi3_small_tokenizer_files(checkpoint, out, 8192)
        return out / "tokenizer.json"
    return checkpoint / "tokenizer.json"


@pytest.fixture(scope="module")
def table(tokenizer_json: Path) -> TokenTable:
    return TokenTable(tokenizer_json)


@pytest.fixture(scope="module")
def reference(tokenizer_json: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json))


def _stream(table: TokenTable, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(table)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@settings(max_examples=200, deadline=None)
@given(draws=st.lists(st.integers(0, 2**31), min_size=1, max_size=40))
def test_stream_concatenates_to_the_tokenizers_decode(member, table, reference, draws) -> None:
    ids = [3 + d % (FIRST_SPECIAL[member] - 3) for d in draws]
    expected = reference.decode(ids, skip_special_tokens=True)
    assert "".join(_stream(table, ids)) == expected


def test_multibyte_character_is_never_split(member, table, reference) -> None:
    ids = reference.encode("a 中文 é 🙂").ids
    pieces = _stream(table, ids)
    assert "".join(pieces) == "a 中文 é 🙂"
    assert all("\ufffd" not in p for p in pieces)
    if member == "phi-3-mini-4k":  # a byte-fallback run is emitted whole once a token ends it
        assert any("中文" in p for p in pieces)


@pytest.mark.parametrize(
    ("chunks", "stops", "emitted"),
    [
        (["Hello", " wor", "ld"], ("world",), "Hello "),
        (["ab", "c<", "|en", "d|>tail"], ("<|end|>",), "abc"),
        (["x<", "y"], ("<|",), "x<y"),
        (["stop"], ("stop",), ""),
        (["aXb", "Yc"], ("bY", "Xb"), "a"),
    ],
)
def test_stop_filter_never_leaks(chunks: list[str], stops: tuple[str, ...], emitted: str) -> None:
    stop = StopFilter(stops)
    out = [stop.push(c) for c in chunks] + [stop.flush()]
    assert "".join(out) == emitted
    for s in stops:
        assert s not in "".join(out)
        # no emitted piece ends with a strict prefix of a stop that later completes
    if stop.stopped:
        assert all(not any(s in "".join(out[: i + 1]) for s in stops) for i in range(len(out)))


def test_held_text_is_released_at_the_end() -> None:
    stop = StopFilter(("<|end|>",))
    assert stop.push("ok <|en") == "ok "
    assert stop.flush() == "<|en"
    assert not stop.stopped
