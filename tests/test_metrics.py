"""Tests for quant_eval.metrics: hand-computed cases, published values, the coverage cache and its exact KL
bracket, llama.cpp's statistics, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_eval.metrics import (
    ROUNDOFF_KL,
    CoveredLogProbs,
    MetricInputError,
    accuracy_with_ci,
    brackets_overlap,
    choice_logprob_scores,
    clamp_roundoff,
    cover_from_logits,
    delta_p,
    delta_p_statistics,
    kl_divergence_covered,
    kl_divergence_full,
    kld_statistics,
    ln_perplexity_ratio,
    log_softmax,
    paired_test,
    perplexity,
    perplexity_ratio,
    rms_delta_p,
    rms_delta_p_top,
    same_top_statistics,
    score_candidate,
    token_logprobs,
    top1_agreement,
)

# ----------------------------------------------------------------------------------------------------
# log-softmax and top-K


def test_log_softmax_is_stable_and_normalised() -> None:
    logits = np.array([[1e4, 1e4 - math.log(3.0)], [0.0, -np.inf]])
    lp = log_softmax(logits)
    assert np.allclose(lp[0], [math.log(0.75), math.log(0.25)])
    assert lp[1, 0] == 0.0 and np.isneginf(lp[1, 1])


def _pad(logits: np.ndarray, vocab: int = 64, low: float = -200.0) -> np.ndarray:
    """``logits`` widened with tokens of negligible probability, so a set of a few tokens stays below half the
    vocabulary (where the cache would store the whole row instead)."""
    return np.concatenate([logits, np.full((logits.shape[0], vocab - logits.shape[1]), low)], axis=1).astype(np.float32)


def test_coverage_keeps_the_smallest_set_whose_tail_is_small_enough() -> None:
    # P_T · max(1, ln(m / p_min)) per k: k=1 2.30, k=2 0.818, k=3 0.254, k=4 0.0832, k=5 0.035; k=6 is half
    # the vocabulary of 12 (a whole row is smaller)
    p = np.array([0.5, 0.3, 0.12, 0.04] + [0.005] * 8)
    logits = (np.log(p) + 3.0).astype(np.float32)[None]  # a shift must not matter
    for epsilon, expected in ((0.9, [0, 1]), (0.3, [0, 1, 2]), (0.1, [0, 1, 2, 3]), (0.04, [0, 1, 2, 3, 4])):
        cover = cover_from_logits(logits, epsilon, min_tokens=1)
        assert cover.ids.tolist() == expected and not cover.dense_rows[0], epsilon
        assert cover.tail_mass[0] == pytest.approx(p[len(expected):].sum(), rel=1e-6)
        _, lp = cover.row(0)
        assert np.allclose(lp, np.log(p[expected]), rtol=0, atol=1e-6)
    whole = cover_from_logits(logits, 0.01, min_tokens=1)  # 6 tokens = half the vocabulary: stored whole
    assert whole.dense_rows.tolist() == [True] and whole.ids is None and whole.tail_mass[0] == 0.0
    assert whole.set_sizes.tolist() == [12] and np.array_equal(whole.logits, logits[0])
    floor = cover_from_logits(logits, 0.9, min_tokens=4)
    assert floor.ids.tolist() == [0, 1, 2, 3]
    # a set that would exceed the cap: the row is stored whole (exact), not capped with a wide tail
    capped = cover_from_logits(logits, 0.1, min_tokens=1, max_tokens=3)
    assert capped.dense_rows.tolist() == [True] and np.array_equal(capped.row(0)[0], np.arange(12))


def _expected_cover(row: np.ndarray, epsilon: float, floor: int, cap: int) -> list[int] | None:
    """The rule of cover_from_logits, one k at a time (None: the row is stored whole)."""
    vocab = row.size
    order = sorted(range(vocab), key=lambda i: (-float(row[i]), i))
    p = np.exp(row.astype(np.float64) - np.log(np.exp(row.astype(np.float64)).sum()))
    smallest = float(row.min())
    for k in range(min(floor, vocab), vocab + 1):
        left_out = float(p[order[k:]].sum())
        if left_out * max(1.0, float(row[order[k - 1]]) - smallest) <= epsilon:
            return None if k > cap or 2 * k >= vocab else sorted(order[:k])
    return None


@pytest.mark.parametrize("seed", range(40))
def test_coverage_follows_its_rule_on_random_rows(seed: int) -> None:
    rng = np.random.default_rng(500 + seed)
    vocab = int(rng.integers(4, 400))
    logits = (rng.normal(size=(3, vocab)) * (0.1, 1.0, 3.0, 8.0)[seed % 4]).astype(np.float32)
    epsilon, floor = float(10.0 ** -rng.uniform(0.5, 7)), int(rng.integers(1, 5))
    cap = int(rng.integers(floor, vocab + 2))
    cover = cover_from_logits(logits, epsilon, min_tokens=floor, max_tokens=cap)
    for n in range(3):
        expected = _expected_cover(logits[n], epsilon, floor, cap)
        assert bool(cover.dense_rows[n]) == (expected is None)
        if expected is not None:
            assert cover.row(n)[0].tolist() == expected


def test_coverage_stores_exact_probabilities_and_tiny_tails() -> None:
    logits = _pad(np.array([[0.0, -40.0, -41.0, 3.5, 3.5]]), vocab=16)
    cover = cover_from_logits(logits, 1e-12, min_tokens=1)
    assert cover.ids.tolist() == [0, 3, 4]  # stored in id order
    lse = np.log(np.exp(logits[0].astype(np.float64)).sum())
    assert cover.lse[0] == pytest.approx(lse, rel=1e-15)
    assert cover.tail_mass[0] == pytest.approx((math.exp(-40.0) + math.exp(-41.0)) / math.exp(lse), rel=1e-12)
    assert cover.top1_ids.tolist() == [3]  # equal probabilities: the lower id, as argmax
    assert cover.top1_logprobs[0] == pytest.approx(3.5 - lse, rel=1e-15)
    assert cover.logits.dtype == np.float32 and np.array_equal(cover.logits, logits[0, [0, 3, 4]])
    boundary = cover_from_logits(_pad(np.array([[2.0, 1.0, 1.0, 1.0]]), vocab=16, low=0.5), 0.65, min_tokens=1)
    assert boundary.ids.tolist() == [0, 1, 2]  # ties at the boundary: the lowest ids are kept


def test_full_vocab_is_dense_and_exact() -> None:
    rng = np.random.default_rng(5)
    ref = (rng.normal(size=(5, 40)) * 3).astype(np.float32)
    cand = (rng.normal(size=(5, 40)) * 3).astype(np.float32)
    dense = cover_from_logits(ref, 0.0)
    assert dense.dense and dense.ids is None and np.all(dense.tail_mass == 0.0) and np.all(dense.set_sizes == 40)
    bounds = kl_divergence_covered(dense, cand)
    assert np.array_equal(bounds.lower, bounds.upper)
    assert np.allclose(bounds.estimate, kl_divergence_full(ref, cand), rtol=1e-12, atol=1e-15)
    assert dense.top1_ids.tolist() == np.argmax(ref, axis=1).tolist()


def test_take_and_concatenate_keep_rows_intact() -> None:
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(6, 50)) * rng.uniform(0.1, 8, size=(6, 1))).astype(np.float32)
    whole = cover_from_logits(logits, 1e-3, min_tokens=2)
    halves = CoveredLogProbs.concatenate([cover_from_logits(logits[:2], 1e-3, min_tokens=2),
                                          cover_from_logits(logits[2:], 1e-3, min_tokens=2)])
    assert np.array_equal(halves.offsets, whole.offsets) and np.array_equal(halves.ids, whole.ids)
    picked = whole.take([4, 1])
    for new, old in ((0, 4), (1, 1)):
        assert np.array_equal(picked.row(new)[0], whole.row(old)[0])
        assert np.array_equal(picked.row(new)[1], whole.row(old)[1])
    assert picked.tail_mass.tolist() == [whole.tail_mass[4], whole.tail_mass[1]]


@pytest.mark.parametrize("epsilon", [-0.1, 1.0, True, "1e-4"])
def test_coverage_rejects_bad_epsilon(epsilon: object) -> None:
    with pytest.raises(MetricInputError, match="epsilon"):
        cover_from_logits(np.zeros((1, 4), dtype=np.float32), epsilon)  # type: ignore[arg-type]


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
# KL from the coverage cache and its exact bracket


def _shaped_logits(shape: str, rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """Reference logits: peaked (one clear winner), flat (near uniform), heavy-tailed (Zipf-like ranks)."""
    if shape == "peaked":
        logits = rng.normal(size=(n, vocab)) * 2.0
        logits[np.arange(n), rng.integers(0, vocab, size=n)] += 14.0
    elif shape == "flat":
        logits = rng.normal(size=(n, vocab)) * 0.1
    else:  # heavy-tailed: ln p ~ -1.1 ln(rank), ranks shuffled per row, plus noise
        ranks = np.argsort(rng.random(size=(n, vocab)), axis=1) + 1
        logits = -1.1 * np.log(ranks) + rng.normal(size=(n, vocab)) * 0.3
    return logits.astype(np.float32)


@pytest.mark.parametrize("shape", ["peaked", "flat", "heavy-tailed"])
@pytest.mark.parametrize("noise", [0.05, 0.5])
def test_bracket_contains_exact_kl_and_shrinks_as_epsilon_falls(shape: str, noise: float) -> None:
    rng = np.random.default_rng(["peaked", "flat", "heavy-tailed"].index(shape) * 100 + int(noise * 100))
    ref = _shaped_logits(shape, rng, 12, 3000)
    cand = (ref + rng.normal(size=ref.shape) * noise).astype(np.float32)
    exact = kl_divergence_full(ref, cand)
    widths = []
    for epsilon in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
        cover = cover_from_logits(ref, epsilon, min_tokens=1)
        bounds = kl_divergence_covered(cover, cand)
        # the stored probabilities are exact: only float64 summation error remains, and |KL| < 1e-9 reads as 0
        slack = ROUNDOFF_KL + 1e-12 * exact
        assert np.all(bounds.lower <= exact + slack) and np.all(exact <= bounds.upper + slack), epsilon
        assert np.array_equal(bounds.estimate, bounds.lower) and np.all(bounds.lower >= 0)
        whole = cover.dense_rows  # rows stored whole: the exact KL, no bracket
        assert np.array_equal(bounds.lower[whole], bounds.upper[whole])
        assert np.allclose(bounds.lower[whole], exact[whole], rtol=1e-12, atol=ROUNDOFF_KL)
        widths.append(bounds.upper - bounds.lower)
    for wider, narrower in zip(widths, widths[1:], strict=False):  # a larger stored set only narrows it
        assert np.all(narrower <= wider + 1e-12)
    assert widths[-1].mean() < widths[0].mean() / 10 or widths[0].mean() == 0.0


@pytest.mark.parametrize("seed", range(60))
def test_bracket_contains_exact_kl_on_varied_shapes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 300))
    ref = (rng.normal(size=(4, vocab)) * (0.05, 1.0, 4.0, 12.0)[seed % 4]).astype(np.float32)
    cand = (ref + rng.normal(size=ref.shape) * (0.01, 0.3, 3.0)[seed % 3]).astype(np.float32)
    if seed % 5 == 0:
        cand = rng.permutation(ref, axis=1)  # an unrelated candidate
    epsilon = float(10.0 ** -rng.uniform(0.5, 8))
    bounds = kl_divergence_covered(cover_from_logits(ref, epsilon, min_tokens=int(rng.integers(1, 4))), cand)
    exact = kl_divergence_full(ref, cand)
    slack = ROUNDOFF_KL + 1e-12 * exact
    assert np.all(bounds.lower <= exact + slack) and np.all(exact <= bounds.upper + slack)


@pytest.mark.parametrize("seed", range(30))
def test_upper_bound_is_attained_by_a_reference_consistent_with_the_cache(seed: int) -> None:
    """The upper end is the KL of the worst reference consistent with the cache: build it, compare."""
    rng = np.random.default_rng(2000 + seed)
    vocab = int(rng.integers(6, 150))
    ref = (rng.normal(size=(1, vocab)) * (0.2, 1.5, 6.0)[seed % 3]).astype(np.float32)
    cover = cover_from_logits(ref, float(rng.uniform(0.05, 0.6)), min_tokens=1)
    cand = (rng.normal(size=(1, vocab)) * 2).astype(np.float32)
    if cover.dense_rows[0]:  # stored whole: the upper end is the exact KL, attained by the reference itself
        bounds = kl_divergence_covered(cover, cand)
        assert bounds.upper[0] == bounds.lower[0] == pytest.approx(kl_divergence_full(ref, cand)[0], rel=1e-12)
        return
    ids, lp = cover.row(0)
    p_top, p_tail = np.exp(lp), float(cover.tail_mass[0])
    cap = min(p_tail, p_top.min())
    lq = log_softmax(cand.astype(np.float64))[0]
    tail_ids = np.setdiff1d(np.arange(vocab), ids)
    by_q = tail_ids[np.argsort(lq[tail_ids], kind="stable")]  # least likely under Q first
    worst = np.zeros(vocab)
    worst[ids] = p_top
    n_full = int(p_tail // cap)
    worst[by_q[:n_full]] = cap
    if n_full < by_q.size:
        worst[by_q[n_full]] = p_tail - n_full * cap
    with np.errstate(divide="ignore"):
        attained = kl_divergence_full(np.log(worst)[None], cand)[0]
    assert kl_divergence_covered(cover, cand).upper[0] == pytest.approx(attained, rel=1e-9, abs=1e-12)


def _flat_tailed_logits(rng: np.random.Generator, n: int, vocab: int, head: int) -> np.ndarray:
    """MedGemma-width-like rows as in the widened benchmark fixture: a peaked head of ``head`` tokens and a
    long, nearly flat tail over the rest of the vocabulary holding about half the probability."""
    logits = rng.normal(size=(n, vocab)) * 0.05 - math.log(vocab - head)  # the tail: ~1/(V - head) each, ~1/2 total
    heads = rng.integers(0, vocab, size=(n, head))
    weights = np.log(rng.dirichlet(np.ones(head), size=n))  # the head: the other half
    np.put_along_axis(logits, heads, weights, axis=1)
    return logits.astype(np.float32)


def test_flat_tail_beyond_the_cap_is_stored_whole_and_ranks_quants_five_percent_apart() -> None:
    """The benchmark fixture's failure mode: a flat tail that no capped set can cover. Those rows are stored
    whole, so their KL is exact; covered rows keep a bracket of about ε nats; at ε = 1e-4 two Q4-class
    candidates (KL ~5e-3) whose KL differs by 5 % are told apart."""
    rng = np.random.default_rng(21)
    vocab, cap, epsilon = 20_000, 2_500, 1e-4  # the cap at 1/8 of the vocabulary, as 65,536 of 262,208
    ref = _flat_tailed_logits(rng, 10, vocab, head=40)
    peaked = np.stack([rng.permutation(-0.05 * np.arange(vocab)) for _ in range(4)])  # rows that stay covered
    ref = np.concatenate([ref, peaked]).astype(np.float32)
    noise = rng.normal(size=ref.shape) * 0.1
    cand_a = (ref + noise).astype(np.float32)
    cand_b = (ref + noise * math.sqrt(1.05)).astype(np.float32)  # KL ~ σ²: about 5 % more
    cover = cover_from_logits(ref, epsilon, max_tokens=cap)
    assert cover.dense_rows[:10].all() and not cover.dense_rows[10:].any()
    assert cover.set_sizes[10:].max() < cap and np.all(cover.tail_mass[10:] <= epsilon)
    means = []
    for cand in (cand_a, cand_b):
        exact = kl_divergence_full(ref, cand)
        bounds = kl_divergence_covered(cover, cand)
        assert np.all(bounds.lower <= exact + 1e-12) and np.all(exact <= bounds.upper + 1e-12)
        np.testing.assert_allclose(bounds.lower[:10], exact[:10], rtol=1e-12)
        np.testing.assert_array_equal(bounds.lower[:10], bounds.upper[:10])
        assert np.all(bounds.upper[10:] - bounds.lower[10:] <= 2 * epsilon)  # about ε nats a covered row
        means.append((float(bounds.lower.mean()), float(bounds.upper.mean())))
    assert means[1][0] / means[0][0] == pytest.approx(1.05, abs=0.01)
    assert (means[0][1] - means[0][0]) / means[0][0] < 0.01  # the bracket: under 1 % of the KL
    assert not brackets_overlap(means[0], means[1])


def test_rows_stored_whole_and_covered_rows_mix_in_one_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import medgemma_gguf.quant_eval.metrics as metrics

    rng = np.random.default_rng(22)
    ref = np.concatenate([_shaped_logits("flat", rng, 3, 400), _shaped_logits("peaked", rng, 3, 400)])
    ref = ref[[3, 0, 4, 1, 5, 2]]  # interleaved: covered, whole, covered, ...
    cand = (ref + rng.normal(size=ref.shape) * 0.2).astype(np.float32)
    cover = cover_from_logits(ref, 1e-2)
    assert cover.dense_rows.tolist() == [False, True] * 3 and cover.n_dense == 3
    assert cover.ids.size == cover.set_sizes[~cover.dense_rows].sum()  # ids only for the covered rows
    assert cover.top1_ids.tolist() == np.argmax(ref, axis=1).tolist()
    np.testing.assert_allclose(cover.top1_logprobs, log_softmax(ref.astype(np.float64)).max(axis=1), rtol=1e-12)
    for n in range(6):
        ids, lp = cover.row(n)
        np.testing.assert_allclose(lp, log_softmax(ref[n].astype(np.float64))[ids], rtol=0, atol=1e-12)
    whole = cover.take([3, 0, 1])
    assert whole.dense_rows.tolist() == [True, False, True] and np.array_equal(whole.row(2)[1], cover.row(1)[1])
    again = CoveredLogProbs.concatenate([cover.take([0, 1, 2]), cover.take([3, 4, 5])])
    assert np.array_equal(again.logits, cover.logits) and np.array_equal(again.ids, cover.ids)
    assert np.array_equal(again.dense_rows, cover.dense_rows)
    dense_only = CoveredLogProbs.concatenate([cover.take([1]), cover.take([3])])
    assert dense_only.ids is None and dense_only.dense
    expected = kl_divergence_covered(cover, cand)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 900)  # blocks of 2 rows and of single rows
    blocked = score_candidate(cover, cand)
    np.testing.assert_array_equal(blocked.bounds.lower, expected.lower)
    np.testing.assert_array_equal(blocked.bounds.upper, expected.upper)
    exact = kl_divergence_full(ref, cand)
    np.testing.assert_allclose(expected.lower[cover.dense_rows], exact[cover.dense_rows], rtol=1e-12)
    assert np.all(expected.lower <= exact + 1e-12) and np.all(exact <= expected.upper + 1e-12)


def test_self_comparison_is_exactly_zero() -> None:
    logits = _shaped_logits("peaked", np.random.default_rng(8), 6, 500)
    cover = cover_from_logits(logits, 1e-3)
    assert cover.dense_rows.any() and not cover.dense_rows.all()  # some rows need half the vocabulary: whole
    bounds = kl_divergence_covered(cover, logits)
    assert np.all(bounds.estimate == 0.0) and np.all(bounds.lower == 0.0)
    assert np.all(bounds.upper[cover.dense_rows] == 0.0)  # stored whole: exact
    assert np.all(bounds.upper >= 0.0) and bounds.upper.max() > 0.0  # a covered tail could still hide a difference
    assert np.all(kl_divergence_covered(cover_from_logits(logits, 0.0), logits).upper == 0.0)
    flat = _shaped_logits("flat", np.random.default_rng(9), 6, 500)  # every row stored whole: exactly 0 both ends
    whole = cover_from_logits(flat, 1e-3)
    assert whole.dense_rows.all()
    assert np.all(kl_divergence_covered(whole, flat).upper == 0.0)


def test_roundoff_clamp_is_only_for_values_below_1e_9() -> None:
    values = np.array([-9.9e-10, 4e-10, 0.0, -2e-9, 1.1e-9, 0.3])
    assert clamp_roundoff(values).tolist() == [0.0, 0.0, 0.0, -2e-9, 1.1e-9, 0.3]


def test_lumped_estimate_and_worst_case_hand_case() -> None:
    # P = (0.5, 0.3, 0.1, 0.1), Q = (0.4, 0.4, 0.1, 0.1), only token 0 stored: tail P = 0.5, Q = 0.6.
    # (ε = 0.81: P_T · ln(m / p_min) = 0.5 ln 5 = 0.805 when only token 0 is kept)
    cover = cover_from_logits(np.log([[0.5, 0.3, 0.1, 0.1]]).astype(np.float32), 0.81, min_tokens=1)
    assert cover.ids.tolist() == [0]
    bounds = kl_divergence_covered(cover, np.log([[0.4, 0.4, 0.1, 0.1]]))
    lumped = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert bounds.estimate[0] == pytest.approx(lumped, rel=1e-6)
    # worst case: 0.5 on token 1 (cap = min(0.5, 0.5)); the others 0 -> 0.5 ln(0.5/0.4) + 0.5 ln(0.5/0.1)
    worst = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.1)
    assert bounds.upper[0] == pytest.approx(worst, rel=1e-6)


def test_candidate_zero_where_reference_may_have_mass_gives_infinite_upper() -> None:
    cover = cover_from_logits(np.log([[0.6, 0.2, 0.2]]).astype(np.float32), 0.45, min_tokens=1)
    bounds = kl_divergence_covered(cover, np.array([[0.0, 0.0, -np.inf]]))
    assert math.isfinite(bounds.lower[0]) and math.isinf(bounds.upper[0])


def test_score_candidate_gives_kl_argmax_and_token_logprobs_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import medgemma_gguf.quant_eval.metrics as metrics

    rng = np.random.default_rng(12)
    ref = _shaped_logits("heavy-tailed", rng, 7, 300)
    cand = (ref + rng.normal(size=ref.shape) * 0.3).astype(np.float32)
    cover = cover_from_logits(ref, 1e-3)
    nxt = np.array([3, -1, 7, 0, -1, 299, 5])
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 700)  # blocks of 2 rows: the views must write through
    scored = score_candidate(cover, cand, {"next": nxt, "top": cover.top1_ids})
    bounds = kl_divergence_covered(cover, cand)
    assert np.array_equal(scored.bounds.lower, bounds.lower) and np.array_equal(scored.bounds.upper, bounds.upper)
    assert scored.top1.tolist() == np.argmax(cand, axis=1).tolist()
    has = nxt >= 0
    assert np.allclose(scored.token_logprobs["next"][has], token_logprobs(cand[has], nxt[has]), rtol=0, atol=1e-12)
    assert np.isnan(scored.token_logprobs["next"][~has]).all()
    assert np.allclose(scored.token_logprobs["top"], token_logprobs(cand, cover.top1_ids), rtol=0, atol=1e-12)
    with pytest.raises(MetricInputError, match="outside"):
        score_candidate(cover, cand, {"bad": np.full(7, 300)})
    with pytest.raises(MetricInputError, match="7 integer token ids"):
        score_candidate(cover, cand, {"bad": np.zeros(6, dtype=int)})


def test_brackets_overlap() -> None:
    assert brackets_overlap((0.01, 0.02), (0.015, 0.03)) and brackets_overlap((0.01, 0.02), (0.02, 0.03))
    assert not brackets_overlap((0.01, 0.0199), (0.02, 0.03))


# ----------------------------------------------------------------------------------------------------
# top-1, Δp, perplexity


def test_identical_models_give_neutral_scores() -> None:
    logits = np.random.default_rng(3).normal(size=(8, 30)).astype(np.float32)
    ref = cover_from_logits(logits, 1e-2)
    assert top1_agreement(ref.top1_ids, logits) == 1.0
    assert rms_delta_p_top(ref, logits) == 0.0
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
    ref = cover_from_logits(np.log([[0.6, 0.4], [0.1, 0.9]]).astype(np.float32), 0.5, min_tokens=1)
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
# llama.cpp's statistics


def test_kld_statistics_known_array() -> None:
    s = kld_statistics(np.array([4.0, 1.0, 3.0, 2.0]))
    assert s["n"] == 4
    assert s["mean"] == 2.5 and s["median"] == 2.5 and s["max"] == 4.0 and s["min"] == 1.0
    # linear interpolation at rank q * (n - 1) of [1, 2, 3, 4]: rank 2.7 -> 3.7, 2.97 -> 3.97, 2.997
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    assert s["p999"] == pytest.approx(3.997) and s["p95"] == pytest.approx(3.85)
    assert s["p10"] == pytest.approx(1.3) and s["p001"] == pytest.approx(1.003)
    assert s["mean_stderr"] == 0.0  # llama.cpp prints no uncertainty for 10 values or fewer


def test_kld_statistics_uncertainty_follows_llama_cpp() -> None:
    values = np.arange(1.0, 13.0)  # n = 12 > 10
    variance = float(np.mean(values**2) - np.mean(values) ** 2)
    assert kld_statistics(values)["mean_stderr"] == pytest.approx(math.sqrt(variance / 11), rel=1e-12)
    assert kld_statistics([0.02])["p999"] == 0.02


def test_delta_p_statistics_hand_case() -> None:
    ref = np.log(np.full(12, 0.5))
    cand = np.log(np.array([0.4, 0.6] * 6))  # Δp = ∓0.1
    s = delta_p_statistics(ref, cand)
    assert s["n"] == 12 and s["mean"] == pytest.approx(0.0, abs=1e-15) and s["rms"] == pytest.approx(0.1)
    assert s["max"] == pytest.approx(0.1) and s["min"] == pytest.approx(-0.1) and s["median"] == pytest.approx(0.0)
    assert s["mean_stderr"] == pytest.approx(math.sqrt(0.01 / 11), rel=1e-9)
    assert s["rms_stderr"] == 0.0  # Δp² is constant
    assert delta_p_statistics(ref, ref)["rms"] == 0.0


def test_same_top_statistics() -> None:
    share, stderr = same_top_statistics(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0]))
    assert share == 0.5 and stderr == pytest.approx(math.sqrt(0.25 / 3))


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
        (lambda: kl_divergence_covered(cover_from_logits(np.zeros((2, 4)), 0.1), np.zeros((3, 4))), "positions"),
        (lambda: kl_divergence_covered(cover_from_logits([[0, 0, 0, 1.0]], 0.1), np.zeros((1, 3))), "vocabulary"),
        (lambda: kl_divergence_covered(cover_from_logits(np.zeros((1, 4)), 0.1), [[0, 0, np.nan, 0]]), "NaN"),
        (lambda: kl_divergence_covered(np.zeros((1, 4)), np.zeros((1, 4))), "CoveredLogProbs"),
        (lambda: cover_from_logits(np.zeros((1, 4)), 0.1, min_tokens=3, max_tokens=2), "swap"),
        (lambda: cover_from_logits(np.zeros((1, 4)), 0.1, min_tokens=0), "positive"),
        (lambda: CoveredLogProbs(np.array([0, 2]), np.array([0, 1]), np.log([0.5, 0.2]), np.zeros(1), np.zeros(1),
                                 4, 0.1), "sum to"),
        (lambda: CoveredLogProbs(np.array([0, 2]), np.array([0, 1]), np.log([0.5, 0.5]), np.zeros(2), np.zeros(2),
                                 4, 0.1), "rows"),
        (lambda: CoveredLogProbs(np.array([0, 2]), np.array([0, 9]), np.log([0.5, 0.5]), np.zeros(1), np.zeros(1),
                                 4, 0.1), "vocabulary size"),
        (lambda: CoveredLogProbs(np.array([0, 2]), np.array([0.0, 1.0]), np.log([0.5, 0.5]), np.zeros(1),
                                 np.zeros(1), 4, 0.1), "integer"),
        (lambda: CoveredLogProbs(np.array([0, 2]), np.array([0, 1]), np.log([0.5, 0.5]), np.zeros(1), np.array([1.5]),
                                 4, 0.1), r"\[0, 1\]"),
        (lambda: CoveredLogProbs(np.array([0, 3]), np.array([0, 1]), np.log([0.5, 0.5]), np.zeros(1), np.zeros(1),
                                 4, 0.1), "offsets"),
        (lambda: CoveredLogProbs(np.array([0, 2]), None, np.log([0.5, 0.5]), np.zeros(1), np.zeros(1), 4, 0.1),
         "all 4 logits"),
        (lambda: CoveredLogProbs(np.array([0, 2]), None, np.log([0.5, 0.5]), np.zeros(1), np.zeros(1), 2, 0.1,
                                 np.array([1])), "booleans"),
        (lambda: CoveredLogProbs(np.array([0, 2]), None, np.log([0.5, 0.4]), np.zeros(1), np.array([0.1]), 2, 0.1),
         "no tail"),
        (lambda: CoveredLogProbs(np.array([0, 2, 3]), None, np.log([0.5, 0.5, 1.0]), np.zeros(2), np.zeros(2), 2,
                                 0.1, np.array([True, False])), "ids is None"),
        (lambda: token_logprobs(np.zeros((2, 3)), np.array([0, 3])), "vocabulary size"),
        (lambda: token_logprobs(np.zeros((2, 3)), np.array([0, -1])), "negative"),
        (lambda: top1_agreement(np.array([0, 1]), np.array([0])), "positions"),
        (lambda: top1_agreement(np.array([], dtype=int), np.array([], dtype=int)), "empty"),
        (lambda: rms_delta_p(np.log([0.5]), np.log([0.5, 0.5])), "positions"),
        (lambda: perplexity(np.array([])), "empty"),
        (lambda: perplexity(np.array([-1.0, np.nan])), "NaN"),
        (lambda: perplexity(np.array([0.5])), "> 0"),
        (lambda: ln_perplexity_ratio(np.log([0.5]), np.log([0.5, 0.5])), "positions"),
        (lambda: kld_statistics(np.array([])), "empty"),
        (lambda: kld_statistics(np.array([[0.1]])), "1-D"),
        (lambda: kld_statistics(np.array([0.1, np.nan])), "NaN"),
        (lambda: delta_p_statistics(np.log([0.5]), np.log([0.5, 0.5])), "positions"),
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
    cover = cover_from_logits(ref, 1e-2, min_tokens=1)
    whole_bounds = kl_divergence_covered(cover, cand)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 45)  # 2 rows per chunk, last chunk of 1
    assert np.array_equal(kl_divergence_full(ref, cand), whole_kl)
    assert np.array_equal(token_logprobs(cand, ids), whole_lp)
    bounds = kl_divergence_covered(cover_from_logits(ref, 1e-2, min_tokens=1), cand)
    assert np.array_equal(bounds.lower, whole_bounds.lower) and np.array_equal(bounds.upper, whole_bounds.upper)
    direct = log_softmax(cand.astype(np.float64))[np.arange(7), ids]
    assert np.allclose(whole_lp, direct, rtol=0, atol=1e-12)
