"""Micro-benchmark: phi3edge._sampling.sample against a straightforward NumPy sampling step.

Input: nothing (synthetic logits, normal(0, 3), so nucleus sets are realistically large).
Output: a table of per-row-step times on one core: the NumPy step, the C++ kernel (including the
Python call), their ratio, the kernel on a flat row (normal(0, 0.6), a random-weight model's
logits, where top_p keeps about two thirds of V), and the kernel's per-row time for batch sizes
1..16. It only needs ``phi3edge._sampling``, so another installed version can run it too.
Every feature is on: 10 biased ids, presence + frequency penalties over 100 generated tokens,
temperature 0.7, top_p 0.9, top_logprobs 20.

Structured output (``--structured``): the masking cost of one step of a JSON-schema answer, with
llguidance over the built-in tiny model's tokenizer (a generated stand-in of Phi-3's 32064-token
vocabulary: real weights and tokenizers cannot be downloaded here): computing the row's bitmask,
the kernel with the mask against without, and following the chosen token; per step, over the
steps of whole answers sampled from random logits.

    python scripts/bench_sampler.py [--vocab 32064] [--repeats 5] [--structured]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from phi3edge import _sampling

TEMPERATURE = 0.7
TOP_P = 0.9
TOP_LOGPROBS = 20
PRESENCE = 0.5
FREQUENCY = 0.3
N_BIAS = 10
N_GENERATED = 100
BATCHES = (1, 2, 4, 8, 16)


FLAT_SPREAD = 0.6  # std of a random-weight Phi-3's logits (the mid-size benchmark model's)


def numpy_step(
    logits: np.ndarray, bias: dict[int, float], counts: np.ndarray, rng: np.random.Generator
) -> tuple[int, float, np.ndarray, np.ndarray]:
    """The kernel's pipeline for one row, written the obvious way (float64, full sorts)."""
    x = logits.astype(np.float64)
    x[np.fromiter(bias, dtype=np.int64)] += np.fromiter(bias.values(), dtype=np.float64)
    x -= counts * FREQUENCY + (counts > 0) * PRESENCE
    shifted = x - x.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = np.lexsort((np.arange(x.size), -logprobs))[:TOP_LOGPROBS]
    probs = np.exp(shifted / TEMPERATURE)
    probs /= probs.sum()
    order = np.lexsort((np.arange(x.size), -probs))
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), TOP_P)) + 1]
    token = int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))
    return token, float(logprobs[token]), top, logprobs[top]


def best_mean_seconds(step: Callable[[], object], calls: int, repeats: int) -> float:
    """Best over `repeats` of the mean time of `calls` consecutive calls (robust on a busy box)."""
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        means.append((time.perf_counter() - start) / calls)
    return min(means)


