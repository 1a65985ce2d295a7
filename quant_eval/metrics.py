"""Every accuracy metric of the quant evaluation, in one module (numpy only, pure functions).

Conventions
-----------
* Logarithms are natural (nats). ``P`` is the bf16 reference, ``Q`` the quantized candidate.
* Distribution inputs are ``[N, V]`` arrays (N positions, V vocabulary entries). Candidate rows may be
  raw logits or log-probabilities: every function renormalises them with a float64 log-softmax, which
  leaves true log-probabilities unchanged.
* The reference cache keeps the reference's distribution by probability *mass*, not by count
  (:class:`CoveredLogProbs`, :func:`cover_from_logits`): per position the smallest set of most likely tokens
  whose left-out mass ``P_T`` satisfies ``P_T · max(1, ln(m / p_min)) <= ε`` (default ε = 1e-4, or the ε
  chosen for the model family, ``reference.MODEL_COVERAGE``; ``m`` the smallest kept probability, ``p_min``
  the row's smallest), as the model's float32 logits, plus the exact float64 log-sum-exp of the whole row
  (so the stored probabilities are exact) and the tail mass. Where that set would exceed the cap
  (``max_tokens``) or half the vocabulary — a flat or long tail — the position's whole row is stored
  instead, and its KL is exact. Gemma 3's 262,208-entry rows are 1 MiB each as float32 (llama.cpp's uint16
  rows: 512 KiB); a covered row of a peaked distribution is a few KiB. ε = 0 stores every row whole
  (``--full-vocab``, llama.cpp's method).
* The KL from that cache comes with its exact bracket (:func:`kl_divergence_covered`): the reported value
  is the coarsened KL (stored tokens exact, tail lumped), a lower bound; the upper bound is the largest KL
  any reference consistent with the cache could have; both are the exact KL at a row stored whole. At a
  covered row the bracket's width is at most ``P_T · (ln m - ln min_T q - ln(P_T/Q_T))``, which the rule
  above keeps near ε nats or less unless the candidate's tail is far more extreme than the reference's
  own; :func:`brackets_overlap` says when two quants cannot be told apart.
* Per-position KL values with ``|KL| < 1e-9`` are float64 round-off of a zero KL and are set to 0
  (:data:`ROUNDOFF_KL`); nothing else is clamped.
* Where llama.cpp's ``llama-perplexity --kl-divergence`` reports a statistic, we follow its definition
  (``tools/perplexity/perplexity.cpp`` in llama.cpp, read at the copy vendored in llama-cpp-python 0.3.36)
  so tables are comparable side by side (:func:`kld_statistics`, :func:`delta_p_statistics`,
  :func:`same_top_statistics`, :func:`ln_perplexity_ratio`). Definitional differences:

  - llama.cpp stores the reference's log-probabilities quantised to 16 bits (error up to ~1.2e-4 nats
    each) and drops reference tokens with ``ln p <= -16`` from the KL sum; we use the exact float64
    values and every stored token, with the tail bracketed;
  - "Same top p" compares the candidate's argmax with the argmax of those quantised values; we use the
    reference's exact argmax (first index on ties in both);
  - llama.cpp scores the second half of each ``n_ctx`` chunk of one token stream (positions
    ``n_ctx/2 … n_ctx-2``, the chunk's first token replaced by BOS); ``eval`` scores every text position of
    its own sequences unless asked for llama.cpp's positions (``reference.llama_perplexity_chunks``);
  - the uncertainty of a mean is ``sqrt((E[x²] - E[x]²)/(n - 1))``, 0 for n <= 10 (llama.cpp's rule);
    the uncertainty of ``ln(PPL(Q)/PPL(P))`` is that of the mean per-token NLL difference (identical to
    llama.cpp's ``sqrt(σ_Q² + σ_P² - 2 cov)``);
  - percentiles interpolate linearly at rank ``fraction * (n - 1)`` of the sorted values; median = mean of
    the two middle values for even n.

Invalid input raises :class:`MetricInputError`, which is both a ``ValueError`` and the project's
``UserError`` (one line: the problem and the fix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from medgemma_gguf.errors import UserError

__all__ = [
    "DEFAULT_COVERAGE",
    "MAX_STORED_TOKENS",
    "MIN_STORED_TOKENS",
    "ROUNDOFF_KL",
    "CandidateScores",
    "CoveredLogProbs",
    "KLBounds",
    "MetricInputError",
    "accuracy_with_ci",
    "brackets_overlap",
    "choice_logprob_scores",
    "clamp_roundoff",
    "cover_from_logits",
    "delta_p",
    "delta_p_statistics",
    "kl_divergence_covered",
    "kl_divergence_full",
    "kld_statistics",
    "ln_perplexity_ratio",
    "log_softmax",
    "paired_test",
    "perplexity",
    "perplexity_ratio",
    "rms_delta_p",
    "rms_delta_p_top",
    "same_top_statistics",
    "score_candidate",
    "spearman_rank_correlation",
    "token_logprobs",
    "top1_agreement",
]

# Reference coverage: keep the most likely tokens until the rest holds at most this much probability.
DEFAULT_COVERAGE = 1e-4
# Floor and cap on the tokens kept per position. The cap is 512 KiB a position (8 bytes a token), what
# llama.cpp's uint16 base file spends on every position at Gemma 3's 262,208-token vocabulary.
MIN_STORED_TOKENS = 16
MAX_STORED_TOKENS = 65536
# |KL| below this is float64 round-off of a zero KL and is reported as 0.
ROUNDOFF_KL = 1e-9
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
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):  # one pass: a NaN or an infinity anywhere (or an overflow) makes it not finite
            return array
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
    """``x - lse(x)`` with the one normaliser (:func:`_lse_rows`) the reference cache stores, so identical
    logits give bit-identical log-probabilities on both sides."""
    return x - _lse_rows(x)[..., None]


def log_softmax(logits: ArrayLike) -> NDArray[np.float64]:
    """Row-wise ``ln softmax`` in float64: ``x_i - max(x) - ln Σ_j exp(x_j - max(x))``.

    Accepts ``[V]`` or ``[N, V]``. Subtracting the row maximum keeps ``exp`` from overflowing. ``-inf``
    entries (masked tokens) give ``-inf``; each row needs at least one finite value.
    """
    ndim = np.ndim(logits)
    x = _as_float_array(logits, "logits", ndim=ndim if ndim in (1, 2) else 2, allow_neg_inf=True)
    return _log_softmax_checked(x)


@dataclass(frozen=True, eq=False)
class CoveredLogProbs:
    """The reference's distribution per position, stored by probability mass rather than by count.

    Row ``n`` is stored in one of two forms (see :func:`cover_from_logits`):

    * *covered*: the smallest set of most likely tokens whose probability covers ``1 - epsilon`` (at least
      ``min_tokens`` of them), as the model's own float32 logits with their token ids, and
      ``tail_mass[n]`` = the probability of every token not kept (summed directly, so it keeps its relative
      precision when tiny);
    * *whole* (``dense_rows[n]``): every logit of the row in id order, no ids and no tail — used where the
      covering set would exceed ``max_tokens`` or hold at least half the vocabulary (a flat or long tail),
      so that position's KL is exact rather than bracketed, at 4 bytes a token.

    Both carry ``lse[n]`` = ``ln Σ_i exp(logit_i)`` over the *whole* vocabulary in float64, so
    ``ln p_i = logit_i - lse[n]`` is the exact float64 log-probability, the same number a full-vocabulary
    float64 log-softmax gives.

    Layout (CSR): row n's logits are ``logits[offsets[n]:offsets[n+1]]`` (``vocab_size`` of them for a row
    stored whole); ``ids`` holds the token ids of the covered rows only, one after another (ascending within
    a row as :func:`cover_from_logits` writes them; nothing depends on the order), and is ``None`` when every
    row is stored whole. ``dense_rows`` defaults to "every row whole" when ``ids is None`` (the layout of
    ``--full-vocab``, ``epsilon = 0``) and to "none" otherwise.
    """

    offsets: NDArray[np.int64]
    ids: NDArray[np.int32] | None
    logits: NDArray[np.float32]
    lse: NDArray[np.float64]
    tail_mass: NDArray[np.float64]
    vocab_size: int
    epsilon: float
    dense_rows: NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        offsets = _as_int_array(self.offsets, "CoveredLogProbs.offsets", ndim=1)
        logits = _as_float_array(self.logits, "CoveredLogProbs.logits", ndim=1, allow_neg_inf=True,
                                 keep_float_dtype=True).astype(np.float32, copy=False)
        lse = _as_float_array(self.lse, "CoveredLogProbs.lse", ndim=1)
        tail = _as_float_array(self.tail_mass, "CoveredLogProbs.tail_mass", ndim=1)
        vocab = self.vocab_size
        if isinstance(vocab, bool) or not isinstance(vocab, int | np.integer) or vocab < 1:
            raise MetricInputError(f"CoveredLogProbs.vocab_size must be a positive integer, got {vocab!r}")
        if isinstance(self.epsilon, bool) or not 0.0 <= float(self.epsilon) < 1.0:
            raise MetricInputError(f"CoveredLogProbs.epsilon must lie in [0, 1), got {self.epsilon!r}")
        sizes = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != logits.size or (sizes < 1).any() or offsets.size < 2:
            raise MetricInputError("CoveredLogProbs.offsets must start at 0, grow by at least 1 a row and end at "
                                   "len(logits); rebuild the cache with cover_from_logits")
        n = sizes.size
        _same_length(lse, tail, "CoveredLogProbs.lse", "CoveredLogProbs.tail_mass")
        if lse.size != n:
            raise MetricInputError(f"CoveredLogProbs has {n} rows in offsets but {lse.size} in lse; they must match")
        if ((tail < -_LOGPROB_SLACK) | (tail > 1 + _LOGPROB_SLACK)).any():
            raise MetricInputError("CoveredLogProbs.tail_mass must lie in [0, 1]; it is a probability mass")
        if self.dense_rows is None:
            dense = np.full(n, self.ids is None)
        else:
            dense = np.asarray(self.dense_rows)
            if dense.dtype != bool or dense.shape != (n,):
                raise MetricInputError(f"CoveredLogProbs.dense_rows must be {n} booleans (one a row), got "
                                       f"{dense.dtype} {dense.shape}")
        if (sizes[dense] != vocab).any():
            raise MetricInputError(f"CoveredLogProbs rows stored whole must hold all {vocab} logits each")
        if (tail[dense] > _LOGPROB_SLACK).any():
            raise MetricInputError("CoveredLogProbs rows stored whole have no tail; their tail_mass must be 0")
        covered_sizes = np.where(dense, 0, sizes)
        n_covered_tokens = int(covered_sizes.sum())
        if self.ids is None or (n_covered_tokens == 0 and np.asarray(self.ids).size == 0):
            if n_covered_tokens:
                raise MetricInputError("CoveredLogProbs.ids is None but some rows are not stored whole; pass their "
                                       "token ids")
            ids = None
        else:
            ids = _as_int_array(self.ids, "CoveredLogProbs.ids", ndim=1)
            if ids.size != n_covered_tokens:
                raise MetricInputError("CoveredLogProbs.ids and logits must have one entry per stored token of the "
                                       "rows not stored whole")
            if (ids >= vocab).any() or (sizes > vocab).any():
                raise MetricInputError(f"CoveredLogProbs holds token ids >= its vocabulary size {vocab}")
            ids = ids.astype(np.int32)
        total = _stored_mass(logits, offsets, lse) + np.where(dense, 0.0, tail)
        if (np.abs(total - 1.0) > _MASS_SLACK).any():
            worst = int(np.argmax(np.abs(total - 1.0)))
            raise MetricInputError(f"CoveredLogProbs row {worst}: stored probabilities plus tail_mass sum to "
                                   f"{total[worst]:.6f}, not 1; rebuild the cache with cover_from_logits")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "lse", lse)
        object.__setattr__(self, "tail_mass", np.where(dense, 0.0, np.clip(tail, 0.0, 1.0)))
        object.__setattr__(self, "vocab_size", int(vocab))
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "dense_rows", dense)
        # where each covered row's ids start in ``ids`` (rows stored whole take none)
        object.__setattr__(self, "_id_offsets", np.concatenate([[0], np.cumsum(covered_sizes)]).astype(np.int64))

    @classmethod
    def _trusted(cls, offsets: NDArray[np.int64], ids: NDArray[np.int32] | None, logits: NDArray[np.float32],
                 lse: NDArray[np.float64], tail_mass: NDArray[np.float64], vocab_size: int, epsilon: float,
                 dense_rows: NDArray[np.bool_]) -> CoveredLogProbs:
        """An object from arrays this module built consistent (cover_from_logits, take, concatenate): skips the
        validation passes over every stored logit, which cost as much as the selection at 262,208 tokens."""
        self = object.__new__(cls)
        offsets = offsets.astype(np.int64, copy=False)
        fields: dict[str, Any] = {"offsets": offsets, "ids": ids, "logits": logits, "lse": lse,
                                  "tail_mass": tail_mass, "vocab_size": int(vocab_size), "epsilon": float(epsilon),
                                  "dense_rows": dense_rows}
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        covered_sizes = np.where(dense_rows, 0, np.diff(offsets))
        object.__setattr__(self, "_id_offsets", np.concatenate([[0], np.cumsum(covered_sizes)]).astype(np.int64))
        return self

    @property
    def n_positions(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def dense(self) -> bool:
        """True when every row is stored whole (the full-vocabulary layout of ``--full-vocab``)."""
        return bool(self.dense_rows.all())  # type: ignore[union-attr]

    @property
    def n_dense(self) -> int:
        """Rows stored whole (exact KL there)."""
        return int(np.count_nonzero(self.dense_rows))  # type: ignore[arg-type]

    @property
    def set_sizes(self) -> NDArray[np.int64]:
        """Tokens stored per position (``vocab_size`` for a row stored whole)."""
        return np.diff(self.offsets)

    def _row_ids(self, index: int) -> NDArray[np.int64]:
        if self.dense_rows[index]:  # type: ignore[index]
            return np.arange(self.vocab_size)
        offsets: NDArray[np.int64] = self._id_offsets  # type: ignore[attr-defined]
        assert self.ids is not None
        return self.ids[offsets[index] : offsets[index + 1]].astype(np.int64)

    def row(self, index: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Token ids and their exact ``ln p`` (float64) at position ``index``."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self._row_ids(index), self.logits[start:end].astype(np.float64) - self.lse[index]

    @cached_property
    def _top1(self) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Each row's most likely token (lowest id among equal logits, as ``argmax``) and its ``ln p``."""
        ids = np.empty(self.n_positions, dtype=np.int64)
        logit = np.empty(self.n_positions)
        for index in range(self.n_positions):
            segment = self.logits[self.offsets[index] : self.offsets[index + 1]]
            at = int(np.argmax(segment))
            if not self.dense_rows[index]:  # type: ignore[index]
                row_ids = self._row_ids(index)
                ties = np.flatnonzero(segment == segment[at])
                at = int(ties[np.argmin(row_ids[ties])]) if ties.size > 1 else at
                ids[index] = row_ids[at]
            else:
                ids[index] = at
            logit[index] = segment[at]
        return ids, logit - self.lse

    @property
    def top1_ids(self) -> NDArray[np.int64]:
        """The reference's most likely token per position (lowest id on ties, as ``argmax``)."""
        return self._top1[0].copy()

    @property
    def top1_logprobs(self) -> NDArray[np.float64]:
        """``ln p`` of the reference's most likely token per position."""
        return self._top1[1].copy()

    def take(self, rows: ArrayLike) -> CoveredLogProbs:
        """The positions ``rows`` (indices, in the order given) as a new object."""
        index = np.asarray(rows, dtype=np.int64)
        sizes = self.set_sizes[index]
        dense = self.dense_rows[index]  # type: ignore[index]
        logits = np.concatenate([self.logits[self.offsets[i] : self.offsets[i + 1]] for i in index.tolist()])
        covered = [self._row_ids(i).astype(np.int32) for i in index.tolist() if not self.dense_rows[i]]  # type: ignore[index]
        return CoveredLogProbs._trusted(
            offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            ids=np.concatenate(covered) if covered else None, logits=logits, lse=self.lse[index],
            tail_mass=self.tail_mass[index], vocab_size=self.vocab_size, epsilon=self.epsilon, dense_rows=dense)

    @classmethod
    def concatenate(cls, parts: Sequence[CoveredLogProbs]) -> CoveredLogProbs:
        """Rows of several objects (same vocabulary and ε) one after another."""
        if not parts:
            raise MetricInputError("nothing to concatenate; pass at least one CoveredLogProbs")
        first = parts[0]
        if any(p.vocab_size != first.vocab_size or p.epsilon != first.epsilon for p in parts):
            raise MetricInputError("CoveredLogProbs to concatenate must share vocabulary size and epsilon")
        sizes = np.concatenate([p.set_sizes for p in parts])
        ids = [p.ids for p in parts if p.ids is not None]
        return cls._trusted(offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                   ids=np.concatenate(ids) if ids else None,
                   logits=np.concatenate([p.logits for p in parts]), lse=np.concatenate([p.lse for p in parts]),
                   tail_mass=np.concatenate([p.tail_mass for p in parts]), vocab_size=first.vocab_size,
                   epsilon=first.epsilon, dense_rows=np.concatenate([p.dense_rows for p in parts]))

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays in memory (the cache file compresses the ids and the small arrays)."""
        ids = 0 if self.ids is None else self.ids.nbytes
        return int(self.offsets.nbytes + ids + self.logits.nbytes + self.lse.nbytes + self.tail_mass.nbytes
                   + self.dense_rows.nbytes)  # type: ignore[union-attr]


def _csr_blocks(offsets: NDArray[np.int64]) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of a CSR layout holding about :data:`_CHUNK_ELEMENTS` values each (>= 1 row)."""
    blocks = []
    n, start = offsets.size - 1, 0
    while start < n:
        end = int(np.searchsorted(offsets, offsets[start] + _CHUNK_ELEMENTS, side="right")) - 1
        end = min(n, max(end, start + 1))
        blocks.append((start, end))
        start = end
    return blocks


