"""Does a prompt's logits depend on how it is cut into appended chunks? Per INT4 layout.

Usage: python scripts/bench_chunk_rounding.py [--tokens 60]

On the built-in tiny random Phi-3-mini (``phi3edge demo``'s checkpoint), each layout is exported
once, then a ``--tokens`` prompt is appended whole and, for every split point p, as two chunks
(p tokens, then the rest): the script prints the split points whose logits are not bit-identical
to the whole prompt's and the largest difference, and the largest difference when every token is
its own chunk (decoding one token at a time, M = 1 in every MatMul). A reused KV prefix, n
choices and speculative verify steps all append other chunks than a cold prefill, so this is how
exact they can be.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from benchlib import machine

from phi3edge import export, fixtures
from phi3edge.cli import cache_dir

LAYOUTS = {
    "rtn, block 32 (plain)": export.PLAIN,
    "k_quant_mixed, block 32": export.Int4Options(method="k_quant_mixed"),
    "k_quant_mixed, block 128": export.Int4Options(method="k_quant_mixed", block_size=128),
    "recommended (the default)": export.RECOMMENDED,
}


def logits(model: og.Model, chunks: list[list[int]]) -> np.ndarray:
    """The logits of every position, appending ``chunks`` one after another."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=sum(map(len, chunks)) + 8)
    generator = og.Generator(model, params)
    out = []
    for chunk in chunks:
        generator.append_tokens(chunk)
        out.append(np.array(generator.get_output("logits"))[0, -len(chunk) :])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=60, help="prompt length")
    args = parser.parse_args()
    checkpoint = cache_dir() / "demo" / "tiny-phi-3-mini-4k-random"
    if not (checkpoint / "config.json").exists():
        fixtures.write_random_checkpoint("phi-3-mini-4k", checkpoint, size="tiny")
    ids = [int(t) for t in np.random.default_rng(0).integers(100, 30000, args.tokens)]
    print(f"tiny random Phi-3-mini, {args.tokens}-token prompt; {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in LAYOUTS.items():
            folder = export.export(checkpoint, Path(tmp) / "m", int4=options, progress=None)
            model = og.Model(str(folder))
            whole = logits(model, [ids])
            gaps = {
                p: np.abs(logits(model, [ids[:p], ids[p:]]) - whole).max()
                for p in range(1, len(ids))
            }
            differ = [p for p, gap in gaps.items() if gap > 0]
            one_by_one = np.abs(logits(model, [[t] for t in ids]) - whole).max()
            print(
                f"{name:28} splits that differ: {differ or 'none'}; "
                f"largest difference {max(gaps.values()):.2g}; token by token {one_by_one:.2g}"
            )
            del model
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
