"""Per-tensor-group sensitivity: the KL divergence each group adds at each candidate ggml type.

A *group* is one quantizable tensor kind of one layer (``blk.3.attn_v``, ``blk.3.ffn_down``, …) or a global
matrix (``token_embd``, ``output``), named by ``quant_types.tensor_kind``. For a group ``g`` and a
candidate type ``t``, ΔKL(g, t) is the mean KL divergence (nats per position, ``quant_eval.metrics``)
between the unquantized model — the reference — and the same model with only ``g`` stored as ``t``,
over the *calibration parts*: text and image-conditioned prompts built from the project's calibration
set (``convert.calibration``, the set the imatrix is computed on; the evaluation slices are kept apart):

* text: each text-only conversation of the set as prose (its turns' text, joined);
* image-conditioned: each one-image conversation as an image question whose two options are its own
  answer and the next image conversation's answer — so the positions after the image hold the request
  and two image reports.

Whole-model measurements quantize the model with llama.cpp through the recipe engine
(``convert.quantize.quantize_file`` with a recipe whose base is the source type and whose rules name the
measured tensors), with the imatrix, and scored by ``quant_eval.evaluate.evaluate_candidate`` against the
cached reference (``quant_eval.reference``). Three methods:

* ``fast`` (default): no model run per (group, type). Every tensor is quantized and dequantized alone by
  ggml's own routines through ctypes and its imatrix-weighted error ``e = Σ_j a_j Σ_i (w_ij − ŵ_ij)²`` is
  measured on a sample of its rows (``tensor_errors``: one tensor per worker thread, cached per model,
  imatrix and type, resumable). The errors become ΔKL through ``ΔKL(g, t) = c_kind · f_block(layer) ·
  e(g, t)`` (``fast_sensitivity``; a power law in ``e`` with more probe types), fitted to whole-model KL
  measurements at the probe type (default Q3_K), each cached as soon as it is measured: one per tensor kind
  (all tensors of that kind; 8 for Gemma 3) and one per (block, layer) for up to ``LAYER_SAMPLE`` = 4
  sampled layers (that layer's attention or FFN tensors; 8), the factor interpolated over the other
  layers. The layer factor is there because the error-to-KL ratio varies across layers by orders of
  magnitude, differently for attention and FFN (on the trained fixture: residual std of log(ΔKL / e)
  2.16 with per-kind constants, 0.27 with per-(block, layer) factors; AUTO at Q4_K_M's size 0.647x its
  KL with the first, proxy 0.326x). The calibration conversations default to the first ``FAST_SAMPLE``
  text and image ones. Cost: groups × types ggml round trips on sampled rows, plus kinds × probes + 2 ×
  sampled layers quantizations and evaluations (16 for Gemma 3 of any depth, plus the reference).
* ``measured``: that measurement for every (group, type): ``groups × types`` quantizations and model
  evaluations.
* ``proxy``: a calibrated proxy. One whole-model llama.cpp quantization per candidate type;
  each tensor is dequantized with gguf-py and its imatrix-weighted squared error
  ``e(g, t) = Σ_rows Σ_j a_j (w_ij − ŵ_ij)²`` is summed over the group (``a_j``: the imatrix mean square of
  input column j; 1 without an imatrix or for tensors it does not cover, such as the token embedding).
  The KL is then measured directly at the *probe* types only (default Q2_K and Q5_K) for every group, and
  ΔKL(g, t) is read off the line through the probes in log-log space:
  ``log ΔKL = α_g + β_g log e(g, t)`` (one probe: β = 1, ΔKL ∝ e, the second-order behaviour of KL for
  small perturbations; β is clamped to [0.5, 2]). Cost: ``types`` quantizations for the errors plus
  ``groups × probes`` quantizations and evaluations. Probes are themselves measured exactly.

``proxy_agreement`` measures a sample of (group, type) pairs directly and reports Spearman's rank
correlation between them and the table's ΔKL (the benchmark and tests print and check it).

Scale: every direct measurement writes one whole model (the source type but for one group) to a temporary
folder (``$TMPDIR``, which needs the source file's size free) and evaluates it on the calibration parts,
so on MedGemma 4B (239 groups) the proxy needs 478 whole-model writes and evaluations (not measured here on
the real model); ``--sensitivity-sample`` (``max_text`` / ``max_images``) trades positions for time.

Results are cached in ``<cache_dir>/sensitivity/<key>.json``; the key hashes the model file, the mmproj,
the imatrix, the candidate types, the probes, the method and the calibration selection (for ``fast`` also
the row sampling and ggml's version), so a changed input is re-measured. The reference outputs go to the
evaluation's reference cache. The file records the cost (wall seconds, quantizations, model evaluations,
tensor errors) and the plan.

``plan_sensitivity`` resolves the inputs, looks up every cache and estimates the time (``Plan``) without
measuring anything; ``SensitivityJob.run`` measures; ``measure_sensitivity`` does both.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.cache import cache_root
from medgemma_gguf.convert.quantize import ggml_quants
from medgemma_gguf.convert.quantize.auto import (
    GroupShape,
    ModelLayout,
    SensitivityTable,
    TensorGroup,
    ggml_type,
    parse_sensitivity_table,
)
from medgemma_gguf.convert.quantize.calibration import CalibrationSet, load_calibration, render_image
from medgemma_gguf.convert.quantize.fast_sensitivity import (
    DEFAULT_FAST_PROBES,
    DISK_BYTES_PER_SECOND,
    LAYER_SAMPLE,
    CalibrationPoint,
    FastFit,
    ModelTiming,
    Plan,
    PointCache,
    fit_fast,
    global_layers,
    plan_points,
    sample_layers,
    time_model,
)
from medgemma_gguf.convert.quantize.imatrix import check_imatrix_matches, read_imatrix
from medgemma_gguf.convert.quantize.llama_quantize import QuantSpec, quantize_file
from medgemma_gguf.convert.quantize.recipe import parse_recipe
from medgemma_gguf.convert.quantize.tensor_errors import Sampling, TensorErrors
from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import is_quantizable, read_gguf_info
from medgemma_gguf.hashing import cached_file_sha256
from medgemma_gguf.quant_eval.evaluate import Candidate, evaluate_candidate
from medgemma_gguf.quant_eval.items import ImageRef, Item
from medgemma_gguf.quant_eval.metrics import spearman_rank_correlation
from medgemma_gguf.quant_eval.reference import (
    CACHE_FORMAT_VERSION,
    HELDOUT_PART,
    CoverageSpec,
    GGUFReference,
    ReferenceCache,
    heldout_hash,
    reference_parts,
)
from medgemma_gguf.quant_eval.slices import Slice, TextChunk, slice_hash
from medgemma_gguf.quant_types import (
    DEFAULT_CANDIDATES,
    GGML_IMATRIX_TYPES,
    LLAMA_IMATRIX_TYPES,
    tensor_kind,
    tensor_type,
)

log = logging.getLogger(__name__)
T = GGMLQuantizationType

CACHE_VERSION = 1
METHODS = ("fast", "proxy", "measured")
DEFAULT_METHOD = "fast"
# of the fast method's table assembly (part of its cache key, with LAYER_SAMPLE); 2: per-(block, layer) factors;
# 3: LAYER_SAMPLE 4 (was 6)
FAST_VERSION = 3
# the fast method's calibration points score the first N text and N image conversations unless told otherwise.
# 1 (about a twentieth of the set's positions): on the trained fixture AUTO from 1 gave 0.299x Q4_K_M's KL at its
# size, from 2 0.289x and from 4 0.302x (BENCHMARKS.md), and the evaluations, which dominate on MedGemma 4B, take
# about half the time of 2
FAST_SAMPLE = 1
# an importance-matrix pass over the calibration set costs about this many forward passes over it (plan
# estimate: the activations of every matrix multiplication are copied out and summed)
IMATRIX_PASS_FACTOR = 1.5
DEFAULT_PROBES = ("Q2_K", "Q5_K")
EXPONENT_RANGE = (0.5, 2.0)
MIN_DELTA_KL = 1e-12  # a measured ΔKL of 0 (no change at all) is floored to this for the log-log fit
OPTION_CHARS = 240  # an image item's options are its answers cut to about this many characters
PROVENANCE = {"source": "medgemma-gguf calibration set (convert/calibration)", "license": "Apache-2.0",
              "author": "medgemma-gguf contributors"}


# ---------------------------------------------------------------------------------------------------
# calibration parts


def _texts(message: dict[str, Any]) -> str:
    return "\n".join(part["text"].strip() for part in message["content"] if part["type"] == "text").strip()


def _cut(text: str, limit: int = OPTION_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def _check_sample(max_text: int | None, max_images: int | None) -> None:
    for label, value in (("max_text", max_text), ("max_images", max_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"{label} must be a whole number of at least 0, got {value!r}")


def calibration_parts(calibration: Any | None = None, *, max_text: int | None = None,
                      max_images: int | None = None, image_size: int = 256,
                      render: bool = True) -> tuple[list[Any], list[Any]]:
    """(text chunks, image items) of a calibration set (default: the bundled one); see the module docstring.

    ``max_text`` / ``max_images`` keep the first N of each (None: all). ``render=False``: the image items
    without their images (for counting their text, without drawing every picture).
    """
    from PIL import Image

    if not isinstance(calibration, CalibrationSet):
        calibration = load_calibration(calibration)
    _check_sample(max_text, max_images)
    chunks = []
    image_items = []
    for item in calibration.items:
        specs = item.image_specs
        if not specs:
            text = "\n\n".join(t for t in (_texts(m) for m in item.messages) if t)
            if text:
                chunks.append(TextChunk(id=f"calibration-{item.id}", text=text, provenance=dict(PROVENANCE)))
        elif len(specs) == 1:
            question = "\n".join(_texts(m) for m in item.messages if m["role"] == "user")
            answer = "\n".join(_texts(m) for m in item.messages if m["role"] == "assistant")
            if question and answer:
                image_items.append((item.id, question, answer, specs[0]))
    paired = [(item_id, question, answer, spec, image_items[(index + 1) % len(image_items)][2])
              for index, (item_id, question, answer, spec) in enumerate(image_items)]
    paired = [entry for entry in paired if len(image_items) > 1 and entry[4] != entry[2]]
    chunks = chunks[:max_text] if max_text is not None else chunks
    items = []
    for item_id, question, answer, spec, other in paired[:max_images] if max_images is not None else paired:
        image = None
        if render:
            buffer = io.BytesIO()
            Image.fromarray(render_image(spec, image_size)).save(buffer, format="PNG")
            image = ImageRef(data=buffer.getvalue())
        items.append(Item(id=f"calibration-{item_id}", question=question, options=[_cut(answer), _cut(other)],
                          answer_index=0, image=image, provenance=dict(PROVENANCE)))
    if not chunks and not items:
        raise UserError("the calibration selection is empty; keep at least one text or image conversation")
    return chunks, items


# ---------------------------------------------------------------------------------------------------
# groups of a model


def model_groups(info: Any) -> list[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]]:
    """(group name, ((tensor, ggml shape), ...)) for every quantizable tensor of a text GGUF, in file order."""
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for tensor in info.tensors:
        if not is_quantizable(tensor.name, tensor.shape):
            continue
        kind, layer = tensor_kind(tensor.name)
        name = kind if layer is None else f"blk.{layer}.{kind}"
        groups.setdefault(name, []).append((tensor.name, tuple(int(d) for d in tensor.shape)))
    return [(name, tuple(tensors)) for name, tensors in groups.items()]


def _fits(qtype: GGMLQuantizationType, tensors: Iterable[tuple[str, tuple[int, ...]]],
          covered: frozenset[str] | None = None) -> bool:
    """Whether llama.cpp can write every tensor as ``qtype``: the block divides the row length, and types
    ggml only writes with an imatrix have imatrix data for the tensor (``covered``: the imatrix's names)."""
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype in GGML_IMATRIX_TYPES and any(name not in (covered or ()) for name, _ in tensors):
        return False
    return all(shape[0] % block == 0 for _, shape in tensors)


# ---------------------------------------------------------------------------------------------------
# measurement


@dataclass
class Cost:
    """What a measurement spent."""

    seconds: float = 0.0
    quantizations: int = 0
    evaluations: int = 0
    reference_parts_computed: int = 0
    error_items: int = 0  # fast: (tensor, type) errors measured (not from the cache)
    errors_seconds: float = 0.0
    points_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "quantizations": self.quantizations,
                "evaluations": self.evaluations, "reference_parts_computed": self.reference_parts_computed,
                "error_items": self.error_items, "errors_seconds": round(self.errors_seconds, 3),
                "points_seconds": round(self.points_seconds, 3)}


