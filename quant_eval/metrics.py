"""Every accuracy metric of the quant evaluation, in one module (numpy only, pure functions).

Conventions
-----------
* Logarithms are natural (nats). ``P`` is the bf16 reference, ``Q`` the quantized candidate.
* Distribution inputs are ``[N, V]`` arrays (N positions, V vocabulary entries). Candidate rows may be
  raw logits or log-probabilities: every function renormalises them with a float64 log-softmax, which
  leaves true log-probabilities unchanged.
* The reference cache keeps, per position, only the top-K token ids, their log-probabilities and the
  remaining probability mass (:class:`TopKLogProbs`), because Gemma 3's 262k-entry rows are ~1 MB each.
* Where llama.cpp's ``llama-perplexity --kl-divergence`` reports the same statistic, we follow its
  definition (``tools/perplexity/perplexity.cpp`` in llama.cpp, read at the copy vendored in
  llama-cpp-python 0.3.36) so the numbers are comparable:

  - KLD per position: ``sum_i p_i (ln p_i - ln q_i)`` over the vocabulary (llama.cpp skips reference
    entries with ``ln p_i <= -16`` and stores the reference log-probabilities quantised to 16 bits; we
    sum every entry in float64, so our values are exact where theirs are approximate);
  - "Same top p": share of positions where the argmax token of P and of Q agree (first index on ties);
  - "Δp": ``q(t) - p(t)`` where ``t`` is the *observed next token* of the evaluated text, and
    "RMS Δp" = ``sqrt(mean(Δp²))``;
  - percentiles: linear interpolation at rank ``fraction * (n - 1)`` of the sorted values (numpy's
    default ``"linear"`` method), median = mean of the two middle values for even n;
  - uncertainty of a mean: ``sqrt(population_variance / (n - 1))``; the uncertainty of
    ``ln(PPL(Q)/PPL(P))`` is that of the mean of the per-token NLL differences (identical to
    llama.cpp's ``sqrt(σ_Q² + σ_P² - 2 cov)``).

Invalid input raises :class:`MetricInputError`, which is both a ``ValueError`` and the project's
``UserError`` (one line: the problem and the fix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from medgemma_gguf.errors import UserError

__all__ = [
    "KLBounds",
    "MetricInputError",
    "TopKLogProbs",
    "accuracy_with_ci",
    "choice_logprob_scores",
    "delta_p",
    "kl_divergence_full",
    "kl_divergence_topk",
    "kl_summary",
    "ln_perplexity_ratio",
    "log_softmax",
    "paired_test",
    "perplexity",
    "perplexity_ratio",
    "rms_delta_p",
    "rms_delta_p_top",
    "spearman_rank_correlation",
    "token_logprobs",
    "top1_agreement",
    "topk_from_logits",
]

# Slack for float rounding when checking that log-probabilities are <= 0 and masses lie in [0, 1].
_LOGPROB_SLACK = 1e-4
# How far sum(top-K probs) + tail mass may stray from 1 before a reference row is called inconsistent.
_MASS_SLACK = 1e-3
# [N, V] inputs are processed this many elements at a time, so float64 temporaries stay ~32 MB each.
_CHUNK_ELEMENTS = 1 << 22


class MetricInputError(UserError, ValueError):
    """Bad input to a metric: a ``ValueError`` for library callers, a ``UserError`` for the CLI."""


# ----------------------------------------------------------------------------------------------------
# validation helpers


def _as_float_array(
    values: ArrayLike, name: str, ndim: int, allow_neg_inf: bool = False, keep_float_dtype: bool = False
) -> NDArray:
    """Validated float array; float64 unless ``keep_float_dtype`` (big [N, V] rows convert per chunk)."""
    array = np.asarray(values)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise MetricInputError(f"{name} has dtype {array.dtype}; pass a numeric array")
    if not (keep_float_dtype and np.issubdtype(array.dtype, np.floating)):
        array = array.astype(np.float64, copy=False)
    if array.ndim != ndim:
        raise MetricInputError(f"{name} must be {ndim}-D, got shape {array.shape}; reshape it")
    if array.size == 0:
        raise MetricInputError(f"{name} is empty (shape {array.shape}); pass at least one value")
    if np.isnan(array).any():
        raise MetricInputError(f"{name} contains NaN; fix the model output or drop those positions")
    if np.isposinf(array).any() or (not allow_neg_inf and np.isneginf(array).any()):
        raise MetricInputError(f"{name} contains infinite values; pass finite numbers")
    return array


def _as_int_array(values: ArrayLike, name: str, ndim: int) -> NDArray[np.int64]:
    array = np.asarray(values)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise MetricInputError(f"{name} has dtype {array.dtype}; pass integer token ids")
    if array.ndim != ndim:
        raise MetricInputError(f"{name} must be {ndim}-D, got shape {array.shape}; reshape it")
    if array.size == 0:
        raise MetricInputError(f"{name} is empty (shape {array.shape}); pass at least one value")
    if (array < 0).any():
        raise MetricInputError(f"{name} contains negative token ids; pass ids in [0, vocab_size)")
    return array.astype(np.int64, copy=False)


def _as_bool_array(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    array = np.asarray(values)
    if array.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D, got shape {array.shape}; pass one flag per item")
    if array.size == 0:
        raise MetricInputError(f"{name} is empty; pass at least one graded item")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.number) or not np.isin(array, (0, 1)).all():
            raise MetricInputError(f"{name} must hold booleans (or 0/1); got dtype {array.dtype}")
        array = array.astype(bool)
    return array


def _check_logprobs(array: NDArray, name: str) -> None:
    if (array > _LOGPROB_SLACK).any():
        raise MetricInputError(f"{name} has values > 0, so they are not log-probabilities; pass ln(p) <= 0")


def _row_slices(n_rows: int, vocab: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _validated_rows(values: ArrayLike, name: str) -> NDArray:
    """A [positions, vocab] float array (dtype kept), checked for NaN/+inf; -inf (masked tokens) allowed."""
    return _as_float_array(values, name, ndim=2, allow_neg_inf=True, keep_float_dtype=True)


def _log_softmax_rows(rows: NDArray) -> NDArray[np.float64]:
    return _log_softmax_checked(rows.astype(np.float64))


def _same_length(a: NDArray, b: NDArray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise MetricInputError(
            f"{name_a} has {a.shape[0]} positions but {name_b} has {b.shape[0]}; pass aligned arrays"
        )


# ----------------------------------------------------------------------------------------------------
# distributions


def _log_softmax_checked(x: NDArray[np.float64]) -> NDArray[np.float64]:
    row_max = np.max(x, axis=-1, keepdims=True)
    if np.isneginf(row_max).any():
        raise MetricInputError("a logits row is entirely -inf; every position needs one finite logit")
    shifted = x - row_max
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def log_softmax(logits: ArrayLike) -> NDArray[np.float64]:
    """Row-wise ``ln softmax`` in float64: ``x_i - max(x) - ln Σ_j exp(x_j - max(x))``.

    Accepts ``[V]`` or ``[N, V]``. Subtracting the row maximum keeps ``exp`` from overflowing. ``-inf``
    entries (masked tokens) give ``-inf``; each row needs at least one finite value.
    """
    ndim = np.ndim(logits)
    x = _as_float_array(logits, "logits", ndim=ndim if ndim in (1, 2) else 2, allow_neg_inf=True)
    return _log_softmax_checked(x)


@dataclass(frozen=True, eq=False)
class TopKLogProbs:
    """The reference's top-K log-probabilities per position.

    ``ids[n, j]``, ``logprobs[n, j]``: the j-th most likely token at position n and ``ln p`` of it
    (descending; equal probabilities ordered by ascending id). ``tail_mass[n] = 1 - Σ_j p[n, j]``, the
    probability of every token outside the top K (computed directly as a sum, not by subtraction, so it
    keeps its relative precision when tiny).
    """

    ids: NDArray[np.int32]
    logprobs: NDArray[np.float32]
    tail_mass: NDArray[np.float64]

    def __post_init__(self) -> None:
        ids = _as_int_array(self.ids, "TopKLogProbs.ids", ndim=2)
        logprobs = _as_float_array(self.logprobs, "TopKLogProbs.logprobs", ndim=2, allow_neg_inf=True)
        tail = _as_float_array(self.tail_mass, "TopKLogProbs.tail_mass", ndim=1)
        if logprobs.shape != ids.shape:
            raise MetricInputError(
                f"TopKLogProbs.logprobs has shape {logprobs.shape} but ids has {ids.shape}; they must match"
            )
        _same_length(ids, tail, "TopKLogProbs.ids", "TopKLogProbs.tail_mass")
        _check_logprobs(logprobs, "TopKLogProbs.logprobs")
        if ((tail < -_LOGPROB_SLACK) | (tail > 1 + _LOGPROB_SLACK)).any():
            raise MetricInputError("TopKLogProbs.tail_mass must lie in [0, 1]; it is a probability mass")
        if ids.shape[1] > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise MetricInputError("TopKLogProbs.ids repeats a token id in a position; ids must be unique")
        total = np.exp(logprobs).sum(axis=1) + tail
        if (np.abs(total - 1.0) > _MASS_SLACK).any():
            worst = int(np.argmax(np.abs(total - 1.0)))
            raise MetricInputError(
                f"TopKLogProbs row {worst}: top-K probabilities plus tail_mass sum to {total[worst]:.6f}, "
                "not 1; rebuild the reference cache with topk_from_logits"
            )
        object.__setattr__(self, "ids", ids.astype(np.int32))
        object.__setattr__(self, "logprobs", logprobs.astype(np.float32))
        object.__setattr__(self, "tail_mass", np.clip(tail, 0.0, 1.0))

    @property
    def n_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top1_ids(self) -> NDArray[np.int32]:
        """The reference's most likely token per position (``ids[:, 0]``)."""
        return self.ids[:, 0]


