"""phi3edge._sampling, the C++ sampling kernel (csrc/).

A NumPy reference of the pipeline is checked against the kernel on random inputs (hypothesis);
tiny hand-computed distributions pin each step (one case per test); sampling frequencies are
checked with a chi-square bound; every invalid input must raise ValueError and never crash.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi3edge import _sampling
from phi3edge._sampling import RowState, SamplingParams, force_logits, sample

# ------------------------------------------------------------------------------------------------
# NumPy reference
# ------------------------------------------------------------------------------------------------


def reference_processed(logits: np.ndarray, params: SamplingParams, counts: dict[int, int]):
    """Steps 1-2 on one row, rounded to float32 after each step as the kernel stores them, so
    that rankings (and ties) can be compared exactly; returned as float64."""
    x = logits.astype(np.float32).copy()
    for token, bias in params.logit_bias.items():
        x[token] = np.float32(np.float64(x[token]) + bias)
    for token, count in counts.items():
        delta = count * params.frequency_penalty + params.presence_penalty
        x[token] = np.float32(np.float64(x[token]) - delta)
    return x.astype(np.float64)


def reference_masked(x: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Step 2b: tokens the constraint does not allow become -inf."""
    return x if allowed is None else np.where(allowed, x, -np.inf)


def pack_mask(allowed: np.ndarray, junk_seed: int | None = None) -> np.ndarray:
    """bool [B, V] -> int32 words [B, ceil(V / 32)], bit j of word j // 32 = token j (llguidance's
    layout, written with numpy's own bit packing). junk_seed sets random bits beyond V."""
    rows, vocab = allowed.shape
    words = (vocab + 31) // 32
    bits = np.zeros((rows, words * 32), dtype=bool)
    bits[:, :vocab] = allowed
    if junk_seed is not None:
        bits[:, vocab:] = np.random.default_rng(junk_seed).random((rows, words * 32 - vocab)) < 0.5
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32).reshape(rows, words)


def reference_logprobs(x: np.ndarray) -> np.ndarray:
    """Step 3: log-softmax at temperature 1, in float64."""
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def reference_ranking(x: np.ndarray) -> np.ndarray:
    """Ids by value descending, ties by id ascending."""
    return np.lexsort((np.arange(x.size), -x))


def reference_kept(x: np.ndarray, params: SamplingParams, slack: float = 0.0):
    """Steps 4-6 for temperature > 0: (kept ids best first, their renormalised probabilities).
    slack widens top_p so that a float-rounding tie at the boundary keeps the extra token."""
    order = reference_ranking(x)
    if 0 < params.top_k < x.size:
        order = order[: params.top_k]
    probs = np.exp((x[order] - x.max()) / params.temperature)
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), min(1.0, params.top_p + slack))) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return order, probs


MASK64 = 2**64 - 1