@dataclass(frozen=True)
class Measurement:
    """KL of one quantized variant of the model against the reference (nats per position).

    ``kl_mean`` is the report's ``kld_mean`` (``quant_eval.metrics``: the coarsened KL, the low end of the
    exact bracket, off the true value by the reference's tail mass times the tail's own KL); ``kl_high`` is
    the bracket's worst-case upper end, kept for the record.
    """

    kl_mean: float
    text_kl_mean: float | None
    image_kl_mean: float | None
    kl_high: float | None = None


class Measurer:
    """Quantizes variants of one source model through the recipe engine and scores them on the calibration parts.

    Use as a context manager; temporary files live in a private folder removed on exit.
    """

    def __init__(self, source: Path, mmproj: Path | None, imatrix: Any | None, *, cache_dir: Path,
                 calibration: Any | None = None, max_text: int | None = None, max_images: int | None = None,
                 n_threads: int | None = None, progress: bool = False):
        self.source, self.mmproj, self.imatrix = Path(source), (Path(mmproj) if mmproj else None), imatrix
        self.info = read_gguf_info(self.source)
        types = {t.ggml_type for t in self.info.tensors if is_quantizable(t.name, t.shape)}
        if len(types) != 1 or next(iter(types)) not in (T.F32, T.BF16, T.F16):
            names = ", ".join(sorted(t.name for t in types))
            raise UserError(f"{self.source.name} holds {names} matrices; measure sensitivity on the unquantized "
                            "(F32/BF16/F16) text GGUF that convert wrote")
        self.source_type = next(iter(types))
        self.n_threads, self.progress = n_threads, progress
        self.cost = Cost()
        cache = ReferenceCache(Path(cache_dir) / "reference")
        reference = GGUFReference(str(self.source), cache.cache_dir, mmproj=self.mmproj, n_threads=n_threads)
        chunks, items = calibration_parts(calibration, max_text=max_text, max_images=max_images)
        if self.mmproj is None:
            items = []  # a text-only model: the image-conditioned prompts cannot be asked
        self.slices = [Slice(spec="calibration-images", items=tuple(items))] if items else []
        try:
            self.parts = reference_parts(reference, cache, heldout=chunks, slices=self.slices, progress=progress)
        finally:
            reference.close()
        self.cost.reference_parts_computed = cache.misses
        self.signature = reference.signature
        self.image_size = max((int(p.meta.get("image_size") or 0) for p in self.parts), default=0)
        self.n_positions = int(sum(p.pos_seq.size for p in self.parts))
        self.n_image_positions = int(sum(int(p.after_image.sum()) for p in self.parts))
        self.covered = frozenset(imatrix.tensor_names) if imatrix is not None else frozenset()
        self._tmp: Path | None = None

    def __enter__(self) -> Measurer:
        self._tmp = Path(tempfile.mkdtemp(prefix="medgemma-sensitivity-"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def quantize(self, types: dict[str, GGMLQuantizationType], base: GGMLQuantizationType | None,
                 label: str) -> Path:
        """A GGUF with ``types`` for the named tensors and ``base`` (default: the source type) for the rest."""

        if self._tmp is None:
            raise RuntimeError("use the Measurer as a context manager")
        lines = [f'name = "{label}"', f'base = "{(base or self.source_type).name}"', ""]
        for tensor, qtype in types.items():
            lines += ["[[rules]]", f"pattern = {json.dumps('^' + re.escape(tensor) + '$')}",
                      f'type = "{qtype.name}"', ""]
        recipe = parse_recipe("\n".join(lines), f"<sensitivity {label}>")
        path = self._tmp / f"{label}.gguf"
        start = time.perf_counter()
        quantize_file(self.source, path, QuantSpec(label, recipe=recipe), imatrix=self.imatrix,
                      imatrix_name="imatrix" if self.imatrix is not None else None, force=True,
                      n_threads=self.n_threads, progress=False)
        self.cost.quantizations += 1
        self.cost.seconds += time.perf_counter() - start
        return path

    def evaluate(self, path: Path) -> Measurement:
        """Mean KL of ``path`` against the reference over the calibration parts."""

        start = time.perf_counter()
        row = evaluate_candidate(Candidate(path, self.mmproj if self.slices else None), self.parts,
                                 {s.spec: s for s in self.slices}, self.signature, self.image_size,
                                 n_threads=self.n_threads, measure_speed=False)
        self.cost.evaluations += 1
        self.cost.seconds += time.perf_counter() - start
        if row.kld is None:
            raise UserError(f"{path.name} gave no KL measurement; check the calibration set")
        heldout = row.parts.get("heldout")
        return Measurement(kl_mean=row.kld.mean, text_kl_mean=heldout.kld_mean if heldout else None,
                           image_kl_mean=row.image_kld.mean if row.image_kld else None, kl_high=row.kld.mean_high)

    def measure(self, tensors: Iterable[str], qtype: GGMLQuantizationType, label: str) -> Measurement:
        """KL with only ``tensors`` stored as ``qtype`` (the rest at the source type); the file is deleted."""
        path = self.quantize(dict.fromkeys(tensors, qtype), None, label)
        try:
            return self.evaluate(path)
        finally:
            path.unlink(missing_ok=True)

    def weighted_errors(self, qtype: GGMLQuantizationType,
                        groups: Sequence[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]]) -> dict[str, float]:
        """e(g, qtype) for every group that fits ``qtype``, from one whole-model quantization (module docstring)."""
        from gguf import GGUFReader
        from gguf.quants import dequantize

        fitting = [(name, tensors) for name, tensors in groups if _fits(qtype, tensors, self.covered)]
        path = self.quantize({tensor: qtype for _, tensors in fitting for tensor, _ in tensors}, self.source_type,
                             f"all-{qtype.name}")
        start = time.perf_counter()
        try:
            source = {t.name: t for t in GGUFReader(self.source).tensors}
            quantized = {t.name: t for t in GGUFReader(path).tensors}
            errors: dict[str, float] = {}
            for name, tensors in fitting:
                total = 0.0
                for tensor, shape in tensors:
                    got = quantized[tensor]
                    if GGMLQuantizationType(int(got.tensor_type)) != qtype:
                        raise UserError(f"llama.cpp wrote {tensor} as {got.tensor_type.name}, not {qtype.name}; "
                                        "drop that candidate type")
                    row = shape[0]
                    w = dequantize(source[tensor].data, source[tensor].tensor_type).reshape(-1, row)
                    q = dequantize(got.data, got.tensor_type).reshape(-1, row)
                    weight = self._column_weights(tensor, row)
                    total += float(np.einsum("ij,j->", (w.astype(np.float64) - q) ** 2, weight))
                errors[name] = total
        finally:
            path.unlink(missing_ok=True)
        self.cost.seconds += time.perf_counter() - start
        return errors

    def _column_weights(self, tensor: str, row: int) -> np.ndarray:
        if self.imatrix is not None and tensor in self.imatrix.sums:
            weights = self.imatrix.mean_squares(tensor).astype(np.float64)
            if weights.size == row:
                return weights
        return np.ones(row)


# ---------------------------------------------------------------------------------------------------
# the table


def fit_power_law(errors: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """(α, β) of ``log ΔKL = α + β log e`` through the probe points (β = 1 for one probe; β clamped)."""
    x = np.log(np.maximum(np.asarray(errors, dtype=np.float64), 1e-300))
    y = np.log(np.maximum(np.asarray(measured, dtype=np.float64), MIN_DELTA_KL))
    beta = 1.0 if x.size == 1 or np.ptp(x) == 0 else float(np.polyfit(x, y, 1)[0])
    beta = min(max(beta, EXPONENT_RANGE[0]), EXPONENT_RANGE[1])
    alpha = float(np.mean(y - beta * x))
    return alpha, beta


def predict(alpha: float, beta: float, error: float) -> float:
    """ΔKL from the fitted line at weighted error ``error``."""
    return float(math.exp(alpha + beta * math.log(max(error, 1e-300))))


@dataclass
class SensitivityResult:
    """A measured table with how it was made."""

    table: SensitivityTable
    meta: dict[str, Any]
    cache_path: Path | None
    from_cache: bool = False
    probes: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> type -> measured ΔKL
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> type -> e(g, t)

    @property
    def cost(self) -> dict[str, Any]:
        return self.meta["cost"]


def _parse_types(names: Sequence[str | GGMLQuantizationType], what: str) -> tuple[GGMLQuantizationType, ...]:
    types = []
    for name in names:
        qtype = ggml_type(name)
        row = tensor_type(qtype)
        if row is None or not row.quantized:
            raise UserError(f"{what} {qtype.name} is not a quantized type llama.cpp writes; use e.g. Q4_K, IQ2_S")
        if qtype not in types:
            types.append(qtype)
    if not types:
        raise UserError(f"no {what} types given")
    return tuple(sorted(types, key=lambda t: GGML_QUANT_SIZES[t][1] / GGML_QUANT_SIZES[t][0]))


def kl_measurement_key() -> dict[str, Any]:
    """How whole-model KL is measured (the reference cache format and its default coverage): part of every
    cache key of a measured value."""
    return {"reference_cache": CACHE_FORMAT_VERSION, **CoverageSpec().key()}


def cache_key(*, model_sha: str, mmproj_sha: str | None, imatrix_sha: str | None, calibration_sha: str,
              max_text: int | None, max_images: int | None, candidates: Sequence[GGMLQuantizationType],
              probes: Sequence[GGMLQuantizationType], method: str, extra: dict[str, Any] | None = None) -> str:
    """The cache key of a sensitivity measurement (every input that changes the table, including how the KL
    is measured: the reference cache format and its default coverage)."""
    import llama_cpp

    material = {"version": CACHE_VERSION, "model": model_sha, "mmproj": mmproj_sha, "imatrix": imatrix_sha,
                "calibration": calibration_sha, "max_text": max_text, "max_images": max_images,
                "candidates": [t.name for t in candidates],
                "probes": [t.name for t in probes] if method != "measured" else [], "method": method,
                "llama_cpp": llama_cpp.__version__, "kl": kl_measurement_key(), **({"extra": extra} if extra else {})}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class SensitivityOptions:
    """How a sensitivity table is measured (``plan_sensitivity``, ``measure_sensitivity`` and AUTO's
    ``folder.AutoRequest``): each setting declared and checked here, once, when the options are made.

    ``method``: ``fast``, ``proxy`` or ``measured`` (module docstring). ``candidates``: the types offered to
    the allocator; without an importance matrix, those llama.cpp refuses without one are dropped when planned.
    ``probes``: the probe types (default: Q3_K for ``fast``'s kind and (block, layer) points, Q2_K and Q5_K
    for ``proxy``; none for ``measured``). ``calibration``: a calibration JSONL or ``CalibrationSet``
    (default: the bundled set);
    ``max_text`` / ``max_images``: the calibration conversations KL is measured on (``fast``: FAST_SAMPLE
    each when neither is given; otherwise all). ``cache_dir``: the cache root (default
    ``cache.cache_root``). ``force``: measure again, ignoring the caches (AUTO: also recompute the
    importance matrix and rebuild the quant). ``n_threads``: llama.cpp's threads; ``workers``: threads for
    the per-tensor errors (default ``n_threads`` or the CPU count). ``sampling``: the fast method's row
    sampling (default ``Sampling()``).
    """

    method: str = DEFAULT_METHOD
    candidates: Sequence[str | GGMLQuantizationType] = DEFAULT_CANDIDATES
    probes: Sequence[str | GGMLQuantizationType] | None = None
    calibration: Path | str | Any | None = None
    max_text: int | None = None
    max_images: int | None = None
    cache_dir: Path | str | None = None
    force: bool = False
    n_threads: int | None = None
    workers: int | None = None
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown sensitivity method {self.method!r}; choose one of {', '.join(METHODS)}")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if self.probes is not None:
            object.__setattr__(self, "probes", tuple(self.probes))
        self.candidate_types()
        self.probe_types()
        _check_sample(self.max_text, self.max_images)

    def candidate_types(self) -> tuple[GGMLQuantizationType, ...]:
        """The candidates as ggml types, smallest first (before any are dropped for want of an imatrix)."""
        return _parse_types(self.candidates, "candidate")

    def probe_types(self) -> tuple[GGMLQuantizationType, ...]:
        """The probe types, smallest first (the method's defaults when none are given; none for ``measured``)."""
        if self.method == "measured":
            return ()
        probes = self.probes
        if probes is None:
            probes = DEFAULT_FAST_PROBES if self.method == "fast" else DEFAULT_PROBES
        return _parse_types(probes, "probe")

    def sample(self) -> tuple[int | None, int | None]:
        """(max_text, max_images) as measured: ``fast`` takes FAST_SAMPLE of each when neither is given."""
        if self.method == "fast" and self.max_text is None and self.max_images is None:
            return FAST_SAMPLE, FAST_SAMPLE
        return self.max_text, self.max_images

    def root(self) -> Path:
        """The cache root: ``cache_dir``, else ``cache.cache_root()``."""
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else cache_root()

    def worker_count(self) -> int:
        """Threads for the per-tensor errors: ``workers``, else ``n_threads``, else the CPU count."""
        return max(1, self.workers or self.n_threads or os.cpu_count() or 1)


def _layout(groups: Sequence[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]],
            types: Sequence[GGMLQuantizationType], covered: frozenset[str],
            source_type: GGMLQuantizationType) -> ModelLayout:
    """The groups and their candidate types: those that fit each group's rows (and imatrix coverage), plus the
    source type."""
    shapes = tuple(GroupShape(name, tensors) for name, tensors in groups)
    candidates = {name: (*(t for t in types if _fits(t, tensors, covered)), source_type) for name, tensors in groups}
    return ModelLayout(source_type, shapes, candidates)


@dataclass
class SensitivityJob:
    """A planned sensitivity measurement (``plan_sensitivity``): its inputs resolved, its cache looked up, its
    plan printed before ``run`` does the work."""

    source: Path
    mmproj: Path | None
    imatrix: Path | None
    imatrix_data: Any | None
    method: str
    types: tuple[GGMLQuantizationType, ...]
    probes: tuple[GGMLQuantizationType, ...]
    calibration: Any
    max_text: int | None
    max_images: int | None
    root: Path
    n_threads: int | None
    workers: int
    key: str
    path: Path
    groups: list[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]]
    hashes: dict[str, str | None]
    plan: Plan
    cached: SensitivityResult | None = None
    errors: TensorErrors | None = None
    points: list[CalibrationPoint] = field(default_factory=list)
    point_cache: PointCache | None = None
    timing: ModelTiming | None = None
    imatrix_pending: bool = False
    imatrix_chunks: int | None = None  # with imatrix_pending: the chunks it will read (None: all)
    force: bool = False
    covered: frozenset[str] = frozenset()
    source_type: GGMLQuantizationType = T.F32
    n_layers: int = 0  # fast: the model's layers, and those with global attention (the layer factors' fit)
    global_layers: frozenset[int] = frozenset()

    def layout(self) -> ModelLayout:
        """The groups and their candidate types (what the table will offer the allocator), before measuring."""
        return _layout(self.groups, self.types, self.covered, self.source_type)

    def pending_points(self) -> list[CalibrationPoint]:
        """The calibration points the cache does not hold (all of them with ``force``)."""
        if self.point_cache is None:
            return []
        return [p for p in self.points if self.force or self.point_cache.get(p) is None]

    def run(self, progress: bool = True) -> SensitivityResult:
        """Measure what the plan says (reusing every cached part) and return the table."""
        if self.imatrix_pending:
            raise RuntimeError("plan again once the importance matrix exists")
        if self.cached is not None:
            return self.cached
        started = time.perf_counter()
        if self.method == "fast":
            table, meta_extra, cost = self._run_fast(progress)
            probe_values, errors = meta_extra.pop("probe_values"), meta_extra.pop("errors")
            calibration_meta = meta_extra.pop("calibration")
        else:
            with Measurer(self.source, self.mmproj, self.imatrix_data, cache_dir=self.root,
                          calibration=self.calibration, max_text=self.max_text, max_images=self.max_images,
                          n_threads=self.n_threads, progress=progress) as measurer:
                if self.method == "measured":
                    table, probe_values, errors = _measure_all(measurer, self.groups, self.types, progress), {}, {}
                else:
                    table, probe_values, errors = _measure_proxy(measurer, self.groups, self.types, self.probes,
                                                                 progress)
                calibration_meta = _calibration_meta(measurer, self.calibration, self.max_text, self.max_images)
                cost = measurer.cost
            meta_extra = {}
        cost.seconds = time.perf_counter() - started
        meta = {
            "method": self.method, "candidates": [t.name for t in self.types], "probes": [t.name for t in self.probes],
            "source": str(self.source), "source_sha256": self.hashes["model"], "mmproj_sha256": self.hashes["mmproj"],
            "imatrix": str(self.imatrix) if self.imatrix else None, "imatrix_sha256": self.hashes["imatrix"],
            "calibration": calibration_meta, "groups": len(self.groups), "cost": cost.to_json(),
            "plan": self.plan.to_json(), **meta_extra,
        }
        data = {"key": self.key, "table": json.loads(table.to_json()), "meta": meta, "probes": probe_values,
                "errors": errors}
        path: Path | None = self.path
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(data, indent=1) + "\n")
        except (OSError, UserError) as exc:
            log.warning("cannot write the sensitivity cache %s (%s); continuing without it", self.path, exc)
            path = None
        return SensitivityResult(table=table, meta=meta, cache_path=path, probes=probe_values, errors=errors)

    def _run_fast(self, progress: bool) -> tuple[SensitivityTable, dict[str, Any], Cost]:
        """Per-tensor errors (parallel, cached per type), calibration points (cached each), the per-kind fit."""
        assert self.errors is not None and self.point_cache is not None
        cost = Cost()
        started = time.perf_counter()
        work = self.errors.work()
        with _bar(work.n_items, "sensitivity (tensor errors)", progress) as bar:
            cost.error_items = self.errors.measure(self.workers, on_tensor=lambda _name, n: bar.update(n))
        cost.errors_seconds = time.perf_counter() - started
        tensor_errors = self.errors.errors()
        pending = self.pending_points()
        measured: dict[str, dict[str, Any]] = {p.label: self.point_cache.get(p) or {} for p in self.points
                                               if p not in pending}
        calibration_meta: dict[str, Any] = {"name": self.calibration.name, "sha256": self.calibration.sha256,
                                            "max_text": self.max_text, "max_images": self.max_images}
        if pending:
            started = time.perf_counter()
            with Measurer(self.source, self.mmproj, self.imatrix_data, cache_dir=self.root,
                          calibration=self.calibration, max_text=self.max_text, max_images=self.max_images,
                          n_threads=self.n_threads, progress=progress) as measurer, \
                    _bar(len(pending), "sensitivity (calibration points)", progress) as bar:
                for point in pending:
                    point_started = time.perf_counter()
                    value = measurer.measure(point.tensors, point.qtype, point.label)
                    entry = {"kl_mean": value.kl_mean, "text_kl_mean": value.text_kl_mean,
                             "image_kl_mean": value.image_kl_mean,
                             "seconds": round(time.perf_counter() - point_started, 3)}
                    self.point_cache.put(point, entry)  # at once: an interrupted run keeps every finished point
                    measured[point.label] = entry
                    bar.update(1)
                calibration_meta = _calibration_meta(measurer, self.calibration, self.max_text, self.max_images)
                cost.quantizations += measurer.cost.quantizations
                cost.evaluations += measurer.cost.evaluations
                cost.reference_parts_computed = measurer.cost.reference_parts_computed
            cost.points_seconds = time.perf_counter() - started
        fit = _fit_points(self.points, measured, tensor_errors, self.n_layers, self.global_layers)
        deltas: dict[str, dict[GGMLQuantizationType, float]] = {}
        group_errors: dict[str, dict[str, float]] = {}
        for name, tensors in self.groups:
            kind = tensor_kind(tensors[0][0])[0]
            common = set(self.types)
            for tensor, _ in tensors:
                common &= set(tensor_errors[tensor])
            layer = tensor_kind(tensors[0][0])[1]
            deltas[name] = {t: fit.predict(kind, layer, [tensor_errors[tensor][t] for tensor, _ in tensors])
                            for t in self.types if t in common}
            group_errors[name] = {t.name: sum(tensor_errors[tensor][t] for tensor, _ in tensors)
                                  for t in self.types if t in common}
        source_type = self.source_type
        groups = []
        for name, tensors in self.groups:
            delta = dict(deltas[name])
            delta[source_type] = 0.0
            groups.append(TensorGroup(name=name, tensors=tensors, delta_kl=delta))
        notes = (f"fast: ggml's imatrix-weighted quantization error per tensor, calibrated per tensor kind and per "
                 f"(block, layer) by KL measured with each kind and each sampled layer's block at "
                 f"{', '.join(p.name for p in self.probes)}")
        table = SensitivityTable(reference_type=source_type, groups=tuple(groups), notes=notes)
        probe_values = {label: value for label, value in measured.items()}
        extra = {"fast": {"sampling": self.errors.sampling.to_json(), "ggml": ggml_quants.version(),
                          "workers": self.workers, **fit.to_json()},
                 "probe_values": probe_values, "errors": group_errors, "calibration": calibration_meta}
        return table, extra, cost