def topk_from_logits(logits: ArrayLike, k: int) -> TopKLogProbs:
    """Top-K of ``log_softmax(logits)`` per row, computed in float64.

    ``tail_mass = Σ_{i ∉ top-K} exp(ln p_i)`` summed directly. Ties at the K-th place are resolved by
    lowest token id, so the result is deterministic.
    """
    x = _validated_rows(logits, "logits")
    n_pos, vocab = x.shape
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= vocab:
        raise MetricInputError(f"k must be an integer in [1, {vocab}] (the vocabulary size), got {k!r}")
    ids = np.empty((n_pos, k), dtype=np.int64)
    logprobs = np.empty((n_pos, k), dtype=np.float64)
    tail = np.zeros(n_pos, dtype=np.float64)
    for row in range(n_pos):
        values = _log_softmax_rows(x[row])
        threshold = np.partition(values, vocab - k)[vocab - k]  # the K-th largest value
        candidates = np.flatnonzero(values >= threshold)
        order = np.lexsort((candidates, -values[candidates]))  # by value desc, then id asc
        chosen = candidates[order[:k]]
        ids[row] = chosen
        logprobs[row] = values[chosen]
        if k < vocab:
            rest = np.ones(vocab, dtype=bool)
            rest[chosen] = False
            tail[row] = np.exp(values[rest]).sum()
    return TopKLogProbs(ids=ids.astype(np.int32), logprobs=logprobs.astype(np.float32), tail_mass=tail)