def rotl64(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


def splitmix64_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def reference_uniforms(seed: int, row_index: int, count: int) -> list[float]:
    """The stream documented in csrc/rng.hpp, written independently in Python."""
    x = splitmix64_mix(splitmix64_mix(seed & MASK64) ^ row_index)
    s = []
    for _ in range(4):
        x = (x + 0x9E3779B97F4A7C15) & MASK64
        s.append(splitmix64_mix(x))
    draws = []
    for _ in range(count):
        result = (rotl64((s[1] * 5) & MASK64, 7) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl64(s[3], 45)
        draws.append((result >> 11) * 2.0**-53)
    return draws


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def states_for(rows: int, vocab: int, seed: int = 1234) -> list[RowState]:
    return [RowState(vocab, seed=seed, row_index=r) for r in range(rows)]


def one_step(logits, params: SamplingParams | None = None, state: RowState | None = None):
    """One call on a single row (logits 1-D)."""
    row = np.asarray(logits, dtype=np.float32)[None, :]
    state = state if state is not None else RowState(row.shape[1], seed=0)
    return sample(row, [params or SamplingParams()], [state])


def frequencies(logits, params: SamplingParams, draws: int, seed: int = 7) -> np.ndarray:
    """Chosen-token frequencies over `draws` independent rows (streams (seed, 0..draws-1))."""
    row = np.asarray(logits, dtype=np.float32)
    batch = np.repeat(row[None, :], draws, axis=0)
    out = sample(batch, [params] * draws, states_for(draws, row.size, seed))
    return np.bincount(out.tokens, minlength=row.size) / draws


# chi-square with <= 5 degrees of freedom stays below 30 with probability > 0.99999.
CHI_SQUARE_BOUND = 30.0


def assert_distribution(observed: np.ndarray, expected: dict[int, float], draws: int) -> None:
    """Frequencies match `expected` (token -> probability; all others must never occur)."""
    expected_full = np.zeros_like(observed)
    for token, p in expected.items():
        expected_full[token] = p
    assert observed[expected_full == 0].sum() == 0, "a token outside the kept set was drawn"
    support = expected_full > 0
    counts, means = observed[support] * draws, expected_full[support] * draws
    chi_square = float(((counts - means) ** 2 / means).sum())
    assert chi_square < CHI_SQUARE_BOUND, (chi_square, observed[support], expected_full[support])


LOG_P = np.log([0.1, 0.2, 0.3, 0.4])  # softmax(LOG_P) == [0.1, 0.2, 0.3, 0.4]


# ------------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------------


def test_version_matches_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert _sampling.__version__ == tomllib.loads(pyproject.read_text())["project"]["version"]


def test_params_are_read_only_and_keep_their_values() -> None:
    params = SamplingParams(
        temperature=0.5,
        top_p=0.25,
        top_k=7,
        presence_penalty=-1.5,
        frequency_penalty=2.0,
        logit_bias={3: 0.1, 1: -100},
        top_logprobs=20,
    )
    assert (params.temperature, params.top_p, params.top_k) == (0.5, 0.25, 7)
    assert (params.presence_penalty, params.frequency_penalty) == (-1.5, 2.0)
    assert params.logit_bias == {1: -100.0, 3: 0.1}
    assert params.top_logprobs == 20
    assert params.logprobs  # the default: the chosen token's logprob is reported
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]
    assert "top_p=0.25" in repr(params)


# ------------------------------------------------------------------------------------------------
# hand-computed tiny distributions, one case per test
# ------------------------------------------------------------------------------------------------


def test_greedy_takes_the_argmax_and_reports_its_logprob() -> None:
    out = one_step(LOG_P, SamplingParams(temperature=0.0))
    assert out.tokens.tolist() == [3]
    assert out.logprobs[0] == pytest.approx(math.log(0.4), abs=1e-5)


def test_greedy_tie_goes_to_the_lowest_id() -> None:
    out = one_step([1.0, 3.0, 3.0, 2.0, 3.0], SamplingParams(temperature=0.0))
    assert out.tokens.tolist() == [1]


def test_top_logprobs_are_sorted_by_logprob_then_id() -> None:
    out = one_step(np.log([0.2, 0.3, 0.3, 0.2]), SamplingParams(temperature=0.0, top_logprobs=4))
    assert out.top_ids.tolist() == [[1, 2, 0, 3]]
    expected = np.log([0.3, 0.3, 0.2, 0.2])
    np.testing.assert_allclose(out.top_logprobs[0], expected, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_without_logprobs_the_same_tokens_are_chosen_and_no_logprob_is_made(
    temperature: float,
) -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 2.0, size=(16, 3000)).astype(np.float32)
    rows = len(logits)

    def run(**kwargs: int | bool):
        params = [SamplingParams(temperature=temperature, top_p=0.9, **kwargs)] * rows
        return sample(logits, params, states_for(rows, logits.shape[1]))

    reported, silent = run(), run(logprobs=False)
    assert silent.tokens.tolist() == reported.tokens.tolist()
    assert np.isnan(silent.logprobs).all() and np.isfinite(reported.logprobs).all()
    with_top, silent_with_top = run(top_logprobs=3), run(logprobs=False, top_logprobs=3)
    assert silent_with_top.tokens.tolist() == with_top.tokens.tolist()
    np.testing.assert_array_equal(silent_with_top.logprobs, with_top.logprobs)  # still made
    assert not SamplingParams(logprobs=False).logprobs and SamplingParams().logprobs


@pytest.mark.parametrize("spread", [0.6, 3.0])  # a random-weight model's flat rows; peaked ones
@pytest.mark.parametrize(  # a top_k in use at least top_logprobs (see sample())
    ("temperature", "top_p", "top_k"),
    [(0.7, 0.9, 0), (1.0, 0.5, 0), (1.3, 0.95, 0), (0.5, 1.0, 0), (0.8, 0.9, 40)],
)
def test_how_many_alternatives_are_reported_never_changes_the_draw(
    spread: float, temperature: float, top_p: float, top_k: int
) -> None:
    logits = np.random.default_rng(11).normal(0.0, spread, size=(64, 32064)).astype(np.float32)
    rows = len(logits)

    def tokens(top_logprobs: int, logprobs: bool = True) -> list[int]:
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            top_logprobs=top_logprobs,
            logprobs=logprobs,
        )
        return sample(logits, [params] * rows, states_for(rows, 32064)).tokens.tolist()

    alone = tokens(0, logprobs=False)
    assert len(set(alone)) > rows // 2  # the rows draw, not all the same best token
    for top_logprobs in (1, 5, 20):
        assert tokens(top_logprobs) == alone, top_logprobs


