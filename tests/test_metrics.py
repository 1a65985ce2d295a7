"""Tests for quant_eval.metrics: hand-computed cases, published values, the top-K KL bounds, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_eval.metrics import (
    MetricInputError,
    TopKLogProbs,
    accuracy_with_ci,
    choice_logprob_scores,
    delta_p,
    kl_divergence_full,
    kl_divergence_topk,
    kl_summary,
    ln_perplexity_ratio,
    log_softmax,
    paired_test,
    perplexity,
    perplexity_ratio,
    rms_delta_p,
    rms_delta_p_top,
    token_logprobs,
    top1_agreement,
    topk_from_logits,
)

# ----------------------------------------------------------------------------------------------------
# log-softmax and top-K


def test_log_softmax_is_stable_and_normalised() -> None:
    logits = np.array([[1e4, 1e4 - math.log(3.0)], [0.0, -np.inf]])
    lp = log_softmax(logits)
    assert np.allclose(lp[0], [math.log(0.75), math.log(0.25)])
    assert lp[1, 0] == 0.0 and np.isneginf(lp[1, 1])


def test_topk_from_logits_hand_case() -> None:
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]])) + 5.0  # shift must not matter
    top = topk_from_logits(logits, 2)
    assert top.ids.tolist() == [[3, 2]]
    assert top.ids.dtype == np.int32 and top.logprobs.dtype == np.float32
    assert np.allclose(top.logprobs, np.log([[0.4, 0.3]]), atol=1e-6)
    assert top.tail_mass[0] == pytest.approx(0.3, rel=1e-12)
    assert top.top1_ids.tolist() == [3]


def test_topk_ties_go_to_lowest_id() -> None:
    top = topk_from_logits(np.array([[0.0, 1.0, 1.0, 1.0]]), 2)
    assert top.ids.tolist() == [[1, 2]]


def test_topk_tail_mass_keeps_relative_precision_when_tiny() -> None:
    top = topk_from_logits(np.array([[0.0, -40.0, -41.0]]), 1)
    expected = (math.exp(-40.0) + math.exp(-41.0)) / (1.0 + math.exp(-40.0) + math.exp(-41.0))
    assert top.tail_mass[0] == pytest.approx(expected, rel=1e-12)


def test_topk_with_k_equal_vocab_has_zero_tail() -> None:
    top = topk_from_logits(np.random.default_rng(0).normal(size=(3, 7)), 7)
    assert np.all(top.tail_mass == 0.0)
    assert np.allclose(np.exp(top.logprobs.astype(np.float64)).sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("k", [0, 5, 2.0, True])
def test_topk_rejects_bad_k(k: object) -> None:
    with pytest.raises(MetricInputError, match="k must be"):
        topk_from_logits(np.zeros((1, 4)), k)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# exact KL


def test_kl_full_identical_is_zero_and_shift_invariant() -> None:
    logits = np.random.default_rng(1).normal(size=(4, 50)) * 3
    assert np.all(kl_divergence_full(logits, logits + 7.5) == pytest.approx(0.0, abs=1e-12))


def test_kl_full_hand_computed_pairs() -> None:
    ref = np.log(np.array([[0.5, 0.5, 1e-300], [0.7, 0.2, 0.1]]))
    cand = np.log(np.array([[0.25, 0.75, 1e-300], [0.6, 0.3, 0.1]]))
    kl = kl_divergence_full(ref, cand)
    assert kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-9)
    assert kl[1] == pytest.approx(0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3), rel=1e-9)


def test_kl_full_zero_reference_probability_contributes_nothing() -> None:
    ref = np.array([[0.0, -np.inf]])  # P = (1, 0)
    cand = np.array([[0.0, 0.0]])  # Q = (1/2, 1/2)
    assert kl_divergence_full(ref, cand)[0] == pytest.approx(math.log(2.0), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# top-K KL and its bounds


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Reference/candidate logits of varied shape: flat, normal, peaked; close or far candidates."""
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 300))
    scale = (0.05, 1.0, 4.0, 12.0)[seed % 4]
    ref = rng.normal(size=(4, vocab)) * scale
    noise = (0.01, 0.3, 3.0)[seed % 3]
    cand = ref + rng.normal(size=(4, vocab)) * noise
    if seed % 5 == 0:
        cand = rng.normal(size=(4, vocab)) * scale  # unrelated candidate
    k = int(rng.integers(1, vocab + 1))
    return ref, cand, k