def _fit_points(points: Sequence[CalibrationPoint], measured: dict[str, dict[str, Any]],
                tensor_errors: dict[str, dict[GGMLQuantizationType, float]], n_layers: int,
                global_layers: frozenset[int]) -> FastFit:
    """``fit_fast`` through the measured calibration points (kind points and (block, layer) points)."""
    kind_points = [(p.kind, p.qtype.name, [(tensor_kind(t)[1], tensor_errors[t][p.qtype]) for t in p.tensors],
                    measured[p.label]["kl_mean"]) for p in points if p.layer is None]
    layer_points = [(p.kind, p.layer, p.qtype.name, [(tensor_kind(t)[0], tensor_errors[t][p.qtype]) for t in p.tensors],
                     measured[p.label]["kl_mean"]) for p in points if p.layer is not None]
    return fit_fast(kind_points, layer_points, n_layers, global_layers)


def _calibration_meta(measurer: Measurer, calibration: Any, max_text: int | None,
                      max_images: int | None) -> dict[str, Any]:
    return {"name": calibration.name, "sha256": calibration.sha256, "max_text": max_text, "max_images": max_images,
            "text_sequences": sum(p.n_sequences for p in measurer.parts if p.kind == "text"),
            "image_sequences": sum(len(s) for s in measurer.slices), "positions": measurer.n_positions,
            "image_positions": measurer.n_image_positions}