def test_alternatives_pair_each_rows_used_slots() -> None:
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], np.float32))
    params = [SamplingParams(temperature=0.0, top_logprobs=3), SamplingParams(top_logprobs=1)]
    out = sample(logits, params, states_for(2, 4))
    for row, used in enumerate([3, 1]):
        ids, logprobs = out.top_ids[row, :used].tolist(), out.top_logprobs[row, :used].tolist()
        expected = list(zip(ids, logprobs, strict=True))
        assert out.alternatives(row) == tuple(expected)
    assert [pair[0] for pair in out.alternatives(0)] == [3, 2, 1]
    assert out.alternatives(1)[0][1] == pytest.approx(math.log(0.4), abs=1e-5)
    for row in (-1, 2):
        with pytest.raises(IndexError, match="out of range"):
            out.alternatives(row)
    assert sample(logits, [SamplingParams()] * 2, states_for(2, 4)).alternatives(0) == ()


def test_reported_logprobs_ignore_temperature_and_truncation() -> None:
    params = SamplingParams(temperature=0.3, top_k=1, top_logprobs=2)
    out = one_step(LOG_P, params)
    assert out.tokens.tolist() == [3]
    assert out.logprobs[0] == pytest.approx(math.log(0.4), abs=1e-5)
    np.testing.assert_allclose(out.top_logprobs[0], np.log([0.4, 0.3]), atol=1e-5)


def test_temperature_one_samples_the_softmax() -> None:
    draws = 20000
    observed = frequencies(LOG_P, SamplingParams(), draws)
    assert_distribution(observed, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, draws)


def test_temperature_half_squares_the_probabilities() -> None:
    draws = 20000
    observed = frequencies(LOG_P, SamplingParams(temperature=0.5), draws)
    p = np.array([0.01, 0.04, 0.09, 0.16]) / 0.30
    assert_distribution(observed, dict(enumerate(p)), draws)


def test_top_k_two_keeps_the_two_best() -> None:
    draws = 20000
    observed = frequencies(LOG_P, SamplingParams(top_k=2), draws)
    assert_distribution(observed, {3: 0.4 / 0.7, 2: 0.3 / 0.7}, draws)


def test_top_p_keeps_the_smallest_prefix_reaching_it() -> None:
    draws = 20000
    observed = frequencies(LOG_P, SamplingParams(top_p=0.75), draws)
    assert_distribution(observed, {3: 0.4 / 0.9, 2: 0.3 / 0.9, 1: 0.2 / 0.9}, draws)


def test_top_p_below_the_best_probability_keeps_only_the_best() -> None:
    observed = frequencies(LOG_P, SamplingParams(top_p=0.3), 2000)
    assert observed.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_top_p_applies_to_the_renormalised_top_k() -> None:
    # top_k=3 keeps [0.4, 0.3, 0.2] / 0.9; cumulative 0.44, 0.78 -> top_p=0.6 keeps two.
    draws = 20000
    observed = frequencies(LOG_P, SamplingParams(top_k=3, top_p=0.6), draws)
    assert_distribution(observed, {3: 4 / 7, 2: 3 / 7}, draws)


def test_top_p_with_temperature_uses_the_tempered_distribution() -> None:
    # temperature 0.5: [1, 4, 9, 16] / 30; cumulative 0.53, 0.83 -> top_p=0.8 keeps two.
    draws = 20000
    observed = frequencies(LOG_P, SamplingParams(temperature=0.5, top_p=0.8), draws)
    assert_distribution(observed, {3: 16 / 25, 2: 9 / 25}, draws)


def test_full_row_sampling_across_groups() -> None:
    # V = 600 spans three groups of 256; the mass sits on tokens in different groups.
    logits = np.full(600, -200.0)
    hot = {5: 0.1, 255: 0.2, 256: 0.3, 599: 0.4}
    for token, p in hot.items():
        logits[token] = math.log(p)
    draws = 20000
    assert_distribution(frequencies(logits, SamplingParams(), draws), hot, draws)


def test_flat_row_nucleus_is_exact() -> None:
    # All logits equal: ranking is by id, and top_p=0.5 keeps exactly the first half.
    out = sample(
        np.zeros((64, 5000), np.float32), [SamplingParams(top_p=0.5)] * 64, states_for(64, 5000)
    )
    assert out.tokens.max() < 2500
    assert out.logprobs == pytest.approx(-math.log(5000), abs=1e-5)