@pytest.mark.parametrize("seed", range(120))
def test_topk_kl_bounds_contain_exact_kl(seed: int) -> None:
    ref, cand, k = _random_case(seed)
    bounds = kl_divergence_topk(topk_from_logits(ref, k), cand)
    exact = kl_divergence_full(ref, cand)
    slack = 1e-6 * (1 + exact)  # the cache stores log-probabilities as float32
    assert np.all(bounds.lower <= exact + slack)
    assert np.all(exact <= bounds.upper + slack)
    assert np.all(bounds.lower >= -slack)  # coarse-grained KL is a KL too
    assert np.array_equal(bounds.estimate, bounds.lower)


@pytest.mark.parametrize("seed", range(40))
def test_topk_kl_bounds_hold_at_float64_precision_for_a_matching_reference(seed: int) -> None:
    """A full P that agrees with the cache exactly (no float32 loss), so any violation is a bug."""
    rng = np.random.default_rng(1000 + seed)
    k = int(rng.integers(1, 6))
    p_top = np.sort(rng.dirichlet(np.full(k, 2.0)))[::-1] * rng.uniform(0.2, 0.95)
    logprobs32 = np.log(p_top).astype(np.float32)  # what the cache stores
    p_top = np.exp(logprobs32.astype(np.float64))
    p_tail = 1.0 - p_top.sum()
    cap = min(p_tail, p_top.min())
    n_tail = int(max(rng.integers(1, 300), math.ceil(2 * p_tail / cap)))
    w = rng.uniform(size=n_tail) ** (1 + seed % 6)
    spread = (w - w.mean()) / max(np.abs(w - w.mean()).max(), 1e-300)
    tail = p_tail / n_tail * (1 + rng.uniform(0, 1) * spread)  # in [0, 2 p_tail / n_tail] <= cap
    vocab = k + n_tail
    ids = rng.permutation(vocab)
    full = np.empty(vocab)
    full[ids[:k]] = p_top
    full[ids[k:]] = tail
    cache = TopKLogProbs(ids=ids[None, :k], logprobs=logprobs32[None], tail_mass=np.array([tail.sum()]))
    cand = rng.normal(size=(1, vocab)) * (0.3, 3.0)[seed % 2]
    with np.errstate(divide="ignore"):
        exact = kl_divergence_full(np.log(full)[None], cand)[0]
    bounds = kl_divergence_topk(cache, cand)
    assert bounds.lower[0] <= exact + 1e-12 * (1 + exact)
    assert exact <= bounds.upper[0] + 1e-12 * (1 + exact)