def _reference_cached(source: Path, mmproj: Path | None, root: Path, chunks: Sequence[Any],
                      items: Sequence[Any]) -> bool:
    """Whether the reference outputs on these calibration parts are in the cache already."""
    cache = ReferenceCache(root / "reference")
    reference = GGUFReference(str(source), cache.cache_dir, mmproj=mmproj)
    wanted = []
    if chunks:
        wanted.append((HELDOUT_PART, heldout_hash(chunks)))
    if items and mmproj is not None:
        slice_ = Slice(spec="calibration-images", items=tuple(items))
        wanted.append((slice_.spec, slice_hash(slice_)))
    return all(cache.path_for(reference, name, cache.part_key(reference, content, CoverageSpec())).is_file()
               for name, content in wanted)


def assumed_imatrix_coverage(name: str) -> bool:
    """Which tensors an importance matrix computed here will cover, for a plan made before it exists: the
    layers' matrices (``blk.*``); llama.cpp's collector skips the token embedding (a row lookup) and the
    output projection."""
    return name.startswith("blk.")


def plan_sensitivity(source: Path | str, mmproj: Path | str | None = None, imatrix: Path | str | None = None,
                     options: SensitivityOptions | None = None, *, imatrix_pending: bool = False,
                     imatrix_chunks: int | None = None, timing: ModelTiming | bool = True,
                     check: Callable[[ModelLayout], Any] | None = None) -> SensitivityJob:
    """Resolve a sensitivity measurement's inputs, look up its caches and estimate its cost (nothing measured).

    ``options``: how it is measured (``SensitivityOptions``; default: its defaults). ``imatrix``: the file the
    final quant will use; without one (and not ``imatrix_pending``), types that llama.cpp refuses without an
    imatrix are dropped from the candidates. ``imatrix_pending``: one will be computed before the run (AUTO),
    so the plan assumes its coverage and the job must be planned again; ``imatrix_chunks``: the chunks of 512
    calibration positions it will read (None: all), for the estimate. ``timing``: time the model for the
    estimate (True), reuse a timing, or skip it (False). ``check``: called with the layout (groups and candidate
    types, what a budget's feasible range needs) as soon as it is known: from the GGUF's header, before any
    hashing, cache or timing, so an impossible request is refused before any work.
    """
    options = options or SensitivityOptions()
    method, force, n_threads = options.method, options.force, options.n_threads
    source = Path(source)
    mmproj_path = Path(mmproj) if mmproj else None
    root = options.root()
    imatrix_data = read_imatrix(imatrix) if imatrix is not None else None
    if imatrix_data is not None:
        check_imatrix_matches(imatrix_data, source)
    types = options.candidate_types()
    if imatrix_data is None and not imatrix_pending:
        dropped = [t.name for t in types if t in LLAMA_IMATRIX_TYPES]
        types = tuple(t for t in types if t not in LLAMA_IMATRIX_TYPES)
        if dropped:
            log.info("no imatrix: dropping %s from the candidates (llama.cpp needs one for them)", ", ".join(dropped))
        if not types:
            raise UserError(f"every candidate type needs an imatrix; pass {setting('imatrix')}")
    max_text, max_images = options.sample()
    probe_types = options.probe_types()
    missing = [t.name for t in probe_types if t not in types]
    if missing:
        raise UserError(f"probe type(s) {', '.join(missing)} are not among the candidates; add them or change "
                        "the probes")
    calibration = options.calibration
    calibration_set = calibration if isinstance(calibration, CalibrationSet) else load_calibration(calibration)
    info = read_gguf_info(source)
    if info.architecture == "clip":
        raise UserError(f"{source} is an mmproj; measure sensitivity on the unquantized text GGUF")
    groups = model_groups(info)
    source_types = {t.ggml_type for t in info.tensors if is_quantizable(t.name, t.shape)}
    if len(source_types) != 1 or next(iter(source_types)) not in (T.F32, T.BF16, T.F16):
        names = ", ".join(sorted(t.name for t in source_types))
        raise UserError(f"{source.name} holds {names} matrices; measure sensitivity on the unquantized "
                        "(F32/BF16/F16) text GGUF that convert wrote")
    if imatrix_data is not None:
        covered = frozenset(imatrix_data.tensor_names)
    elif imatrix_pending:
        covered = frozenset(t for _, tensors in groups for t, _ in tensors if assumed_imatrix_coverage(t))
    else:
        covered = frozenset()
    if check is not None:
        check(_layout(groups, types, covered, next(iter(source_types))))
    hash_dir = root / "reference"
    try:
        hash_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the cache folder {hash_dir}: {exc.strerror}; pass a writable cache "
                        "folder") from exc
    model_sha = cached_file_sha256(source, hash_dir)
    hashes: dict[str, str | None] = {"model": model_sha,
              "mmproj": cached_file_sha256(mmproj_path, hash_dir) if mmproj_path else None,
              "imatrix": cached_file_sha256(Path(imatrix), hash_dir) if imatrix else None}
    sampling = options.sampling or Sampling()
    workers = options.worker_count()
    extra = ({"sampling": sampling.to_json(), "ggml": ggml_quants.version(), "fast_version": FAST_VERSION,
              "layer_sample": LAYER_SAMPLE} if method == "fast" else None)
    key = cache_key(model_sha=model_sha, mmproj_sha=hashes["mmproj"], imatrix_sha=hashes["imatrix"],
                    calibration_sha=calibration_set.sha256, max_text=max_text, max_images=max_images,
                    candidates=types, probes=probe_types, method=method, extra=extra)
    path = root / "sensitivity" / f"{key[:32]}.json"
    n_tensors = sum(len(tensors) for _, tensors in groups)
    plan = Plan(method=method, groups=len(groups), tensors=n_tensors, types=tuple(t.name for t in types),
                workers=workers if method == "fast" else 1,
                imatrix=((f"computed first, on the first {imatrix_chunks} chunks of 512 positions of the calibration "
                          "set" if imatrix_chunks else "computed first, on the whole calibration set")
                         if imatrix_pending else (str(imatrix) if imatrix else "none")))
    job = SensitivityJob(source=source, mmproj=mmproj_path, imatrix=Path(imatrix) if imatrix else None,
                         imatrix_data=imatrix_data, method=method, types=types, probes=probe_types,
                         calibration=calibration_set, max_text=max_text, max_images=max_images, root=root,
                         n_threads=n_threads, workers=workers, key=key, path=path, groups=groups, hashes=hashes,
                         plan=plan, imatrix_pending=imatrix_pending, imatrix_chunks=imatrix_chunks, force=force,
                         source_type=next(iter(source_types)))
    if path.is_file() and not force and not imatrix_pending:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                job.cached = SensitivityResult(table=parse_sensitivity_table(cached["table"], str(path)),
                                               meta=cached["meta"], cache_path=path, from_cache=True,
                                               probes=cached.get("probes", {}), errors=cached.get("errors", {}))
                plan.table_cached = True
                log.info("sensitivity table from the cache: %s", path)
                return job
        except (OSError, ValueError, KeyError, UserError) as exc:
            log.warning("sensitivity cache %s is unreadable (%s); re-measuring", path, exc)

    job.covered = covered
    chunks, items = calibration_parts(calibration_set, max_text=max_text, max_images=max_images)
    if mmproj_path is None:
        items = []
    plan.reference_cached = not imatrix_pending and _reference_cached(source, mmproj_path, root, chunks, items)
    if method == "fast":
        _plan_fast(job, info, covered, sampling, force)
    elif method == "proxy":
        plan.quantizations = len(types) + sum(1 for _, tensors in groups for p in probe_types
                                              if _fits(p, tensors, covered))
        plan.evaluations = plan.quantizations - len(types)
    else:
        plan.quantizations = plan.evaluations = sum(1 for _, tensors in groups for t in types
                                                    if _fits(t, tensors, covered))
    if timing is not False:
        job.timing = timing if isinstance(timing, ModelTiming) else None
        _estimate(job, info, chunks, items, covered)
    return job