@pytest.mark.parametrize(
    ("spread", "temperature", "top_p", "quantum"),
    [
        (0.6, 0.7, 0.9, 0.0),  # the mid-size benchmark model's rows
        (0.6, 0.7, 0.9, 0.125),  # 0.125: ties straddle the boundary
        (0.3, 1.0, 0.5, 0.0),
        (1.5, 0.7, 0.95, 0.0),  # weights that vary steeply across the boundary
        (2.0, 1.0, 0.9, 0.0),
    ],
)
def test_flat_nucleus_over_phi3s_vocabulary_matches_the_reference(
    spread: float, temperature: float, top_p: float, quantum: float
) -> None:
    # A random-weight model's row (std 0.6 over V = 32064): top_p 0.9 keeps about two thirds of
    # the vocabulary, so the kernel finds the boundary over the whole row, not from candidates
    # (it does whenever the nucleus outnumbers the row's 2004 columns of 16 tokens).
    vocab, draws = 32064, 3000
    row = np.random.default_rng(5).normal(0.0, spread, vocab).astype(np.float32)
    if quantum:
        row = (np.round(row / quantum) * quantum).astype(np.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_logprobs=5)
    kept, probs = reference_kept(row.astype(np.float64), params)
    assert vocab // 16 < kept.size < vocab
    seed = 1234
    states = states_for(draws, vocab, seed)
    out = sample(np.repeat(row[None], draws, 0), [params] * draws, states)
    ranking = reference_ranking(row)
    assert (out.top_ids == ranking[:5]).all()
    rank_of = np.full(vocab, -1)
    rank_of[kept] = np.arange(kept.size)
    ranks = rank_of[out.tokens]
    assert (ranks >= 0).all(), "a token outside the nucleus was drawn"
    # The kernel draws inverse-CDF in id order over the nucleus with the row's first uniform, so
    # each draw can be replayed: a nucleus cut a token short or long shifts every later draw.
    # Float rounding may move a draw sitting on a token's edge by one position.
    by_id = np.sort(kept)
    cdf = np.cumsum(probs[np.argsort(kept)])
    expected = [
        int(np.searchsorted(cdf, reference_uniforms(seed, r, 1)[0] * cdf[-1], side="right"))
        for r in range(200)
    ]
    drawn = np.searchsorted(by_id, out.tokens[:200])
    assert np.abs(drawn - np.minimum(expected, kept.size - 1)).max() <= 1
    # Ten slices of the nucleus holding equal probability each get a tenth of the draws.
    edges = np.searchsorted(np.cumsum(probs), np.linspace(0.1, 0.9, 9))
    counts = np.bincount(np.searchsorted(edges, ranks, side="right"), minlength=10)
    means = np.diff(np.concatenate([[0.0], np.cumsum(probs)[edges], [1.0]])) * draws
    chi_square = float(((counts - means) ** 2 / means).sum())
    assert chi_square < 2 * CHI_SQUARE_BOUND, (counts, means)  # 9 degrees of freedom


def test_bias_plus_100_forces_a_token() -> None:
    observed = frequencies(np.zeros(5), SamplingParams(logit_bias={2: 100.0}), 500)
    assert observed.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


def test_bias_minus_100_bans_a_token() -> None:
    params = SamplingParams(logit_bias={0: -100.0, 3: -100.0}, temperature=2.0)
    observed = frequencies(np.zeros(5), params, 5000)
    assert observed[0] == observed[3] == 0.0
    assert observed[[1, 2, 4]].min() > 0.25


def test_bias_changes_the_reported_logprobs() -> None:
    params = SamplingParams(temperature=0.0, logit_bias={0: math.log(4.0)}, top_logprobs=2)
    out = one_step(np.zeros(4), params)  # exp: [4, 1, 1, 1] / 7
    assert out.tokens.tolist() == [0]
    np.testing.assert_allclose(out.top_logprobs[0], np.log([4 / 7, 1 / 7]), atol=1e-5)
    assert out.top_ids.tolist() == [[0, 1]]


# ------------------------------------------------------------------------------------------------
# penalties and counts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_penalties_change_exactly_the_generated_tokens(sign: float) -> None:
    vocab = 8
    logits = np.tile(np.linspace(0.0, 1.0, vocab, dtype=np.float32), (2, 1))
    params = SamplingParams(
        temperature=0.0,
        top_logprobs=vocab,
        presence_penalty=0.25 * sign,
        frequency_penalty=0.5 * sign,
    )
    penalised, untouched = RowState(vocab), RowState(vocab)
    for token in (3, 3, 6):
        penalised.accept(token)
    out = sample(logits, [params, params], [penalised, untouched])
    processed = np.empty((2, vocab))
    for row in range(2):
        processed[row, out.top_ids[row]] = out.top_logprobs[row]
    shift = processed[0] - processed[1]  # per token; the same constant where nothing changed
    base = shift[0]
    expected = np.full(vocab, base)
    expected[3] -= sign * (2 * 0.5 + 0.25)
    expected[6] -= sign * (1 * 0.5 + 0.25)
    np.testing.assert_allclose(shift, expected, atol=1e-5)
    np.testing.assert_allclose(processed[1], reference_logprobs(logits[1].astype(float)), atol=1e-5)