def token_logprobs(logits: ArrayLike, token_ids: ArrayLike) -> NDArray[np.float64]:
    """``ln q(t_n)`` at each position n: ``log_softmax(logits)[n, token_ids[n]]`` (float64)."""
    x = _validated_rows(logits, "logits")
    ids = _as_int_array(token_ids, "token_ids", ndim=1)
    _same_length(x, ids, "logits", "token_ids")
    if (ids >= x.shape[1]).any():
        raise MetricInputError(f"token_ids has ids >= the vocabulary size {x.shape[1]}; check the tokenizer")
    out = np.empty(x.shape[0])
    for rows in _row_slices(*x.shape):
        lq = _log_softmax_rows(x[rows])
        out[rows] = lq[np.arange(lq.shape[0]), ids[rows]]
    return out


# ----------------------------------------------------------------------------------------------------
# KL divergence


def _kl_rows(lp: NDArray[np.float64], lq: NDArray[np.float64]) -> NDArray[np.float64]:
    """Σ_i p_i (ln p_i - ln q_i) per row; terms with p_i = 0 contribute 0 (even where q_i = 0)."""
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    return terms.sum(axis=-1)


def kl_divergence_full(ref_logits: ArrayLike, cand_logits: ArrayLike) -> NDArray[np.float64]:
    """Exact ``KL(P_ref || Q_cand) = Σ_i p_i (ln p_i - ln q_i)`` per position, in nats.

    Both inputs are ``[N, V]`` logits or log-probabilities (renormalised in float64). Returns ``[N]``.
    """
    ref = _validated_rows(ref_logits, "ref_logits")
    cand = _validated_rows(cand_logits, "cand_logits")
    if ref.shape != cand.shape:
        raise MetricInputError(
            f"ref_logits {ref.shape} and cand_logits {cand.shape} must be [positions, vocab] of equal shape"
        )
    out = np.empty(ref.shape[0])
    for rows in _row_slices(*ref.shape):
        out[rows] = _kl_rows(_log_softmax_rows(ref[rows]), _log_softmax_rows(cand[rows]))
    return out