def _plan_fast(job: SensitivityJob, info: Any, covered: frozenset[str], sampling: Sampling, force: bool) -> None:
    """The fast method's work: per-tensor errors (cache per type) and per-kind calibration points (cache each)."""
    tensors = {t.name: t for t in info.tensors}
    allowed = {tensor: tuple(t for t in job.types if _fits(t, [(tensor, shape)], covered))
               for _, group in job.groups for tensor, shape in group}
    if not all(allowed.values()):
        bare = next(name for name, types in allowed.items() if not types)
        raise UserError(f"no candidate type fits the rows of {bare} ({tensors[bare].shape[0]} wide); add a type "
                        "with a smaller block, such as Q8_0")
    errors_root = None if job.imatrix_pending else job.root / "sensitivity" / "errors"
    job.errors = TensorErrors(job.source, [tensors[name] for name in allowed], allowed, imatrix=job.imatrix_data,
                              model_sha=job.hashes["model"] or "", imatrix_sha=job.hashes["imatrix"],
                              cache_root=errors_root, sampling=sampling)
    if force:
        for cache in job.errors.caches.values():
            cache.errors.clear()
    work = job.errors.work()
    plan = job.plan
    plan.error_items = sum(len(types) for types in allowed.values())
    plan.error_items_cached = plan.error_items - work.n_items
    plan.sampled_weights = sum(work.elements_by_type().values())
    kinds: dict[str, list[str]] = {}
    for _, group in job.groups:
        for tensor, _ in group:
            kinds.setdefault(tensor_kind(tensor)[0], []).append(tensor)
    job.n_layers = 1 + max((layer for _, group in job.groups for tensor, _ in group
                            if (layer := tensor_kind(tensor)[1]) is not None), default=-1)
    job.global_layers = global_layers(info, job.n_layers)
    layers = sample_layers(job.n_layers, job.global_layers)
    job.points = plan_points(kinds, allowed, job.probes, layers)
    n_kind = sum(1 for p in job.points if p.layer is None)
    plan.notes.append(f"calibration points: {n_kind} per tensor kind + {len(job.points) - n_kind} per (block, layer) "
                      f"(attention and FFN of layers {', '.join(map(str, layers))} of {job.n_layers})")
    job.point_cache = PointCache(None if job.imatrix_pending else job.root / "sensitivity" / "points", {
        "model": job.hashes["model"], "mmproj": job.hashes["mmproj"], "imatrix": job.hashes["imatrix"],
        "calibration": job.calibration.sha256, "max_text": job.max_text, "max_images": job.max_images,
        "llama_cpp": _llama_cpp_version(), "kl": kl_measurement_key()})
    cached = 0 if force else sum(1 for point in job.points if job.point_cache.get(point) is not None)
    plan.quantizations = plan.evaluations = len(job.points)
    plan.quantizations_cached = plan.evaluations_cached = cached