def test_penalties_hand_computed() -> None:
    state = RowState(4)
    for token in (0, 0, 1):
        state.accept(token)
    params = SamplingParams(
        temperature=0.0, top_logprobs=4, presence_penalty=0.25, frequency_penalty=0.5
    )
    out = one_step(np.zeros(4), params, state)
    weights = np.array([math.exp(-1.25), math.exp(-0.75), 1.0, 1.0])
    assert out.top_ids.tolist() == [[2, 3, 1, 0]]
    np.testing.assert_allclose(
        out.top_logprobs[0], np.log(weights / weights.sum())[[2, 3, 1, 0]], atol=1e-5
    )


def test_counts_are_incremental_and_reset_clears_them() -> None:
    state = RowState(10, seed=3)
    state.accept(4)
    state.accept(4)
    assert [state.count(t) for t in range(10)] == [0, 0, 0, 0, 2, 0, 0, 0, 0, 0]
    out = one_step(np.eye(10)[7] * 50, SamplingParams(temperature=0.0), state)
    assert out.tokens.tolist() == [7]
    assert (state.count(4), state.count(7)) == (2, 1)
    state.reset()
    assert sum(state.count(t) for t in range(10)) == 0
    assert state.vocab_size == 10


# ------------------------------------------------------------------------------------------------
# reproducibility
# ------------------------------------------------------------------------------------------------


def run_stream(seed: int | None, row_index: int, steps: int = 40) -> list[int]:
    state = RowState(50, seed=seed, row_index=row_index)
    logits = np.zeros((1, 50), np.float32)
    return [int(sample(logits, [SamplingParams()], [state]).tokens[0]) for _ in range(steps)]


def test_same_seed_and_row_give_the_same_stream() -> None:
    assert run_stream(42, 0) == run_stream(42, 0)
    assert run_stream(-(2**63), 3) == run_stream(-(2**63), 3)


def test_rows_and_seeds_give_different_streams() -> None:
    assert run_stream(42, 0) != run_stream(42, 1)
    assert run_stream(42, 0) != run_stream(43, 0)
    assert run_stream(None, 0) != run_stream(None, 0)


def test_reset_restarts_the_stream() -> None:
    state = RowState(50, seed=9)
    logits = np.zeros((1, 50), np.float32)
    first = [int(sample(logits, [SamplingParams()], [state]).tokens[0]) for _ in range(20)]
    state.reset()
    again = [int(sample(logits, [SamplingParams()], [state]).tokens[0]) for _ in range(20)]
    assert first == again


@pytest.mark.parametrize(("seed", "row_index"), [(0, 0), (2024, 5), (-1, 1), (-(2**63), 7)])
def test_stream_is_the_documented_xoshiro(seed: int, row_index: int) -> None:
    # Equal logits: the draw u picks token floor(u * V) exactly, so tokens reveal the stream.
    # Greedy steps consume their draw too (one draw per row per step).
    vocab = 4096
    state = RowState(vocab, seed=seed, row_index=row_index)
    logits = np.zeros((1, vocab), np.float32)
    tokens = []
    for step in range(12):
        params = SamplingParams(temperature=0.0 if step % 3 == 2 else 1.0)
        tokens.append(int(sample(logits, [params], [state]).tokens[0]))
    expected = [
        0 if step % 3 == 2 else int(u * vocab)
        for step, u in enumerate(reference_uniforms(seed, row_index, 12))
    ]
    assert tokens == expected


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_rows_are_independent_with_their_own_params(batch: int) -> None:
    vocab = 300
    rng = np.random.default_rng(batch)
    logits = rng.normal(0.0, 2.0, size=(batch, vocab)).astype(np.float32)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(logit_bias={17: 100.0}),
        SamplingParams(temperature=0.0, top_logprobs=3),
        SamplingParams(top_k=1, top_logprobs=5),
    ]
    row_params = [params[r % len(params)] for r in range(batch)]
    out = sample(logits, row_params, states_for(batch, vocab))
    k = max(p.top_logprobs for p in row_params)
    assert out.top_ids.shape == out.top_logprobs.shape == (batch, k)
    for r in range(batch):
        ranking = reference_ranking(logits[r].astype(np.float64))
        expected = 17 if r % 4 == 1 else int(ranking[0])
        assert out.tokens[r] == expected
        used = row_params[r].top_logprobs
        assert out.top_ids[r, :used].tolist() == ranking[:used].tolist()
        assert (out.top_ids[r, used:] == -1).all()
        assert np.isneginf(out.top_logprobs[r, used:]).all()


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_callers_logits_are_not_modified(batch: int) -> None:
    logits = np.random.default_rng(0).normal(size=(batch, 40)).astype(np.float32)
    before = logits.copy()
    states = states_for(batch, 40)
    for state in states:
        state.accept(3)
    params = SamplingParams(logit_bias={5: 10.0}, presence_penalty=1.0, frequency_penalty=1.0)
    sample(logits, [params] * batch, states)
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_three_dimensional_logits_and_non_contiguous_rows(batch: int) -> None:
    logits = np.random.default_rng(1).normal(size=(batch, 1, 64)).astype(np.float32)
    greedy = [SamplingParams(temperature=0.0)] * batch
    expected = logits[:, 0, :].argmax(axis=1).tolist()
    assert sample(logits, greedy, states_for(batch, 64)).tokens.tolist() == expected
    wide = np.repeat(logits, 3, axis=1)  # [B, 3, V]; the last position is not contiguous as [B, V]
    assert sample(wide[:, -1, :], greedy, states_for(batch, 64)).tokens.tolist() == expected