class KLBounds(NamedTuple):
    """Per-position KL from a top-K reference: ``lower <= KL(P || Q) <= upper``.

    ``estimate`` is the lumped-tail KL and equals ``lower``; it is the value to report.
    """

    estimate: NDArray[np.float64]
    lower: NDArray[np.float64]
    upper: NDArray[np.float64]


def _tail_upper(tail_lq: NDArray[np.float64], p_tail: float, cap: float) -> float:
    """max Σ_i p_i ln(p_i / q_i) over {0 <= p_i <= cap, Σ p_i = p_tail}, for ``ln q_i = tail_lq``."""
    n_tail = tail_lq.size
    n_full = min(int(math.floor(p_tail / cap)), n_tail - 1)  # tokens given the whole cap
    remainder = p_tail - n_full * cap  # the (n_full + 1)-th token gets the rest (<= cap up to rounding)
    smallest = np.partition(tail_lq, n_full)[: n_full + 1]  # n_full smallest, then the next one
    value = n_full * cap * math.log(cap) - cap * float(smallest[:n_full].sum())
    if remainder > 0:
        value += remainder * (math.log(remainder) - float(smallest[n_full]))
    return value


def kl_divergence_topk(ref: TopKLogProbs, cand_logprobs: ArrayLike) -> KLBounds:
    r"""``KL(P_ref || Q_cand)`` per position when only the reference's top-K is stored.

    Split the vocabulary into the reference's top-K set ``K`` and the tail ``T``:
    ``KL = Σ_{i∈K} p_i ln(p_i/q_i) + Σ_{i∈T} p_i ln(p_i/q_i)``. The first sum is exact. For the tail
    we know ``P_T = ref.tail_mass``, every ``q_i`` (``Q_T = Σ_{i∈T} q_i``), and that each tail
    ``p_i <= m := min(P_T, min_{j∈K} p_j)`` because ``K`` holds the K most likely tokens.

    Lower bound (reported as the estimate). By the log-sum inequality,
    ``Σ_{i∈T} p_i ln(p_i/q_i) >= P_T ln(P_T / Q_T)``, so
    ``lower = Σ_{i∈K} p_i ln(p_i/q_i) + P_T ln(P_T/Q_T) <= KL``. It is the exact KL between P and Q
    coarsened to K+1 outcomes (the top-K tokens and one "other" bucket), hence also ``>= 0``; it equals
    the true KL when the candidate spreads its tail in proportion to the reference
    (``q_i / p_i`` constant on ``T``), and when ``K = V``.

    Upper bound (the tightest the cache allows). ``f(p) = Σ_{i∈T} p_i ln(p_i/q_i)`` is convex in the
    tail vector ``p``, and the true tail lies in the polytope
    ``F = {p : 0 <= p_i <= m, Σ_{i∈T} p_i = P_T}``. A convex function attains its maximum over a
    polytope at a vertex. A vertex of ``F`` (a box cut by one hyperplane) has at most one coordinate
    strictly between its bounds, so it has ``r = floor(P_T / m)`` coordinates equal to ``m``, one equal
    to ``ρ = P_T - r m`` and the rest 0 (if float rounding leaves fewer than r + 1 tail tokens, the
    last one takes the remainder). Its value is
    ``r m ln m + ρ ln ρ + m Σ_{i∈S} (-ln q_i) + ρ (-ln q_l)``: only the linear part depends on which
    tokens are chosen, and by the rearrangement inequality (``m >= ρ``) it is largest when the ``r``
    tokens with the smallest ``q_i`` get ``m`` and the next-smallest gets ``ρ``. That value is
    ``max_{p∈F} f(p) >= f(p_true)``, so ``upper = Σ_{i∈K} p_i ln(p_i/q_i) + max_F f >= KL``, and some
    reference distribution consistent with the cache attains it, so no smaller bound is valid.

    In words: the upper bound is the largest KL any reference distribution consistent with the cache
    could have — it puts the leftover reference mass, in pieces no larger than the smallest top-K
    probability, on the tokens the candidate finds least likely.

    ``cand_logprobs`` is ``[N, V]`` (logits accepted: rows are renormalised in float64). ``upper`` is
    clamped to ``>= lower`` against float rounding. Cost: one O(V) pass per position.
    """
    if not isinstance(ref, TopKLogProbs):
        raise MetricInputError(f"ref must be a TopKLogProbs, got {type(ref).__name__}; use topk_from_logits")
    lq_all = _validated_rows(cand_logprobs, "cand_logprobs")
    _same_length(ref.ids, lq_all, "ref", "cand_logprobs")
    vocab = lq_all.shape[1]
    if ref.k > vocab or (ref.ids >= vocab).any():
        raise MetricInputError(
            f"ref has token ids (or K) beyond the candidate's vocabulary of {vocab}; "
            "the two models must share one tokenizer"
        )
    lp_top = ref.logprobs.astype(np.float64)
    p_top = np.exp(lp_top)
    lower = np.empty(ref.n_positions)
    upper = np.empty(ref.n_positions)
    for row in range(ref.n_positions):
        lq = _log_softmax_rows(lq_all[row])
        ids = ref.ids[row].astype(np.int64)
        with np.errstate(invalid="ignore"):
            top_term = float(np.where(p_top[row] > 0, p_top[row] * (lp_top[row] - lq[ids]), 0.0).sum())
        p_tail = float(ref.tail_mass[row])
        if ref.k == vocab or p_tail == 0.0:
            lower[row] = upper[row] = top_term  # every tail term is 0 (or there is no tail)
            continue
        in_tail = np.ones(vocab, dtype=bool)
        in_tail[ids] = False
        tail_lq = lq[in_tail]
        q_tail = float(np.exp(tail_lq).sum())
        ln_q_tail = math.log(q_tail) if q_tail > 0 else -math.inf
        lower[row] = top_term + p_tail * (math.log(p_tail) - ln_q_tail)
        cap = min(p_tail, float(p_top[row].min()))
        if cap <= 0.0:
            raise MetricInputError(
                f"ref row {row} has tail mass {p_tail:g} but a top-K probability of 0, which is impossible; "
                "rebuild the reference cache with topk_from_logits"
            )
        if np.isneginf(tail_lq).any():
            upper[row] = math.inf  # the reference may put mass where the candidate puts none
        else:
            upper[row] = max(top_term + _tail_upper(tail_lq, p_tail, cap), lower[row])
    return KLBounds(estimate=lower.copy(), lower=lower, upper=upper)