class KernelStep:
    """One _sampling.sample call for a batch on fixed logits. Before each timed call every state
    is reset to the same 100 generated tokens (untimed), so that penalties do not pile up."""

    def __init__(self, batch: int, vocab: int, seed: int, spread: float = 3.0) -> None:
        rng = np.random.default_rng(seed)
        self.logits = rng.normal(0.0, spread, size=(batch, vocab)).astype(np.float32)
        bias_ids = rng.choice(vocab, size=N_BIAS, replace=False)
        bias_values = rng.uniform(-5.0, 5.0, size=N_BIAS)
        self.bias = {int(i): float(v) for i, v in zip(bias_ids, bias_values, strict=True)}
        self.generated = [int(t) for t in rng.integers(0, vocab, size=N_GENERATED)]
        params = _sampling.SamplingParams(
            temperature=TEMPERATURE,
            top_p=TOP_P,
            presence_penalty=PRESENCE,
            frequency_penalty=FREQUENCY,
            logit_bias=self.bias,
            top_logprobs=TOP_LOGPROBS,
        )
        self.params = [params] * batch
        self.states = [_sampling.RowState(vocab, seed=seed, row_index=r) for r in range(batch)]

    def prepare(self) -> None:
        for state in self.states:
            state.reset()
            for token in self.generated:
                state.accept(token)

    def seconds(self, calls: int, repeats: int) -> float:
        """Best over `repeats` of the mean time of `calls` calls."""
        means = []
        for _ in range(repeats):
            total = 0.0
            for _ in range(calls):
                self.prepare()
                start = time.perf_counter()
                _sampling.sample(self.logits, self.params, self.states)
                total += time.perf_counter() - start
            means.append(total / calls)
        return min(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--structured", action="store_true", help="also time JSON-schema masking (llguidance)"
    )
    args = parser.parse_args()

    single = KernelStep(1, args.vocab, seed=0)
    counts = np.zeros(args.vocab)
    np.add.at(counts, single.generated, 1.0)
    rng = np.random.default_rng(0)
    numpy_s = best_mean_seconds(
        lambda: numpy_step(single.logits[0], single.bias, counts, rng),
        calls=20,
        repeats=args.repeats,
    )
    kernel_s = single.seconds(calls=1000, repeats=args.repeats)
    # A random-weight model's row (logits with std 0.6): top_p keeps about two thirds of V.
    flat_s = KernelStep(1, args.vocab, seed=0, spread=FLAT_SPREAD).seconds(1000, args.repeats)

    print(f"phi3edge._sampling {_sampling.__version__}: one row-step, V={args.vocab}, one core")
    print(
        f"  temperature={TEMPERATURE} top_p={TOP_P} top_logprobs={TOP_LOGPROBS}, "
        f"{N_BIAS} biased ids, penalties over {N_GENERATED} generated tokens"
    )
    print()
    print(f"{'step':<30}{'time':>12}")
    print(f"{'numpy (float64, full sorts)':<30}{numpy_s * 1e3:>9.3f} ms")
    print(f"{'C++ kernel (incl. the call)':<30}{kernel_s * 1e6:>9.1f} us")
    print(f"{'ratio numpy / kernel':<30}{numpy_s / kernel_s:>10.0f} x")
    print(f"{'C++ kernel, flat row (std 0.6)':<30}{flat_s * 1e6:>9.1f} us")
    print()
    print(f"{'B':>4}{'per call':>14}{'per row':>12}{'per row vs B=1':>17}")
    per_row_b1 = 0.0
    for batch in BATCHES:
        step = KernelStep(batch, args.vocab, seed=batch)
        per_row = step.seconds(calls=max(100, 1000 // batch), repeats=args.repeats) / batch
        per_row_b1 = per_row_b1 or per_row
        print(
            f"{batch:>4}{per_row * batch * 1e6:>11.1f} us{per_row * 1e6:>9.1f} us"
            f"{per_row / per_row_b1:>16.2f}x"
        )
    if args.structured:
        structured_section(args.repeats)


def structured_section(repeats: int) -> None:
    """Per-step masking cost of JSON-schema answers (see the module docstring)."""
    from benchlib import JSON_ITEM_SCHEMA

    from phi3edge.cli import tiny_demo_model
    from phi3edge.guidance import Constraint, Grammar, GrammarTokenizer, mask_words

    folder = tiny_demo_model()
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    vocab = int(genai["vocab_size"])
    tokenizer = GrammarTokenizer(folder / "tokenizer.json", vocab, frozenset(genai["eos_token_id"]))
    started = time.perf_counter()
    tokenizer.get()
    build_s = time.perf_counter() - started
    compile_s = best_mean_seconds(
        lambda: Grammar.from_json_schema(JSON_ITEM_SCHEMA, "response_format"), 20, repeats
    )
    grammar = Grammar.from_json_schema(JSON_ITEM_SCHEMA, "response_format")
    rng = np.random.default_rng(0)
    params = [_sampling.SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, top_logprobs=5)]
    fill_s, plain_s, masked_s, accept_s = [], [], [], []
    for answer in range(repeats * 4):
        constraint = Constraint(grammar, tokenizer)
        state = [_sampling.RowState(vocab, seed=answer)]
        mask = np.empty((1, mask_words(vocab)), dtype=np.int32)
        for _ in range(400):
            logits = rng.normal(0.0, 3.0, size=(1, vocab)).astype(np.float32)
            t0 = time.perf_counter()
            constraint.fill(mask[0])
            t1 = time.perf_counter()
            _sampling.sample(logits, params, [_sampling.RowState(vocab, seed=0)])
            t2 = time.perf_counter()
            token = int(_sampling.sample(logits, params, state, mask).tokens[0])
            t3 = time.perf_counter()
            constraint.accept(token)
            t4 = time.perf_counter()
            fill_s.append(t1 - t0)
            plain_s.append(t2 - t1)
            masked_s.append(t3 - t2)
            accept_s.append(t4 - t3)
            if constraint.complete or token in genai["eos_token_id"]:
                break
    steps = len(fill_s)
    extra = np.asarray(fill_s) + np.asarray(masked_s) - np.asarray(plain_s) + np.asarray(accept_s)
    print()
    print(f"structured output: {repeats * 4} JSON-schema answers, {steps} steps, V={vocab}")
    print(f"  tokenizer for llguidance, built once per model: {build_s * 1e3:.0f} ms")
    print(f"  schema compiled, once per request: {compile_s * 1e3:.2f} ms")
    print(f"{'per step':<34}{'mean':>10}{'p95':>10}")
    for label, values in (
        ("bitmask (llguidance)", fill_s),
        ("kernel without mask", plain_s),
        ("kernel with mask", masked_s),
        ("follow the token (llguidance)", accept_s),
        ("masking cost (all but the kernel)", extra),
    ):
        values = np.asarray(values)
        print(
            f"{label:<34}{values.mean() * 1e6:>7.0f} us{np.percentile(values, 95) * 1e6:>7.0f} us"
        )


if __name__ == "__main__":
    main()