@pytest.mark.parametrize("batch", [1, 2, 16])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_force_logits_makes_greedy_take_the_token(batch: int, dtype: type) -> None:
    tokens = np.arange(batch, dtype=dtype) * 3 % 50
    forced = force_logits(tokens, 50)
    assert forced.dtype == np.float32 and forced.shape == (batch, 50)
    assert (forced[np.arange(batch), tokens] == 0.0).all()
    assert (np.sort(forced, axis=1)[:, :-1] == np.finfo(np.float32).min).all()
    out = sample(forced, [SamplingParams(temperature=0.0)] * batch, states_for(batch, 50))
    assert out.tokens.tolist() == tokens.tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, top_logprobs=3),
        SamplingParams(top_logprobs=3),
        SamplingParams(temperature=2.0, top_p=0.5, top_k=2, top_logprobs=3),
        SamplingParams(temperature=1e-30, top_p=0.999),
    ],
)
def test_extreme_finite_logits(params: SamplingParams) -> None:
    lowest, highest = np.finfo(np.float32).min, np.finfo(np.float32).max
    logits = np.array([[lowest, highest, 0.0, lowest], [0.0, 0.0, lowest, 0.0]], np.float32)
    state = RowState(4, seed=1)
    state.accept(1)  # penalties near the float limit stay finite
    penalised = SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        frequency_penalty=-2.0,
        top_logprobs=params.top_logprobs,
    )
    out = sample(logits, [penalised, params], [state, RowState(4, seed=2)])
    assert out.tokens[0] == 1
    assert out.logprobs[0] == 0.0
    assert out.tokens[1] in (0, 1, 3)
    assert not np.isnan(out.top_logprobs).any()
    if params.top_logprobs:
        assert out.top_ids[0].tolist() == [1, 2, 0]
        assert np.isneginf(out.top_logprobs[0, 2])


def test_concurrent_calls_on_distinct_states_match_sequential_ones() -> None:
    logits = np.random.default_rng(3).normal(0.0, 3.0, size=(4, 5000)).astype(np.float32)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_logprobs=5)] * 4

    def run(seed: int) -> list[list[int]]:
        states = states_for(4, 5000, seed)
        return [sample(logits, params, states).tokens.tolist() for _ in range(30)]

    expected = {seed: run(seed) for seed in range(4)}
    results: dict[int, list[list[int]]] = {}
    threads = [
        threading.Thread(target=lambda s=seed: results.__setitem__(s, run(s))) for seed in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


# ------------------------------------------------------------------------------------------------
# the allowed-token mask (structured output)
# ------------------------------------------------------------------------------------------------


def test_mask_keeps_greedy_off_the_argmax_and_renormalises_logprobs() -> None:
    allowed = np.array([[True, True, True, False]])  # the argmax (3) is not allowed
    params = SamplingParams(temperature=0.0, top_logprobs=4)
    out = sample(np.asarray([LOG_P], np.float32), [params], [RowState(4)], pack_mask(allowed))
    assert out.tokens.tolist() == [2]
    assert out.logprobs[0] == pytest.approx(math.log(0.3 / 0.6), abs=1e-5)
    # only allowed tokens are reported; the unused slots are empty
    assert out.top_ids.tolist() == [[2, 1, 0, -1]]
    np.testing.assert_allclose(out.top_logprobs[0, :3], np.log([0.5, 1 / 3, 1 / 6]), atol=1e-5)


def test_mask_samples_the_renormalised_distribution() -> None:
    draws = 20000
    allowed = np.repeat(np.array([[True, False, True, False]]), draws, axis=0)
    batch = np.repeat(np.asarray([LOG_P], np.float32), draws, axis=0)
    out = sample(batch, [SamplingParams()] * draws, states_for(draws, 4), pack_mask(allowed))
    observed = np.bincount(out.tokens, minlength=4) / draws
    assert_distribution(observed, {0: 0.25, 2: 0.75}, draws)


def test_mask_beats_a_plus_100_bias_and_a_single_allowed_token_is_forced() -> None:
    vocab = 1000
    logits = np.random.default_rng(3).normal(size=(2, vocab)).astype(np.float32)
    allowed = np.zeros((2, vocab), dtype=bool)
    allowed[0, 777] = True
    allowed[1, [5, 999]] = True
    params = [SamplingParams(logit_bias={1: 100.0}), SamplingParams(temperature=0.0, top_k=1)]
    for _ in range(20):
        out = sample(logits, params, states_for(2, vocab), pack_mask(allowed, junk_seed=1))
        assert out.tokens[0] == 777 and out.logprobs[0] == 0.0
        assert out.tokens[1] in (5, 999)


def test_rows_without_a_mask_are_unconstrained_with_all_bits_set() -> None:
    logits = np.asarray([LOG_P, LOG_P], np.float32)
    masks = np.full((2, 1), -1, dtype=np.int32)
    masks[1] = pack_mask(np.array([[True, False, False, False]]))
    out = sample(logits, [SamplingParams(temperature=0.0)] * 2, states_for(2, 4), masks)
    assert out.tokens.tolist() == [3, 0]
    unsigned = sample(
        logits, [SamplingParams(temperature=0.0)] * 2, states_for(2, 4), masks.view(np.uint32)
    )
    assert unsigned.tokens.tolist() == [3, 0]


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        (np.zeros((2, 1), dtype=np.int32), ValueError, "row 0 allows no token"),
        (np.full((2, 1), -1, dtype=np.int64), ValueError, "int32 or uint32"),
        (np.full((2, 2), -1, dtype=np.int32), ValueError, r"shape \(2, 1\)"),
        (np.full((1, 1), -1, dtype=np.int32), ValueError, r"shape \(2, 1\)"),
        (np.full(2, -1, dtype=np.int32), ValueError, "shape"),
        ([[-1], [-1]], TypeError, "numpy int32 or uint32 array"),
    ],
)
def test_invalid_masks_raise_and_change_no_state(masks, error: type, match: str) -> None:
    logits, params, states = good_call(vocab=16)
    with pytest.raises(error, match=match):
        sample(logits, params, states, masks)
    assert all(sum(s.count(t) for t in range(16)) == 0 for s in states)


