"""Importance-weighted quantization error of every tensor at every candidate type, without running the model.

For a tensor ``W`` (rows ``i``, input columns ``j``) and a ggml type ``t``:

    e(W, t) = Σ_j a_j Σ_i (w_ij − ŵ_ij)²

where ``ŵ`` is ``W`` quantized to ``t`` and dequantized by ggml's own routines (``ggml_quants.roundtrip``:
the weights llama.cpp will compute with, given the same importance weights it is quantized with) and
``a_j`` is the imatrix's mean square of input column ``j`` (1 for a tensor the imatrix does not cover,
such as the token embedding, or without an imatrix). ``a_j (w_ij − ŵ_ij)²`` is the expected squared
output error of row ``i`` for inputs with those second moments and no correlation between columns.

* Rows: a large tensor is estimated from an evenly strided sample of about ``sample_elements`` weights
  (at least ``MIN_SAMPLE_ROWS`` rows; every row when it has fewer) at a per-tensor offset, scaled by
  ``n_rows / n_sampled`` — as llama.cpp's ``--target-bpw`` work (PR 15550) samples rows. Every type of a
  tensor is measured on the same rows, so comparisons between types are not blurred by the sample.
  ``sample_elements=None`` uses every row.
* Work: one tensor per worker thread (ggml's quantizers release the GIL), every pending type of that
  tensor in turn, its rows read from the memory-mapped GGUF in slices of ``CHUNK_ELEMENTS``: memory is
  bounded by workers × one slice, whatever the tensor's size.
* Cache: one JSON file per (model sha256, imatrix sha256, type, sampling, ggml version) under
  ``<cache>/sensitivity/errors/``, written every few seconds while measuring and when interrupted, so a
  stopped run resumes with the tensors it has not done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.convert.quantize import ggml_quants
from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import TensorInfo

log = logging.getLogger(__name__)
T = GGMLQuantizationType

SAMPLE_ELEMENTS = 1 << 19  # per tensor: ~0.5 M weights (PR 15550's base budget)
MIN_SAMPLE_ROWS = 64
CHUNK_ELEMENTS = 1 << 22  # rows are read and quantized in slices of about this many weights
FLUSH_SECONDS = 5.0
FORMAT = "medgemma-gguf-tensor-errors"
VERSION = 1
_SOURCE_DTYPES = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}


@dataclass(frozen=True)
class Sampling:
    """Which rows of a tensor are measured (module docstring)."""

    sample_elements: int | None = SAMPLE_ELEMENTS
    min_rows: int = MIN_SAMPLE_ROWS

    def rows(self, name: str, n_rows: int, n_per_row: int) -> np.ndarray:
        """Sorted row indices of ``name`` to measure: all, or an evenly strided sample at a per-name offset."""
        if self.sample_elements is None:
            return np.arange(n_rows)
        want = max(self.min_rows, -(-self.sample_elements // n_per_row))
        if want * 2 > n_rows:
            return np.arange(n_rows)
        stride = n_rows / want
        offset = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64 * stride
        return np.minimum((offset + stride * np.arange(want)).astype(np.int64), n_rows - 1)

    def to_json(self) -> dict[str, Any]:
        return {"sample_elements": self.sample_elements, "min_rows": self.min_rows}


def _rows_of(tensor: TensorInfo) -> tuple[int, int]:
    return int(math.prod(tensor.shape[1:])), int(tensor.shape[0])


def read_rows(path: Path, tensor: TensorInfo, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of an unquantized tensor of the GGUF at ``path`` as float32 (``(len(rows), row length)``)."""
    if tensor.ggml_type not in _SOURCE_DTYPES:
        raise UserError(f"{tensor.name} is {tensor.ggml_type.name}; measure on the unquantized (F32/BF16/F16) GGUF")
    n_rows, n_per_row = _rows_of(tensor)
    data = np.memmap(path, dtype=_SOURCE_DTYPES[tensor.ggml_type], mode="r", offset=tensor.offset,
                     shape=(n_rows, n_per_row))
    picked = np.asarray(data[rows])
    if tensor.ggml_type == T.BF16:
        return (picked.astype(np.uint32) << 16).view(np.float32)
    return picked.astype(np.float32, copy=False)