@pytest.mark.parametrize("seed", range(30))
def test_topk_kl_upper_bound_is_attained(seed: int) -> None:
    """The upper bound is the KL of the worst reference consistent with the cache: build it, compare."""
    rng = np.random.default_rng(2000 + seed)
    vocab, k = int(rng.integers(6, 150)), int(rng.integers(1, 5))
    ref_top = topk_from_logits(rng.normal(size=(1, vocab)) * (0.2, 1.5, 6.0)[seed % 3], k)
    cand = rng.normal(size=(1, vocab)) * 2
    p_top = np.exp(ref_top.logprobs[0].astype(np.float64))
    p_tail = 1.0 - p_top.sum()
    cap = min(p_tail, p_top.min())
    lq = log_softmax(cand)[0]
    tail_ids = np.setdiff1d(np.arange(vocab), ref_top.ids[0])
    by_q = tail_ids[np.argsort(lq[tail_ids], kind="stable")]  # least likely under Q first
    worst = np.zeros(vocab)
    worst[ref_top.ids[0]] = p_top
    n_full = int(p_tail // cap)
    worst[by_q[:n_full]] = cap
    if n_full < by_q.size:
        worst[by_q[n_full]] = p_tail - n_full * cap
    cache = TopKLogProbs(ids=ref_top.ids, logprobs=ref_top.logprobs, tail_mass=np.array([p_tail]))
    with np.errstate(divide="ignore"):
        attained = kl_divergence_full(np.log(worst)[None], cand)[0]
    assert kl_divergence_topk(cache, cand).upper[0] == pytest.approx(attained, rel=1e-9, abs=1e-12)


def test_topk_kl_with_k_equal_vocab_is_exact() -> None:
    rng = np.random.default_rng(7)
    ref, cand = rng.normal(size=(5, 40)) * 3, rng.normal(size=(5, 40)) * 3
    bounds = kl_divergence_topk(topk_from_logits(ref, 40), cand)
    exact = kl_divergence_full(ref, cand)
    assert np.allclose(bounds.estimate, exact, rtol=1e-5, atol=1e-7)
    assert np.array_equal(bounds.lower, bounds.upper)


def test_topk_kl_identical_models_is_zero() -> None:
    logits = np.random.default_rng(8).normal(size=(6, 100)) * 2
    bounds = kl_divergence_topk(topk_from_logits(logits, 10), logits)
    assert np.allclose(bounds.estimate, 0.0, atol=1e-6)
    assert np.all(bounds.upper >= bounds.lower)


def test_topk_kl_lumped_estimate_hand_case() -> None:
    # P = (0.5, 0.3, 0.1, 0.1), Q = (0.4, 0.4, 0.1, 0.1), K = 1 (token 0): tail P=0.5, Q=0.6.
    ref = topk_from_logits(np.log([[0.5, 0.3, 0.1, 0.1]]), 1)
    cand = np.log([[0.4, 0.4, 0.1, 0.1]])
    bounds = kl_divergence_topk(ref, cand)
    lumped = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert bounds.estimate[0] == pytest.approx(lumped, rel=1e-6)
    # worst case: 0.5 on token 1 (cap = min(0.5, 0.5)); the others 0 -> 0.5 ln(0.5/0.4) + 0.5 ln(0.5/0.1)
    worst = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.1)
    assert bounds.upper[0] == pytest.approx(worst, rel=1e-6)


def test_topk_kl_candidate_zero_where_reference_may_have_mass_gives_infinite_upper() -> None:
    ref = topk_from_logits(np.log([[0.6, 0.2, 0.2]]), 1)
    bounds = kl_divergence_topk(ref, np.array([[0.0, 0.0, -np.inf]]))
    assert math.isfinite(bounds.lower[0]) and math.isinf(bounds.upper[0])


# ----------------------------------------------------------------------------------------------------
# top-1, Δp, perplexity


def test_identical_models_give_neutral_scores() -> None:
    logits = np.random.default_rng(3).normal(size=(8, 30))
    ref = topk_from_logits(logits, 5)
    assert top1_agreement(ref.top1_ids, logits) == 1.0
    assert rms_delta_p_top(ref, logits) == pytest.approx(0.0, abs=1e-6)
    observed = np.arange(8) % 30
    lp = token_logprobs(logits, observed)
    assert rms_delta_p(lp, lp) == 0.0
    assert perplexity_ratio(lp, lp) == 1.0
    assert ln_perplexity_ratio(lp, lp) == (0.0, 0.0)