def test_a_mask_that_clears_only_bits_beyond_the_vocabulary_changes_nothing() -> None:
    logits, params, states = good_call(vocab=40)
    masks = np.full((2, 2), -1, dtype=np.int32)
    masks[:, 1] = 0xFF  # tokens 32..39 allowed, the 24 bits beyond 40 cleared
    assert (
        sample(logits, params, states, masks).tokens.tolist()
        == sample(*good_call(vocab=40)).tokens.tolist()
    )


# ------------------------------------------------------------------------------------------------
# the NumPy reference on random inputs
# ------------------------------------------------------------------------------------------------


@st.composite
def sampling_cases(draw: st.DrawFn):
    rows = draw(st.integers(1, 3))
    vocab = draw(st.one_of(st.integers(1, 40), st.integers(200, 700)))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 3.0, 30.0]))
    quantum = draw(st.sampled_from([0.0, 0.5]))  # 0.5 makes many exact ties
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, size=(rows, vocab)).astype(np.float32)
    if quantum:
        logits = (np.round(logits / quantum) * quantum).astype(np.float32)
    ids = st.integers(0, vocab - 1)
    params = [
        SamplingParams(
            temperature=draw(st.sampled_from([0.0, 0.05, 0.7, 1.0, 2.0])),
            top_p=draw(st.sampled_from([1.0, 0.95, 0.5, 0.1])),
            top_k=draw(st.sampled_from([0, 1, 3, vocab, vocab + 5])),
            presence_penalty=draw(st.floats(-2.0, 2.0)),
            frequency_penalty=draw(st.floats(-2.0, 2.0)),
            logit_bias=draw(st.dictionaries(ids, st.floats(-100.0, 100.0), max_size=4)),
            top_logprobs=draw(st.integers(0, 20)),
        )
        for _ in range(rows)
    ]
    history = [draw(st.lists(ids, max_size=12)) for _ in range(rows)]
    allowed = None
    if draw(st.booleans()):  # a constraint mask: sparse, half or nearly full, never empty
        density = draw(st.sampled_from([0.0, 0.02, 0.5, 0.98]))
        allowed = rng.random((rows, vocab)) < density
        allowed[np.arange(rows), rng.integers(0, vocab, size=rows)] = True
    return logits, params, history, allowed