def weighted_error(rows: np.ndarray, quantized: np.ndarray, weights: np.ndarray) -> float:
    """Σ_j a_j Σ_i (w_ij − ŵ_ij)² in float64."""
    return float(np.einsum("ij,j->", (rows.astype(np.float64) - quantized) ** 2, weights))


def tensor_type_errors(path: Path, tensor: TensorInfo, types: Sequence[GGMLQuantizationType],
                       imatrix: np.ndarray | None, sampling: Sampling) -> dict[GGMLQuantizationType, float]:
    """e(tensor, t) for each of ``types`` (module docstring); ValueError for a type ggml cannot write here."""
    n_rows, n_per_row = _rows_of(tensor)
    chosen = sampling.rows(tensor.name, n_rows, n_per_row)
    scale = n_rows / len(chosen)
    weights = np.ones(n_per_row) if imatrix is None else imatrix.astype(np.float64)
    totals = dict.fromkeys(types, 0.0)
    step = max(1, CHUNK_ELEMENTS // n_per_row)
    for start in range(0, len(chosen), step):
        block = read_rows(path, tensor, chosen[start:start + step])
        for qtype in types:
            totals[qtype] += weighted_error(block, ggml_quants.roundtrip(block, qtype, imatrix), weights)
    return {qtype: value * scale for qtype, value in totals.items()}


# --- the cache ----------------------------------------------------------------------------------------
@dataclass
class ErrorCache:
    """Per-tensor errors of one (model, imatrix, type, sampling, ggml) — one JSON file, filled as measured."""

    path: Path | None
    material: dict[str, Any]
    errors: dict[str, float] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def open(cls, root: Path | None, *, model_sha: str, imatrix_sha: str | None, qtype: GGMLQuantizationType,
             sampling: Sampling) -> ErrorCache:
        material = {"format": FORMAT, "version": VERSION, "model_sha256": model_sha, "imatrix_sha256": imatrix_sha,
                    "type": qtype.name, "sampling": sampling.to_json(), "ggml": ggml_quants.version()}
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        path = None if root is None else root / f"{model_sha[:16]}-{(imatrix_sha or 'none')[:16]}-{qtype.name}-" \
                                               f"{key[:16]}.json"
        cache = cls(path, material)
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if {k: data.get(k) for k in material} == material:
                    cache.errors = {str(k): float(v) for k, v in data["errors"].items()}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("tensor error cache %s is unreadable (%s); measuring again", path, exc)
        return cache

    def flush(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({**self.material, "errors": self.errors}, indent=0) + "\n")
            self.dirty = False
        except (OSError, UserError) as exc:
            log.warning("cannot write the tensor error cache %s (%s); continuing without it", self.path, exc)
            self.path = None


# --- the whole model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorWork:
    """What is left to measure: per tensor, the types not in the cache."""

    pending: dict[str, tuple[GGMLQuantizationType, ...]]
    sampled_elements: dict[str, int]  # per tensor: the weights measured per type

    @property
    def n_items(self) -> int:
        """Pending (tensor, type) pairs."""
        return sum(len(types) for types in self.pending.values())

    def elements_by_type(self) -> dict[GGMLQuantizationType, int]:
        totals: dict[GGMLQuantizationType, int] = {}
        for name, types in self.pending.items():
            for qtype in types:
                totals[qtype] = totals.get(qtype, 0) + self.sampled_elements[name]
        return totals


class TensorErrors:
    """Errors of ``tensors`` of one GGUF at ``types`` (each tensor at the types in ``allowed[tensor]``)."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], allowed: Mapping[str, Sequence[GGMLQuantizationType]],
                 *, imatrix: Any | None, model_sha: str, imatrix_sha: str | None, cache_root: Path | None,
                 sampling: Sampling = Sampling()):
        self.path, self.imatrix, self.sampling = Path(path), imatrix, sampling
        self.tensors = {t.name: t for t in tensors}
        self.allowed = {name: tuple(types) for name, types in allowed.items()}
        types = sorted({t for ts in self.allowed.values() for t in ts}, key=lambda t: t.name)
        self.caches = {qtype: ErrorCache.open(cache_root, model_sha=model_sha, imatrix_sha=imatrix_sha, qtype=qtype,
                                              sampling=sampling) for qtype in types}

    def column_weights(self, name: str) -> np.ndarray | None:
        """The imatrix's mean squares for tensor ``name`` (None when it is not covered)."""
        if self.imatrix is None or name not in self.imatrix.sums:
            return None
        values = self.imatrix.mean_squares(name)
        return values if values.size == self.tensors[name].shape[0] else None

    def work(self) -> ErrorWork:
        pending = {}
        sampled = {}
        for name, types in self.allowed.items():
            left = tuple(t for t in types if name not in self.caches[t].errors)
            if left:
                pending[name] = left
            n_rows, n_per_row = _rows_of(self.tensors[name])
            sampled[name] = len(self.sampling.rows(name, n_rows, n_per_row)) * n_per_row
        return ErrorWork(pending, sampled)

    def time_types(self, types: Iterable[GGMLQuantizationType],
                   elements: int = 1 << 16) -> dict[GGMLQuantizationType, float]:
        """Seconds per weight of each type, from quantizing a few rows of the first tensor that fits it."""
        seconds = {}
        for qtype in types:
            name = next(n for n, ts in self.allowed.items() if qtype in ts)
            tensor = self.tensors[name]
            n_rows, n_per_row = _rows_of(tensor)
            rows = read_rows(self.path, tensor, np.arange(min(n_rows, max(1, elements // n_per_row))))
            weights = self.column_weights(name)
            if weights is None and ggml_quants.check_rows(qtype, n_per_row, False):  # before the imatrix exists
                weights = np.ones(n_per_row, dtype=np.float32)
            ggml_quants.prepare(qtype)  # the grids are built once per run, not per weight
            started = time.perf_counter()
            ggml_quants.roundtrip(rows, qtype, weights)
            seconds[qtype] = (time.perf_counter() - started) / rows.size
        return seconds

    def measure(self, workers: int = 1, on_tensor: Callable[[str, int], None] | None = None) -> int:
        """Measure every pending (tensor, type); returns how many were measured. Caches are written as it goes
        and on any interruption, so a later call continues where this one stopped."""
        work = self.work()
        for qtype in work.elements_by_type():
            ggml_quants.prepare(qtype)  # before the threads start
        done = 0
        last_flush = time.monotonic()
        names = sorted(work.pending, key=lambda n: -work.sampled_elements[n])  # biggest first: a balanced end
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tensor-errors") as pool:
                running: dict[Future[dict[GGMLQuantizationType, float]], str] = {}
                queue = iter(names)
                try:
                    for name in queue:
                        running[pool.submit(self._one, name, work.pending[name])] = name
                        if len(running) >= max(1, workers):
                            break
                    while running:
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for future in finished:
                            name = running.pop(future)
                            for qtype, value in future.result().items():
                                self.caches[qtype].errors[name] = value
                                self.caches[qtype].dirty = True
                            done += len(work.pending[name])
                            if on_tensor is not None:
                                on_tensor(name, len(work.pending[name]))
                            following = next(queue, None)
                            if following is not None:
                                running[pool.submit(self._one, following, work.pending[following])] = following
                        if time.monotonic() - last_flush > FLUSH_SECONDS:
                            self.flush()
                            last_flush = time.monotonic()
                except BaseException:
                    for future in running:
                        future.cancel()
                    raise
        finally:
            self.flush()
        return done

    def _one(self, name: str, types: Sequence[GGMLQuantizationType]) -> dict[GGMLQuantizationType, float]:
        return tensor_type_errors(self.path, self.tensors[name], types, self.column_weights(name), self.sampling)

    def flush(self) -> None:
        for cache in self.caches.values():
            cache.flush()

    def errors(self) -> dict[str, dict[GGMLQuantizationType, float]]:
        """Every measured error: tensor → type → e (after ``measure``, all of ``allowed``)."""
        return {name: {t: self.caches[t].errors[name] for t in types if name in self.caches[t].errors}
                for name, types in self.allowed.items()}