def _estimate(job: SensitivityJob, info: Any, chunks: Sequence[Any], items: Sequence[Any],
              covered: frozenset[str]) -> None:
    """Fill ``job.plan.seconds`` from quick timings (module docstring of ``fast_sensitivity``)."""
    plan = job.plan
    started = time.perf_counter()
    s_per_weight: dict[GGMLQuantizationType, float] = {}
    if job.errors is not None:
        work = job.errors.work()
        s_per_weight = job.errors.time_types(work.elements_by_type())
        plan.seconds["tensor errors"] = sum(n * s_per_weight[t] for t, n in work.elements_by_type().items()) / \
            job.workers
    pending_evaluations = plan.evaluations - plan.evaluations_cached
    needs_model = pending_evaluations > 0 or job.imatrix_pending
    if needs_model and job.timing is None:
        every_text, every_item = calibration_parts(job.calibration, render=False)
        every_item = every_item if job.mmproj is not None else []
        job.timing = time_model(job.source, job.mmproj, [chunk.text for chunk in every_text], every_item,
                                job.n_threads, selected=(len(chunks), len(items)), image=items[0] if items else None)
    plan.timing_seconds = time.perf_counter() - started
    if not needs_model or job.timing is None:
        return
    timing = job.timing
    threads = max(1, job.n_threads or os.cpu_count() or 1)
    model_bytes = job.source.stat().st_size
    if not plan.reference_cached:
        plan.seconds["reference"] = timing.reference_seconds
    quantize = pending_evaluations * model_bytes / DISK_BYTES_PER_SECOND
    if job.method == "fast" and job.errors is not None:
        for point in job.pending_points():
            rate = s_per_weight.get(point.qtype) or job.errors.time_types([point.qtype])[point.qtype]
            quantize += sum(info.tensor(t).n_elements for t in point.tensors) * rate / threads
    plan.seconds["calibration points" if job.method == "fast" else "quantizations"] = quantize
    plan.seconds["evaluations"] = pending_evaluations * timing.evaluation_seconds
    if job.imatrix_pending:
        plan.seconds["importance matrix"] = timing.imatrix_seconds(job.imatrix_chunks) * IMATRIX_PASS_FACTOR


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def measure_sensitivity(source: Path | str, mmproj: Path | str | None = None, imatrix: Path | str | None = None,
                        options: SensitivityOptions | None = None, *, progress: bool = True) -> SensitivityResult:
    """The sensitivity table of the unquantized text GGUF ``source`` (cached; see the module docstring), measured
    as ``options`` say: ``plan_sensitivity`` then ``SensitivityJob.run``, without the time estimate."""
    return plan_sensitivity(source, mmproj, imatrix, options, timing=False).run(progress)


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def _measure_all(measurer: Measurer, groups: Sequence[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]],
                 types: Sequence[GGMLQuantizationType], progress: bool) -> SensitivityTable:
    work = [(name, tensors, t) for name, tensors in groups for t in types if _fits(t, tensors, measurer.covered)]
    deltas: dict[str, dict[GGMLQuantizationType, float]] = {name: {} for name, _ in groups}
    with _bar(len(work), "sensitivity (measured)", progress) as bar:
        for name, tensors, qtype in work:
            deltas[name][qtype] = measurer.measure([t for t, _ in tensors], qtype, f"{name}-{qtype.name}").kl_mean
            bar.update(1)
    return _table(measurer, groups, deltas, "measured: every group at every candidate type")