@settings(max_examples=150, deadline=None)
@given(sampling_cases())
def test_kernel_matches_the_numpy_reference(case) -> None:
    logits, params, history, allowed = case
    rows, vocab = logits.shape
    states = states_for(rows, vocab)
    for state, tokens in zip(states, history, strict=True):
        for token in tokens:
            state.accept(token)
    masks = None if allowed is None else pack_mask(allowed, junk_seed=vocab)
    out = sample(logits, params, states, masks)
    k = max(p.top_logprobs for p in params)
    assert out.top_ids.shape == (rows, k)
    for r in range(rows):
        counts = {t: history[r].count(t) for t in set(history[r])}
        x = reference_processed(logits[r], params[r], counts)
        x = reference_masked(x, None if allowed is None else allowed[r])
        logprobs, ranking = reference_logprobs(x), reference_ranking(x)
        token = int(out.tokens[r])
        assert np.isfinite(x[token]), "a masked token was chosen"
        assert out.logprobs[r] == pytest.approx(logprobs[token], abs=1e-4)
        used = min(params[r].top_logprobs, int(np.isfinite(x).sum()))
        assert out.top_ids[r, :used].tolist() == ranking[:used].tolist()
        np.testing.assert_allclose(out.top_logprobs[r, :used], logprobs[ranking[:used]], atol=1e-4)
        assert (out.top_ids[r, used:] == -1).all()
        if params[r].temperature == 0.0:
            assert token == ranking[0]
        else:
            kept, _ = reference_kept(x, params[r], slack=1e-4)
            assert token in kept.tolist()
        assert states[r].count(token) == counts.get(token, 0) + 1


# ------------------------------------------------------------------------------------------------
# invalid input: ValueError, never a crash, and no state changes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: 100.5}}, "logit_bias"),
        ({"logit_bias": {1: math.nan}}, "logit_bias"),
        ({"logit_bias": {2**70: 1.0}}, "logit_bias"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_out_of_range_params_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_params_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0,), "vocab_size"),
        ((-5,), "vocab_size"),
        ((2**31,), "vocab_size"),
        ((10, 2**63), "seed"),
        ((10, -(2**63) - 1), "seed"),
        ((10, 1, -1), "row_index"),
    ],
)
def test_bad_row_state_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RowState(*args)


@pytest.mark.parametrize("token", [-1, 10, 2**40])
def test_accept_and_count_reject_out_of_range_tokens(token: int) -> None:
    state = RowState(10)
    with pytest.raises(ValueError, match="out of range"):
        state.accept(token)
    with pytest.raises(ValueError, match="out of range"):
        state.count(token)


def good_call(batch: int = 2, vocab: int = 16):
    logits = np.random.default_rng(0).normal(size=(batch, vocab)).astype(np.float32)
    return logits, [SamplingParams()] * batch, states_for(batch, vocab)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_name_the_row(bad: float) -> None:
    logits, params, states = good_call(batch=3)
    logits[2, 5] = bad
    with pytest.raises(ValueError, match="row 2"):
        sample(logits, params, states)
    assert all(sum(s.count(t) for t in range(16)) == 0 for s in states)
    logits[2, 5] = 0.0
    assert (
        sample(logits, params, states).tokens.tolist()
        == sample(*good_call(batch=3)).tokens.tolist()
    )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, p, s: (x.astype(np.float64), p, s), "float32"),
        (lambda x, p, s: (x.astype(np.float16), p, s), "float32"),
        (lambda x, p, s: (x.astype(np.int32), p, s), "float32"),
        (lambda x, p, s: (x.astype(">f4"), p, s), "float32"),
        (lambda x, p, s: (x[0], p, s), "shape"),
        (lambda x, p, s: (x[None], p, s), "shape"),
        (lambda x, p, s: (np.stack([x, x], axis=1), p, s), "shape"),
        (lambda x, p, s: (x[:0], [], []), "shape"),
        (lambda x, p, s: (x[:, :0], p, s), "shape"),
        (lambda x, p, s: (x, p[:1], s), "params"),
        (lambda x, p, s: (x, p, s[:1]), "states"),
        (lambda x, p, s: (x, p, [s[0], s[0]]), "same RowState"),
        (lambda x, p, s: (x, p, [s[0], RowState(17)]), "vocab_size"),
        (lambda x, p, s: (x, [p[0], SamplingParams(logit_bias={16: 1.0})], s), "logit_bias id 16"),
    ],
)
def test_invalid_sample_calls_raise_value_error(mutate, match: str) -> None:
    logits, params, states = good_call()
    with pytest.raises(ValueError, match=match):
        sample(*mutate(logits, params, states))
    assert all(sum(s.count(t) for t in range(16)) == 0 for s in states)


def test_wrong_object_types_raise_type_error() -> None:
    logits, params, states = good_call()
    with pytest.raises(TypeError, match="numpy float32 array"):
        sample(logits.tolist(), params, states)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="numpy int32 or int64 array"):
        force_logits([1, 2], 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sample(logits, [params[0], "greedy"], states)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        sample(logits, params, [states[0], None])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("tokens", "vocab", "match"),
    [
        (np.array([0, 50], np.int32), 50, "tokens\\[1\\]"),
        (np.array([-1], np.int64), 50, "tokens\\[0\\]"),
        (np.array([0.0], np.float32), 50, "int32 or int64"),
        (np.array([[1]], np.int64), 50, "shape"),
        (np.array([1], np.int64), 0, "vocab_size"),
    ],
)
def test_bad_force_logits_input(tokens: np.ndarray, vocab: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        force_logits(tokens, vocab)