def test_top1_agreement_hand_case_and_inputs() -> None:
    ref_ids = np.array([0, 1, 2, 3])
    assert top1_agreement(ref_ids, np.array([0, 1, 0, 0])) == 0.5
    cand = np.array([[5.0, 5.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])  # row 0 tie -> index 0
    assert top1_agreement(np.array([0, 1, 1, 0]), cand) == 0.5


def test_delta_p_and_rms_hand_case() -> None:
    ref = np.log([0.5, 0.2])
    cand = np.log([0.4, 0.5])
    assert np.allclose(delta_p(ref, cand), [-0.1, 0.3])
    assert rms_delta_p(ref, cand) == pytest.approx(math.sqrt((0.01 + 0.09) / 2), rel=1e-12)


def test_rms_delta_p_top_hand_case() -> None:
    ref = topk_from_logits(np.log([[0.6, 0.4], [0.1, 0.9]]), 1)
    cand = np.log([[0.5, 0.5], [0.3, 0.7]])  # top-1 tokens 0 and 1: Δp = -0.1, -0.2
    assert rms_delta_p_top(ref, cand) == pytest.approx(math.sqrt((0.01 + 0.04) / 2), rel=1e-6)


def test_perplexity_and_ratio() -> None:
    assert perplexity(np.full(5, math.log(0.25))) == pytest.approx(4.0, rel=1e-12)
    ref = np.log([0.5, 0.25, 0.125])
    assert perplexity(ref) == pytest.approx(4.0, rel=1e-12)  # geometric mean of 2, 4, 8
    assert perplexity_ratio(ref - 0.1, ref) == pytest.approx(math.exp(0.1), rel=1e-12)
    value, stderr = ln_perplexity_ratio(ref - np.array([0.0, 0.2, 0.1]), ref)
    # differences 0, 0.2, 0.1: mean 0.1, population variance 0.02/3, stderr sqrt(var / 2)
    assert value == pytest.approx(0.1, rel=1e-12)
    assert stderr == pytest.approx(math.sqrt(0.02 / 3 / 2), rel=1e-9)


# ----------------------------------------------------------------------------------------------------
# KL summary


def test_kl_summary_known_array() -> None:
    s = kl_summary(np.array([4.0, 1.0, 3.0, 2.0]))
    assert s["n"] == 4
    assert s["mean"] == 2.5 and s["median"] == 2.5 and s["max"] == 4.0
    # linear interpolation at rank q * (n - 1) of [1, 2, 3, 4]: rank 2.7 -> 3.7, 2.97 -> 3.97, 2.997
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    assert s["p999"] == pytest.approx(3.997) and s["p95"] == pytest.approx(3.85)
    assert s["mean_stderr"] == pytest.approx(math.sqrt(1.25 / 3))


def test_kl_summary_single_value() -> None:
    s = kl_summary([0.02])
    assert s["n"] == 1 and s["mean_stderr"] == 0.0 and s["p999"] == 0.02


# ----------------------------------------------------------------------------------------------------
# task accuracy


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),
        # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_published_values(k: int, n: int, low: float, high: float) -> None:
    acc, lo, hi = accuracy_with_ci(np.arange(n) < k)
    assert acc == k / n
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_widens_with_confidence_and_hits_one() -> None:
    correct = np.array([1, 1, 0, 1, 1, 1, 0, 1])
    _, lo95, hi95 = accuracy_with_ci(correct, 0.95)
    _, lo99, hi99 = accuracy_with_ci(correct, 0.99)
    assert lo99 < lo95 < hi95 < hi99
    assert accuracy_with_ci(np.ones(10, dtype=bool))[2] == 1.0


def test_mcnemar_exact_known_tables() -> None:
    cand = [True] * 1 + [False] * 9 + [True] * 5
    ref = [False] * 1 + [True] * 9 + [True] * 5  # b = 1, c = 9, 5 concordant
    result = paired_test(cand, ref)
    assert (result["b"], result["c"], result["n"]) == (1, 9, 15)
    assert result["p_value"] == pytest.approx(2 * (1 + 10) / 2**10, rel=1e-15)
    assert paired_test([0, 0, 0, 0, 0], [1, 1, 1, 1, 1])["p_value"] == pytest.approx(2 / 32)
    assert paired_test([1, 0, 1, 0], [0, 1, 0, 1])["p_value"] == 1.0  # b == c
    assert paired_test([1, 1, 0], [1, 1, 0])["p_value"] == 1.0  # no discordant pairs
    big = paired_test(np.zeros(1000, dtype=bool), np.ones(1000, dtype=bool))["p_value"]
    assert 0.0 < big == pytest.approx(2.0**-999, rel=1e-12)


def test_choice_scores_argmax_ties_and_length_normalisation() -> None:
    assert choice_logprob_scores([-5.0, -2.0, -2.0, -9.0])[0] == 1  # tie -> lowest index
    index, scores = choice_logprob_scores([-6.0, -4.0], lengths=[6, 2])
    assert index == 0 and np.allclose(scores, [-1.0, -2.0])
    assert choice_logprob_scores([-4.0, -6.0])[0] == 0