def kl_summary(kl_per_position: ArrayLike) -> dict[str, float]:
    """Summary statistics of per-position KL values (nats).

    Keys: ``n``, ``mean``, ``mean_stderr`` (llama.cpp's ``sqrt(population variance / (n - 1))``; 0 for
    n = 1, where llama.cpp prints 0 for every n <= 10), ``median``, ``p90``, ``p95``, ``p99``, ``p999``
    (the 99.9th percentile), ``max``. Percentiles interpolate linearly at rank ``q * (n - 1)`` of the
    sorted values (numpy ``method="linear"``), the same rule as llama.cpp's perplexity tool.
    """
    values = _as_float_array(kl_per_position, "kl_per_position", ndim=1)
    n = values.size
    mean = float(values.mean())
    stderr = float(math.sqrt(max(values.var(), 0.0) / (n - 1))) if n > 1 else 0.0
    p90, p95, p99, p999 = np.percentile(values, [90.0, 95.0, 99.0, 99.9], method="linear")
    return {
        "n": n,
        "mean": mean,
        "mean_stderr": stderr,
        "median": float(np.median(values)),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(values.max()),
    }


def _average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Ranks 1..n of ``values``, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size)
    sorted_values = values[order]
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_rank_correlation(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rank correlation of two paired samples (Pearson correlation of their average ranks).

    NaN when either sample is constant (no ranking to agree with); MetricInputError for fewer than two pairs.
    """
    x = _as_float_array(a, "a", ndim=1)
    y = _as_float_array(b, "b", ndim=1)
    _same_length(x, y, "a", "b")
    if x.size < 2:
        raise MetricInputError("a rank correlation needs at least two pairs")
    rx, ry = _average_ranks(x) - (x.size + 1) / 2, _average_ranks(y) - (y.size + 1) / 2
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denominator if denominator > 0 else math.nan


# ----------------------------------------------------------------------------------------------------
# top token and probability shifts


def top1_agreement(ref_top1_ids: ArrayLike, cand: ArrayLike) -> float:
    """Share of positions where the candidate's argmax token equals the reference's top-1 token.

    ``cand`` is either ``[N]`` token ids or ``[N, V]`` logits/log-probabilities (argmax, first index on
    ties, as llama.cpp's "Same top p"). Use ``ref.top1_ids`` of a :class:`TopKLogProbs`.
    """
    ref_ids = _as_int_array(ref_top1_ids, "ref_top1_ids", ndim=1)
    cand_array = np.asarray(cand)
    if cand_array.ndim == 2:
        cand_ids = np.argmax(_validated_rows(cand_array, "cand"), axis=1)
    else:
        cand_ids = _as_int_array(cand_array, "cand", ndim=1)
    _same_length(ref_ids, cand_ids, "ref_top1_ids", "cand")
    return float(np.mean(ref_ids == cand_ids))


def delta_p(ref_token_logprobs: ArrayLike, cand_token_logprobs: ArrayLike) -> NDArray[np.float64]:
    """``Δp_n = q(t_n) - p(t_n)`` per position, from both models' ``ln p`` of the same token ``t_n``."""
    lp = _as_float_array(ref_token_logprobs, "ref_token_logprobs", ndim=1, allow_neg_inf=True)
    lq = _as_float_array(cand_token_logprobs, "cand_token_logprobs", ndim=1, allow_neg_inf=True)
    _same_length(lp, lq, "ref_token_logprobs", "cand_token_logprobs")
    _check_logprobs(lp, "ref_token_logprobs")
    _check_logprobs(lq, "cand_token_logprobs")
    return np.exp(lq) - np.exp(lp)


def rms_delta_p(ref_token_logprobs: ArrayLike, cand_token_logprobs: ArrayLike) -> float:
    """llama.cpp's "RMS Δp": ``sqrt(mean_n (q(t_n) - p(t_n))²)``.

    llama.cpp takes ``t_n`` = the observed next token of the evaluated text, so pass each model's
    log-probability of that token (the reference cache must then store ``ln p(t_n)`` itself, since the
    observed token can fall outside the top-K). For the reference's top-1 token see :func:`rms_delta_p_top`.
    """
    return float(np.sqrt(np.mean(delta_p(ref_token_logprobs, cand_token_logprobs) ** 2)))


def rms_delta_p_top(ref: TopKLogProbs, cand_logprobs: ArrayLike) -> float:
    """RMS over positions of ``q(t*_n) - p(t*_n)``, ``t*_n`` the reference's top-1 token.

    Computable from the top-K cache alone. Not llama.cpp's "RMS Δp" (that uses the observed next token;
    see :func:`rms_delta_p`), though both are 0 for identical models and similar in practice.
    """
    if not isinstance(ref, TopKLogProbs):
        raise MetricInputError(f"ref must be a TopKLogProbs, got {type(ref).__name__}; use topk_from_logits")
    cand_top = token_logprobs(cand_logprobs, ref.top1_ids)
    return rms_delta_p(ref.logprobs[:, 0].astype(np.float64), cand_top)


# ----------------------------------------------------------------------------------------------------
# perplexity


def perplexity(token_logprobs: ArrayLike) -> float:
    """``PPL = exp(-mean_n ln p(t_n))`` over the scored tokens (natural log)."""
    lp = _as_float_array(token_logprobs, "token_logprobs", ndim=1, allow_neg_inf=True)
    _check_logprobs(lp, "token_logprobs")
    return float(np.exp(-lp.mean()))


def ln_perplexity_ratio(cand_token_logprobs: ArrayLike, ref_token_logprobs: ArrayLike) -> tuple[float, float]:
    """``ln(PPL_cand / PPL_ref) = mean_n (ln p_ref(t_n) - ln p_cand(t_n))`` and its standard error.

    The standard error is ``sqrt(population variance of the per-token differences / (n - 1))`` (0 for
    n = 1), which equals llama.cpp's ``sqrt(σ_Q² + σ_P² - 2 cov)``. Both arrays score the same tokens.
    """
    lq = _as_float_array(cand_token_logprobs, "cand_token_logprobs", ndim=1)
    lp = _as_float_array(ref_token_logprobs, "ref_token_logprobs", ndim=1)
    _same_length(lq, lp, "cand_token_logprobs", "ref_token_logprobs")
    _check_logprobs(lq, "cand_token_logprobs")
    _check_logprobs(lp, "ref_token_logprobs")
    diff = lp - lq  # per-token NLL_cand - NLL_ref
    stderr = math.sqrt(float(diff.var()) / (diff.size - 1)) if diff.size > 1 else 0.0
    return float(diff.mean()), stderr


def perplexity_ratio(cand_token_logprobs: ArrayLike, ref_token_logprobs: ArrayLike) -> float:
    """``PPL_cand / PPL_ref`` = ``exp(ln_perplexity_ratio)``; 1 means no change, > 1 the quant is worse."""
    return float(math.exp(ln_perplexity_ratio(cand_token_logprobs, ref_token_logprobs)[0]))


# ----------------------------------------------------------------------------------------------------
# task accuracy


def accuracy_with_ci(correct: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """Accuracy and its Wilson score interval: ``(acc, low, high)``.

    With ``p̂ = k/n`` and ``z`` the two-sided normal quantile for ``confidence``:
    ``center = (p̂ + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) · sqrt(p̂(1-p̂)/n + z²/4n²)``,
    interval ``[center - half, center + half]`` clipped to [0, 1]. E.g. 8/10 at 95 %: (0.490, 0.943).
    """
    flags = _as_bool_array(correct, "correct")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise MetricInputError(f"confidence must be a number in (0, 1), e.g. 0.95; got {confidence!r}")
    n = flags.size
    p_hat = float(flags.sum()) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    center = (p_hat + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    return p_hat, max(0.0, center - half), min(1.0, center + half)


def _binomial_two_sided_half(successes: int, trials: int) -> float:
    """Exact two-sided p-value of ``successes`` under Binomial(trials, 1/2): ``min(1, 2 P(X <= min))``."""
    if trials == 0:
        return 1.0
    low = min(successes, trials - successes)
    tail = sum(math.comb(trials, i) for i in range(low + 1))  # exact integers
    return min(1.0, (2 * tail) / (2**trials))


def paired_test(cand_correct: ArrayLike, ref_correct: ArrayLike) -> dict[str, Any]:
    """McNemar's exact test of candidate vs reference on the same graded items.

    ``b`` = items only the candidate got right, ``c`` = items only the reference got right. Under
    H0 (equal accuracy) ``b ~ Binomial(b + c, 1/2)``; the two-sided p-value is
    ``min(1, 2 Σ_{i<=min(b,c)} C(b+c, i) / 2^(b+c))``, computed with exact integers (this equals
    ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``); 1.0 when there are no discordant pairs.
    Returns ``n``, ``b``, ``c``, ``cand_accuracy``, ``ref_accuracy``, ``p_value``.
    """
    cand = _as_bool_array(cand_correct, "cand_correct")
    ref = _as_bool_array(ref_correct, "ref_correct")
    _same_length(cand, ref, "cand_correct", "ref_correct")
    b = int(np.sum(cand & ~ref))
    c = int(np.sum(~cand & ref))
    return {
        "n": int(cand.size),
        "b": b,
        "c": c,
        "cand_accuracy": float(cand.mean()),
        "ref_accuracy": float(ref.mean()),
        "p_value": _binomial_two_sided_half(b, b + c),
    }


def choice_logprob_scores(
    option_logprob_sums: Sequence[float] | ArrayLike,
    lengths: Sequence[int] | ArrayLike | None = None,
) -> tuple[int, NDArray[np.float64]]:
    """Pick a multiple-choice answer from each option's summed log-likelihood ``Σ_t ln p(t | prompt)``.

    Score = the sum, or with ``lengths`` the sum divided by the option's length (mean log-likelihood per
    unit; pass token counts, or byte lengths of the option text for lm-evaluation-harness's
    ``acc_norm``). Returns ``(argmax index, scores)``; exact ties go to the lowest index.
    """
    sums = _as_float_array(option_logprob_sums, "option_logprob_sums", ndim=1, allow_neg_inf=True)
    _check_logprobs(sums, "option_logprob_sums")
    if lengths is None:
        scores = sums
    else:
        lens = _as_float_array(lengths, "lengths", ndim=1)
        _same_length(sums, lens, "option_logprob_sums", "lengths")
        if (lens <= 0).any():
            raise MetricInputError("lengths must all be > 0; an option needs at least one token or byte")
        scores = sums / lens
    return int(np.argmax(scores)), scores