def _measure_proxy(measurer: Measurer, groups: Sequence[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]],
                   types: Sequence[GGMLQuantizationType], probes: Sequence[GGMLQuantizationType], progress: bool
                   ) -> tuple[SensitivityTable, dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    errors: dict[str, dict[GGMLQuantizationType, float]] = {name: {} for name, _ in groups}
    with _bar(len(types), "sensitivity (errors per type)", progress) as bar:
        for qtype in types:
            for name, value in measurer.weighted_errors(qtype, groups).items():
                errors[name][qtype] = value
            bar.update(1)
    measured: dict[str, dict[GGMLQuantizationType, float]] = {name: {} for name, _ in groups}
    work = [(name, tensors, p) for name, tensors in groups for p in probes if _fits(p, tensors, measurer.covered)]
    with _bar(len(work), "sensitivity (probes)", progress) as bar:
        for name, tensors, probe in work:
            measured[name][probe] = measurer.measure([t for t, _ in tensors], probe, f"{name}-{probe.name}").kl_mean
            bar.update(1)
    deltas: dict[str, dict[GGMLQuantizationType, float]] = {}
    for name, tensors in groups:
        points = [(errors[name][p], value) for p, value in measured[name].items()]
        if not points:
            raise UserError(f"no probe type fits the rows of {name} ({tensors[0][1][0]} wide); add a probe with a "
                            "smaller block, such as Q8_0")
        alpha, beta = fit_power_law([e for e, _ in points], [v for _, v in points])
        deltas[name] = {t: (measured[name][t] if t in measured[name] else predict(alpha, beta, e))
                        for t, e in errors[name].items()}
    table = _table(measurer, groups, deltas, f"proxy: imatrix-weighted dequantization error, calibrated by KL "
                                             f"measured at {', '.join(p.name for p in probes)}")
    as_names = {g: {t.name: v for t, v in d.items()} for g, d in errors.items()}
    probe_names = {g: {t.name: v for t, v in d.items()} for g, d in measured.items()}
    return table, probe_names, as_names


def _table(measurer: Measurer, groups: Sequence[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]],
           deltas: dict[str, dict[GGMLQuantizationType, float]], notes: str) -> SensitivityTable:
    out = []
    for name, tensors in groups:
        delta = dict(deltas[name])
        delta[measurer.source_type] = 0.0  # the reference itself
        out.append(TensorGroup(name=name, tensors=tensors, delta_kl=delta))
    return SensitivityTable(reference_type=measurer.source_type, groups=tuple(out), notes=notes)