# ----------------------------------------------------------------------------------------------------
# invalid input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kl_divergence_full(np.zeros((2, 3)), np.zeros((2, 4))), "equal shape"),
        (lambda: kl_divergence_full(np.zeros((0, 3)), np.zeros((0, 3))), "empty"),
        (lambda: kl_divergence_full(np.array([[0.0, np.nan]]), np.zeros((1, 2))), "NaN"),
        (lambda: kl_divergence_full(np.array([[-np.inf, -np.inf]]), np.zeros((1, 2))), "entirely -inf"),
        (lambda: kl_divergence_topk(topk_from_logits(np.zeros((2, 4)), 2), np.zeros((3, 4))), "positions"),
        (lambda: kl_divergence_topk(topk_from_logits([[0, 0, 0, 1.0]], 2), np.zeros((1, 3))), "vocabulary"),
        (lambda: kl_divergence_topk(topk_from_logits(np.zeros((1, 4)), 2), [[0, 0, np.nan, 0]]), "NaN"),
        (lambda: kl_divergence_topk(np.zeros((1, 4)), np.zeros((1, 4))), "TopKLogProbs"),
        (lambda: TopKLogProbs(np.array([[0, 0]]), np.log([[0.5, 0.5]]), np.array([0.0])), "repeats"),
        (lambda: TopKLogProbs(np.array([[0, 1]]), np.log([[0.5, 0.2]]), np.array([0.0])), "sum to"),
        (lambda: TopKLogProbs(np.array([[0, 1]]), np.log([[0.5, 0.5]]), np.array([0.0, 0.0])), "positions"),
        (lambda: TopKLogProbs(np.array([[0.0, 1.0]]), np.log([[0.5, 0.5]]), np.array([0.0])), "integer"),
        (lambda: TopKLogProbs(np.array([[0, 1]]), np.array([[0.5, -1.0]]), np.array([0.0])), "> 0"),
        (lambda: TopKLogProbs(np.array([[0, 1]]), np.log([[0.5, 0.5]]), np.array([1.5])), r"\[0, 1\]"),
        (lambda: token_logprobs(np.zeros((2, 3)), np.array([0, 3])), "vocabulary size"),
        (lambda: token_logprobs(np.zeros((2, 3)), np.array([0, -1])), "negative"),
        (lambda: top1_agreement(np.array([0, 1]), np.array([0])), "positions"),
        (lambda: top1_agreement(np.array([], dtype=int), np.array([], dtype=int)), "empty"),
        (lambda: rms_delta_p(np.log([0.5]), np.log([0.5, 0.5])), "positions"),
        (lambda: perplexity(np.array([])), "empty"),
        (lambda: perplexity(np.array([-1.0, np.nan])), "NaN"),
        (lambda: perplexity(np.array([0.5])), "> 0"),
        (lambda: ln_perplexity_ratio(np.log([0.5]), np.log([0.5, 0.5])), "positions"),
        (lambda: kl_summary(np.array([])), "empty"),
        (lambda: kl_summary(np.array([[0.1]])), "1-D"),
        (lambda: kl_summary(np.array([0.1, np.nan])), "NaN"),
        (lambda: accuracy_with_ci(np.array([], dtype=bool)), "empty"),
        (lambda: accuracy_with_ci(np.array([True]), confidence=1.5), "confidence"),
        (lambda: accuracy_with_ci(np.array([0, 2])), "booleans"),
        (lambda: paired_test(np.array([True]), np.array([True, False])), "positions"),
        (lambda: choice_logprob_scores([]), "empty"),
        (lambda: choice_logprob_scores([-1.0, np.nan]), "NaN"),
        (lambda: choice_logprob_scores([-1.0, -2.0], lengths=[1]), "positions"),
        (lambda: choice_logprob_scores([-1.0, -2.0], lengths=[1, 0]), "> 0"),
    ],
)
def test_invalid_input_raises_clear_error(call, message: str) -> None:
    with pytest.raises(MetricInputError, match=message) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_chunked_processing_matches_whole_array(monkeypatch: pytest.MonkeyPatch) -> None:
    import medgemma_gguf.quant_eval.metrics as metrics

    rng = np.random.default_rng(11)
    ref = (rng.normal(size=(7, 20)) * 2).astype(np.float32)
    cand = (ref + rng.normal(size=(7, 20))).astype(np.float32)
    ids = rng.integers(0, 20, size=7)
    whole_kl = kl_divergence_full(ref, cand)
    whole_lp = token_logprobs(cand, ids)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 45)  # 2 rows per chunk, last chunk of 1
    assert np.array_equal(kl_divergence_full(ref, cand), whole_kl)
    assert np.array_equal(token_logprobs(cand, ids), whole_lp)
    direct = log_softmax(cand.astype(np.float64))[np.arange(7), ids]
    assert np.allclose(whole_lp, direct, rtol=0, atol=1e-12)