def _stored_mass(logits: NDArray[np.float32], offsets: NDArray[np.int64], lse: NDArray[np.float64]) -> NDArray:
    """``Σ exp(logit - lse)`` per CSR row, in float64, a block of rows at a time (bounded temporaries)."""
    out = np.empty(offsets.size - 1)
    sizes = np.diff(offsets)
    for start, end in _csr_blocks(offsets):
        segment = logits[offsets[start] : offsets[end]].astype(np.float64)
        segment -= np.repeat(lse[start:end], sizes[start:end])
        with np.errstate(over="ignore"):
            np.exp(segment, out=segment)
        out[start:end] = np.add.reduceat(segment, offsets[start:end] - offsets[start])
    return out


def _shifted_weights(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(row max, exp(x - row max))`` of ``[N, V]`` float64 rows; the normaliser's first steps."""
    row_max = np.max(x, axis=-1, keepdims=True)
    if np.isneginf(row_max).any():
        raise MetricInputError("a logits row is entirely -inf; every position needs one finite logit")
    weights = x - row_max
    np.exp(weights, out=weights)
    return row_max[..., 0], weights


def _lse_rows(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``ln Σ_j exp(x_j)`` per row in float64 (max-shifted); the one normaliser both sides use."""
    row_max, weights = _shifted_weights(x)
    return row_max + np.log(np.sum(weights, axis=-1))


def cover_from_logits(logits: ArrayLike, epsilon: float = DEFAULT_COVERAGE, *, min_tokens: int = MIN_STORED_TOKENS,
                      max_tokens: int = MAX_STORED_TOKENS) -> CoveredLogProbs:
    """Per row, the smallest set of most likely tokens that leaves out little enough — or the whole row — and
    the row's exact normaliser.

    ``logits`` is ``[N, V]`` (float32 as the model returns them; kept bit-exact). A row keeps its ``k`` most
    likely tokens for the smallest ``k >= min(min_tokens, V)`` whose left-out mass ``P_T`` satisfies
    ``P_T · max(1, ln(m / p_min)) <= epsilon`` (``m``: the smallest kept probability, ``p_min``: the row's
    smallest non-zero one; ties at the boundary: the lowest ids). So ``P_T <= epsilon``, and the KL bracket's
    width at the position — ``P_T (ln m - ln min_T q + ln(Q_T/P_T))`` at most (:func:`kl_divergence_covered`),
    about ``P_T ln(m / p_min)`` when the candidate's tail is no more extreme than the reference's own — is
    about ``epsilon`` nats or less. (The reported bracket never assumes that; it is computed exactly.)

    Where that set would hold more than ``max_tokens`` tokens, or at least half the vocabulary (8 bytes a kept
    token against 4 for every token of a whole row), the row is stored whole instead
    (:attr:`CoveredLogProbs.dense_rows`): its KL is then exact, whatever the shape of its tail — the flat,
    long tails that no capped set can cover. ``epsilon = 0`` stores every row whole (llama.cpp's
    full-vocabulary method).

    Vectorised over blocks of rows: one float64 ``exp`` of each row (the exact normaliser and the tail
    mass), one float32 sort of each row, and cumulative sums over its ``max_tokens`` largest entries only.
    """
    x = _validated_rows(logits, "logits")
    n_pos, vocab = x.shape
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0.0 <= epsilon < 1.0:
        raise MetricInputError(f"coverage epsilon must be a number in [0, 1), e.g. 1e-4; got {epsilon!r}")
    for name, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise MetricInputError(f"{name} must be a positive integer, got {value!r}")
    if min_tokens > max_tokens:
        raise MetricInputError(f"min_tokens {min_tokens} is above max_tokens {max_tokens}; swap them")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if epsilon == 0.0:
        lse = np.empty(n_pos)
        for rows in _row_slices(n_pos, vocab):
            lse[rows] = _lse_rows(x32[rows].astype(np.float64))
        return CoveredLogProbs._trusted(offsets=np.arange(n_pos + 1, dtype=np.int64) * vocab, ids=None,
                                        logits=x32.reshape(-1), lse=lse, tail_mass=np.zeros(n_pos),
                                        vocab_size=vocab, epsilon=0.0, dense_rows=np.ones(n_pos, dtype=bool))
    floor, look = min(min_tokens, vocab), min(max_tokens, vocab)
    lse = np.empty(n_pos)
    tail = np.zeros(n_pos)
    dense = np.zeros(n_pos, dtype=bool)
    kept_logits: list[NDArray[np.float32]] = []
    kept_ids: list[NDArray[np.int64]] = []
    sizes = np.empty(n_pos, dtype=np.int64)
    for rows in _row_slices(n_pos, vocab):
        block = x32[rows]
        row_max, weights = _shifted_weights(block.astype(np.float64))  # weights: p_i times the row's normaliser
        total = weights.sum(axis=-1)
        lse[rows] = row_max + np.log(total)  # the same float64 steps as _lse_rows
        # each row's `look` largest logits, descending (one float32 sort), and the mass P_T left out if the
        # j + 1 largest are kept; the first j with P_T · max(1, ln(m / p_min)) <= ε sets the size of the set
        # (m: the smallest kept probability, p_min: the row's smallest non-zero one; see the docstring)
        descending = np.sort(block, axis=1)[:, ::-1][:, :look].astype(np.float64)
        left_out = total[:, None] - np.cumsum(np.exp(descending - row_max[:, None]), axis=1)
        finite = np.where(np.isneginf(block), np.inf, block) if np.isneginf(block).any() else block
        spread = np.maximum(1.0, descending - finite.min(axis=1)[:, None])
        covers = left_out * spread <= epsilon * total[:, None]
        k = np.maximum(np.where(covers.any(axis=1), np.argmax(covers, axis=1) + 1, vocab + 1), floor)
        whole = (k > look) | (2 * k >= vocab)
        for offset in range(block.shape[0]):
            row = rows.start + offset
            if whole[offset]:
                dense[row], sizes[row] = True, vocab
                kept_logits.append(block[offset])
                continue
            size = int(k[offset])
            threshold = descending[offset, size - 1]
            above = np.flatnonzero(block[offset] > threshold)
            ties = np.flatnonzero(block[offset] == threshold)[: size - above.size]  # lowest ids first
            chosen = np.sort(np.concatenate([above, ties]))
            rest = np.ones(vocab, dtype=bool)
            rest[chosen] = False
            tail[row] = float(np.sum(weights[offset], where=rest)) / total[offset]  # summed directly: exact if tiny
            sizes[row] = size
            kept_ids.append(chosen)
            kept_logits.append(block[offset, chosen])
    return CoveredLogProbs._trusted(offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                                    ids=np.concatenate(kept_ids).astype(np.int32) if kept_ids else None,
                           logits=np.concatenate(kept_logits), lse=lse, tail_mass=tail, vocab_size=vocab,
                           epsilon=float(epsilon), dense_rows=dense)


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
        terms = lp - lq
        terms *= p  # NaN only where p_i = 0 (0 times an infinite log ratio): those terms are 0
    terms[np.isnan(terms)] = 0.0
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
    """Per-position KL from a :class:`CoveredLogProbs` reference: ``lower <= KL(P || Q) <= upper``.

    ``estimate`` is the coarsened KL (stored tokens exact, the rest lumped into one bucket); it equals
    ``lower`` and is the value to report. All three have float64 round-off (``|KL| < 1e-9``) set to 0.
    """

    estimate: NDArray[np.float64]
    lower: NDArray[np.float64]
    upper: NDArray[np.float64]


def _tail_upper(tail_lq: NDArray[np.float64], p_tail: float, cap: float, n_tail: int | None = None) -> float:
    """max Σ_i p_i ln(p_i / q_i) over {0 <= p_i <= cap, Σ p_i = p_tail}, for ``ln q_i = tail_lq``.

    ``n_tail``: how many entries of ``tail_lq`` are tail tokens (the others must be ``+inf``, which the
    maximiser never picks); default: all of them.
    """
    n_tail = tail_lq.size if n_tail is None else n_tail
    n_full = min(int(math.floor(p_tail / cap)), n_tail - 1)  # tokens given the whole cap
    remainder = p_tail - n_full * cap  # the (n_full + 1)-th token gets the rest (<= cap up to rounding)
    smallest = np.sort(np.partition(tail_lq, n_full)[: n_full + 1])  # n_full smallest, then the next one
    value = n_full * cap * math.log(cap) - cap * float(smallest[:n_full].sum())
    if remainder > 0:
        value += remainder * (math.log(remainder) - float(smallest[n_full]))
    return value


def clamp_roundoff(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Set ``|KL| < 1e-9`` (float64 round-off of a zero KL) to exactly 0; nothing else is changed."""
    return np.where(np.abs(values) < ROUNDOFF_KL, 0.0, values)


def kl_divergence_covered(ref: CoveredLogProbs, cand_logits: ArrayLike) -> KLBounds:
    r"""``KL(P_ref || Q_cand)`` per position from a coverage cache, with its exact bracket.

    Split the vocabulary into the stored set ``S`` and the tail ``T``:
    ``KL = Σ_{i∈S} p_i ln(p_i/q_i) + Σ_{i∈T} p_i ln(p_i/q_i)``. The first sum is exact (``ln p_i`` from
    the stored logits and the full-row log-sum-exp; ``ln q_i`` from the candidate's full row, normalised
    the same way, so identical logits give exactly 0). For the tail we know ``P_T = ref.tail_mass``, every
    ``q_i`` (``Q_T = Σ_{i∈T} q_i``, summed directly), and that each tail ``p_i <= m := min(P_T, min_{j∈S} p_j)``
    because ``S`` holds the most likely tokens.

    Lower bound (reported as the estimate). By the log-sum inequality,
    ``Σ_{i∈T} p_i ln(p_i/q_i) >= P_T ln(P_T / Q_T)``, so ``lower = Σ_{i∈S} p_i ln(p_i/q_i) + P_T ln(P_T/Q_T)``.
    It is the exact KL between P and Q coarsened to the stored tokens plus one "other" bucket, hence
    ``>= 0``; by the chain rule the true KL exceeds it by exactly ``P_T · KL(P_T-normalised tail ||
    Q_T-normalised tail)``, which is small when ``P_T <= ε`` is small (and 0 in the dense layout).

    Upper bound (the tightest the cache allows). ``f(p) = Σ_{i∈T} p_i ln(p_i/q_i)`` is convex in the tail
    vector and the true tail lies in the polytope ``F = {p : 0 <= p_i <= m, Σ_{i∈T} p_i = P_T}``, so
    ``max_F f`` is attained at a vertex: ``r = floor(P_T / m)`` coordinates equal to ``m``, one equal to
    ``ρ = P_T - r m``, the rest 0; by the rearrangement inequality the ``r`` tokens with the smallest
    ``q_i`` get ``m`` and the next-smallest gets ``ρ``. ``upper = Σ_{i∈S} p_i ln(p_i/q_i) + max_F f``.
    Some reference distribution consistent with the cache attains it, so no smaller bound is valid; it is
    ``+inf`` when the candidate gives a tail token probability 0.

    ``cand_logits`` is ``[N, V]`` (log-probabilities accepted: rows are renormalised in float64).
    Per-position values with ``|KL| < 1e-9`` are float64 round-off of a zero KL and are set to 0
    (:func:`clamp_roundoff`); nothing else is clamped. Cost: one O(V) pass per position.
    """
    return score_candidate(ref, cand_logits).bounds


class CandidateScores(NamedTuple):
    """What one pass over a candidate's logits gives: the KL bracket, the candidate's argmax token per position,
    and ``ln q`` of requested tokens per position (NaN where the requested id is -1)."""

    bounds: KLBounds
    top1: NDArray[np.int64]
    token_logprobs: dict[str, NDArray[np.float64]]


def _as_token_ids(values: ArrayLike, name: str, n_positions: int, vocab: int) -> NDArray[np.int64]:
    array = np.asarray(values)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer) or array.shape != (n_positions,):
        raise MetricInputError(f"tokens[{name!r}] must be {n_positions} integer token ids (-1: none)")
    if (array >= vocab).any() or (array < -1).any():
        raise MetricInputError(f"tokens[{name!r}] holds ids outside [-1, {vocab}); check the tokenizer")
    return array.astype(np.int64)


def score_candidate(ref: CoveredLogProbs, cand_logits: ArrayLike,
                    tokens: dict[str, ArrayLike] | None = None) -> CandidateScores:
    """:func:`kl_divergence_covered` plus the candidate's argmax and ``ln q`` of ``tokens`` (name -> one id per
    position, -1 for none), from one float64 log-softmax of each row rather than one per statistic."""
    if not isinstance(ref, CoveredLogProbs):
        raise MetricInputError(f"ref must be a CoveredLogProbs, got {type(ref).__name__}; use cover_from_logits")
    cand = _validated_rows(cand_logits, "cand_logits")
    _same_length(ref.lse, cand, "ref", "cand_logits")
    vocab = cand.shape[1]
    if vocab != ref.vocab_size:
        raise MetricInputError(f"ref covers a vocabulary of {ref.vocab_size} tokens but cand_logits has {vocab}; "
                               "the two models must share one tokenizer")
    token_ids = {name: _as_token_ids(ids, name, ref.n_positions, vocab) for name, ids in (tokens or {}).items()}
    lower = np.empty(ref.n_positions)
    upper = np.empty(ref.n_positions)
    top1 = np.empty(ref.n_positions, dtype=np.int64)
    token_lps = {name: np.full(ref.n_positions, np.nan) for name in token_ids}
    for rows in _row_slices(*cand.shape):
        lq_block = cand[rows].astype(np.float64)
        top1[rows] = np.argmax(lq_block, axis=1)
        lq_block -= _lse_rows(lq_block)[:, None]
        for name, ids_all in token_ids.items():
            wanted, out = ids_all[rows], token_lps[name][rows]  # out: a view of this block's rows
            has = wanted >= 0
            out[has] = lq_block[np.flatnonzero(has), wanted[has]]
        whole = ref.dense_rows[rows]  # type: ignore[index]
        if whole.any():  # rows stored whole: the exact KL, for all of them at once
            at = np.arange(rows.start, rows.stop)[whole]
            lp = np.empty((at.size, vocab))
            for j, row in enumerate(at.tolist()):
                lp[j] = ref.logits[ref.offsets[row] : ref.offsets[row + 1]]
            lp -= ref.lse[at, None]
            lower[at] = upper[at] = _kl_rows(lp, lq_block[whole])
        for offset in np.flatnonzero(~whole).tolist():
            lq = lq_block[offset]
            row = rows.start + offset
            ids, lp = ref.row(row)
            p = np.exp(lp)
            with np.errstate(invalid="ignore"):
                stored_term = float(np.where(p > 0, p * (lp - lq[ids]), 0.0).sum())
            p_tail = float(ref.tail_mass[row])
            if p_tail == 0.0 or ids.size == vocab:
                lower[row] = upper[row] = stored_term  # every tail term is 0 (or there is no tail)
                continue
            # Q_T = 1 - Q_S (rows are normalised to ~1e-15); summed directly where that would lose precision
            q_tail = max(0.0, 1.0 - float(np.exp(lq[ids]).sum()))
            if q_tail < 1e-6:
                in_tail = np.ones(vocab, dtype=bool)
                in_tail[ids] = False
                q_tail = float(np.exp(lq[in_tail]).sum())
            ln_q_tail = math.log(q_tail) if q_tail > 0 else -math.inf
            lower[row] = stored_term + p_tail * (math.log(p_tail) - ln_q_tail)
            cap = min(p_tail, float(p.min()))
            if cap <= 0.0:
                raise MetricInputError(f"ref row {row} has tail mass {p_tail:g} but a stored probability of 0, "
                                       "which is impossible; rebuild the cache with cover_from_logits")
            tail_lq = lq.copy()
            tail_lq[ids] = math.inf  # stored tokens: never the maximiser's pick
            if np.isneginf(tail_lq.min()):
                upper[row] = math.inf  # the reference may put mass where the candidate puts none
            else:
                upper[row] = max(stored_term + _tail_upper(tail_lq, p_tail, cap, vocab - ids.size), lower[row])
    lower = clamp_roundoff(lower)
    bounds = KLBounds(estimate=lower.copy(), lower=lower, upper=clamp_roundoff(upper))
    return CandidateScores(bounds=bounds, top1=top1, token_logprobs=token_lps)


def _mean_and_stderr(values: NDArray[np.float64]) -> tuple[float, float]:
    """Mean and llama.cpp's uncertainty of it: ``sqrt((E[x²] - E[x]²) / (n - 1))``, 0 when n <= 10."""
    mean = float(values.mean())
    variance = float(np.mean(values * values)) - mean * mean
    stderr = math.sqrt(variance / (values.size - 1)) if variance > 0 and values.size > 10 else 0.0
    return mean, stderr


def _percentiles(values: NDArray[np.float64], fractions: dict[str, float]) -> dict[str, float]:
    found = np.percentile(values, [100.0 * f for f in fractions.values()], method="linear")
    return {name: float(v) for name, v in zip(fractions, found, strict=True)}


KLD_PERCENTILES = {"p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p10": 0.10, "p05": 0.05, "p01": 0.01,
                   "p001": 0.001}
DELTA_P_PERCENTILES = {"p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75, "p25": 0.25, "p10": 0.10,
                       "p05": 0.05, "p01": 0.01, "p001": 0.001}


def kld_statistics(kl_per_position: ArrayLike) -> dict[str, Any]:
    """llama.cpp's "KL divergence statistics" of per-position KL values (nats).

    Keys: ``n``, ``mean``, ``mean_stderr``, ``max``, ``p999``, ``p99``, ``p95``, ``p90``, ``median``,
    ``p10``, ``p05``, ``p01``, ``p001``, ``min`` — the lines ``llama-perplexity --kl-divergence`` prints.
    Percentiles interpolate linearly at rank ``q (n - 1)`` of the sorted values; the median is the middle
    value (mean of the two middle ones for even n); ``mean_stderr`` is ``sqrt((E[x²] - E[x]²)/(n - 1))``,
    0 for n <= 10 — all as in llama.cpp's ``tools/perplexity/perplexity.cpp``.
    """
    values = _as_float_array(kl_per_position, "kl_per_position", ndim=1)
    mean, stderr = _mean_and_stderr(values)
    return {"n": int(values.size), "mean": mean, "mean_stderr": stderr, "max": float(values.max()),
            **_percentiles(values, KLD_PERCENTILES), "median": float(np.median(values)), "min": float(values.min())}


def delta_p_statistics(ref_token_logprobs: ArrayLike, cand_token_logprobs: ArrayLike) -> dict[str, Any]:
    """llama.cpp's "Token probability statistics" of ``Δp = q(t) - p(t)`` for the observed next tokens.

    Keys: ``n``, ``mean``, ``mean_stderr``, ``max``, ``p999`` … ``p001`` (99.9, 99, 95, 90, 75, 25, 10,
    5, 1, 0.1 %), ``median``, ``min``, ``rms`` = ``sqrt(mean Δp²)`` and ``rms_stderr`` =
    ``0.5 / rms · stderr(Δp²)`` (0 when rms is 0), as llama.cpp computes them. Probabilities, not percent.
    """
    dp = delta_p(ref_token_logprobs, cand_token_logprobs)
    mean, stderr = _mean_and_stderr(dp)
    mse, mse_stderr = _mean_and_stderr(dp * dp)
    rms = math.sqrt(mse)
    return {"n": int(dp.size), "mean": mean, "mean_stderr": stderr, "max": float(dp.max()),
            **_percentiles(dp, DELTA_P_PERCENTILES), "median": float(np.median(dp)), "min": float(dp.min()),
            "rms": rms, "rms_stderr": 0.5 / rms * mse_stderr if rms > 0 else 0.0}


def same_top_statistics(ref_top1_ids: ArrayLike, cand: ArrayLike) -> tuple[float, float]:
    """llama.cpp's "Same top p": share of positions whose argmax tokens agree, and ``sqrt(p(1-p)/(n-1))``."""
    share = top1_agreement(ref_top1_ids, cand)
    n = np.asarray(ref_top1_ids).shape[0]
    return share, math.sqrt(share * (1.0 - share) / (n - 1)) if n > 1 else 0.0


def brackets_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two KL brackets ``(low, high)`` overlap, i.e. the cache cannot tell which KL is lower."""
    return a[0] <= b[1] and b[0] <= a[1]


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
    ties, as llama.cpp's "Same top p"). Use ``ref.top1_ids`` of a :class:`CoveredLogProbs`.
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


def rms_delta_p_top(ref: CoveredLogProbs, cand_logits: ArrayLike) -> float:
    """RMS over positions of ``q(t*_n) - p(t*_n)``, ``t*_n`` the reference's top-1 token.

    Computable from the reference cache alone. Not llama.cpp's "RMS Δp" (that uses the observed next token;
    see :func:`rms_delta_p`), though both are 0 for identical models and similar in practice.
    """
    if not isinstance(ref, CoveredLogProbs):
        raise MetricInputError(f"ref must be a CoveredLogProbs, got {type(ref).__name__}; use cover_from_logits")
    cand_top = token_logprobs(cand_logits, ref.top1_ids)
    return rms_delta_p(ref.top1_logprobs, cand_top)


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