# ---------------------------------------------------------------------------------------------------
# agreement of the proxy with direct measurement


@dataclass(frozen=True)
class Agreement:
    """Direct measurements of sampled (group, type) pairs next to the table's ΔKL."""

    pairs: tuple[tuple[str, str, float, float], ...]  # group, type, table ΔKL, measured ΔKL
    spearman: float
    spearman_within_group: float  # mean over sampled groups of the rank correlation across their types
    cost: dict[str, Any]


def proxy_agreement(result: SensitivityResult, source: Path | str, mmproj: Path | str | None = None,
                    imatrix: Path | str | None = None, options: SensitivityOptions | None = None, *,
                    n_groups: int = 6, n_types: int = 4, seed: int = 0, progress: bool = True,
                    choose: Callable[[random.Random, list[str]], list[str]] | None = None) -> Agreement:
    """Measure ``n_groups`` seeded groups × ``n_types`` non-probe candidate types directly; rank-correlate them
    with the table. ``options``: as for ``measure_sensitivity`` (its cache folder, calibration set and threads;
    the calibration selection is the table's own, ``result.meta``)."""
    rng = random.Random(seed)
    names = [g.name for g in result.table.groups]
    chosen = (choose or (lambda r, n: r.sample(n, min(n_groups, len(n)))))(rng, names)
    probes = set(result.meta.get("probes", []))
    calibration_meta = result.meta["calibration"]
    pairs = []
    started = time.perf_counter()
    imatrix_data = read_imatrix(imatrix) if imatrix is not None else None
    options = options or SensitivityOptions()
    with Measurer(Path(source), Path(mmproj) if mmproj else None, imatrix_data, cache_dir=options.root(),
                  calibration=options.calibration, max_text=calibration_meta["max_text"],
                  max_images=calibration_meta["max_images"], n_threads=options.n_threads,
                  progress=progress) as measurer:
        work = []
        for name in chosen:
            group = result.table.group(name)
            others = [t for t in group.candidates if t.name not in probes and t != result.table.reference_type]
            picks = others if len(others) <= n_types else sorted(rng.sample(others, n_types), key=others.index)
            work += [(group, t) for t in picks]
        with _bar(len(work), "agreement", progress) as bar:
            for group, qtype in work:
                value = measurer.measure([t for t, _ in group.tensors], qtype, f"check-{group.name}-{qtype.name}")
                pairs.append((group.name, qtype.name, float(group.delta_kl[qtype]), value.kl_mean))
                bar.update(1)
        cost = measurer.cost.to_json()
    cost["seconds"] = round(time.perf_counter() - started, 3)
    if len(pairs) < 2:
        raise UserError("too few (group, type) pairs to compare; raise n_groups or n_types")
    spearman = spearman_rank_correlation([p[2] for p in pairs], [p[3] for p in pairs])
    within = []
    for name in chosen:
        rows = [p for p in pairs if p[0] == name]
        if len(rows) >= 3:
            correlation = spearman_rank_correlation([p[2] for p in rows], [p[3] for p in rows])
            if not math.isnan(correlation):
                within.append(correlation)
    return Agreement(pairs=tuple(pairs), spearman=spearman,
                     spearman_within_group=float(np.mean(within)) if within else math.nan, cost=cost)
