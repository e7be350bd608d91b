"""tiktoken itself as the reference for Phi-3-small's converted tokenizer; texts to compare on."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest

from phi3edge.tiktoken_convert import PHI3_SMALL_SPECIAL_TOKENS

FIXED_TEXTS = [
    "Hello, world! How's it going? I'M FINE, they'LL see; we'd've",
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # avg\n\n\n",
    'if (a != b && c <= 0x1F) { printf("%d\\n", a->b[3]); }\r\n',
    "12 123 1234 12345678901 3.14159 1,000,000 -42 1e-05 ٣٤٥ ①②",
    "   leading spaces, inner    runs,\ttabs\t\tand trailing   ",
    "\n\n\n  \n \n\t\n\r\n\r\n\n",
    "中文字符，日本語のテキスト。한국어 문장입니다.",
    "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷 keycap 1\ufe0f\u20e3",
    "é è ñ ü ß Å ǅ İstanbul ı ſ K \u00a0nbsp\u3000wide e\u0301 combining",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|endoftext|>",
    "x<|endoftext|>y<|fim_prefix|><|dummy_id_70|><|endofprompt|>z",
    "not special: <|end| <|end <|user|| <|END|> <| end |>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!!!!!!!!!=======",
    " " * 40 + "x" + "\n" * 12 + "y" + "0" * 30,
    "class A:\n    x = 1\n    \n    def f(self):\n\t\treturn {}  \n\n\n",  # indented blank line
    "trailing newline and spaces\n  ",
    "nul\x00byte and \x01\x7f controls",
    "",
]
# Where onnxruntime-genai 0.18's tokenizer is known to split otherwise than cl100k's regex: a
# newline, spaces or tabs, and a newline again ("\n    \n": it cuts after the first newline); and
# NUL, where its C string ends.
OG_KNOWN_DIFFERENT = re.compile(r"\n[^\S\r\n]+[\r\n]|\x00")
_ALPHABET = (
    "abcXYZ  \n\t\r'sdmtlv012345.,;:!?\"()[]{}<>|_-=+*/\\#@$%^&~`"
    "éßı中文🙂\u200d\u00a0\u3000ſK٣<|end|>"
)


def tiktoken_encoding(tiktoken_file: Path) -> Any:
    """``tiktoken.Encoding`` as the published Phi3SmallTokenizer builds it: cl100k_base's pat_str
    (tiktoken's own), the file's ranks read by tiktoken's own loader, the published special
    tokens. cl100k_base's definition is taken from tiktoken with its download replaced by the
    file's ranks (nothing is fetched); its own special tokens must keep their ids in Phi-3-small."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches local files by path, unchecked
        ranks = load_tiktoken_bpe(str(tiktoken_file))
        patch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
        cl100k = openai_public.cl100k_base()
    for token, token_id in cl100k["special_tokens"].items():
        assert PHI3_SMALL_SPECIAL_TOKENS[token] == token_id
    return tiktoken.Encoding(
        name="phi3small",
        pat_str=cl100k["pat_str"],
        mergeable_ranks=ranks,
        special_tokens=PHI3_SMALL_SPECIAL_TOKENS,
    )


def varied_texts(ranks: dict[bytes, int], whole_tokens: list[bytes], seed: int = 0) -> list[str]:
    """The fixed texts, random strings over a mixed alphabet, runs of the vocabulary's own tokens
    (so long merges are exercised), and ``whole_tokens`` as they stand and inside words."""
    rng = random.Random(seed)
    texts = list(FIXED_TEXTS)
    texts += ["".join(rng.choices(_ALPHABET, k=rng.randint(1, 80))) for _ in range(400)]
    valid = []
    for token in ranks:
        try:
            valid.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    valid.sort()
    texts += ["".join(rng.choices(valid, k=rng.randint(1, 40))) for _ in range(300)]
    words = [token.decode("utf-8") for token in whole_tokens]
    texts += words + [f"x{w}s, {w}{w}." for w in words]
    return texts
