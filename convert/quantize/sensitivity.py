"""Per-tensor-group sensitivity: the KL divergence each group adds at each candidate ggml type.

A *group* is one quantizable tensor kind of one layer (``blk.3.attn_v``, ``blk.3.ffn_down``, …) or a global
matrix (``token_embd``, ``output``), named by ``medgemma_gguf.quant_types.tensor_kind``. For a group ``g`` and a
candidate type ``t``, ΔKL(g, t) is the mean KL divergence (nats per position, ``quant_eval.metrics``)
between the unquantized model — the reference — and the same model with only ``g`` stored as ``t``,
over the *calibration parts*: text and image-conditioned prompts built from the project's calibration
set (``convert.calibration``, the set the imatrix is computed on; the evaluation slices are kept apart):

* text: each text-only conversation of the set as prose (its turns' text, joined);
* image-conditioned: each one-image conversation as an image question whose two options are its own
  answer and the next image conversation's answer — so the positions after the image hold the request
  and two image reports.

Every model is quantized by llama.cpp through the recipe engine (``convert.quantize.quantize_file`` with
a recipe whose base is the source type and whose rules name the group's tensors), with the imatrix, and
scored by ``quant_eval.evaluate.evaluate_candidate`` against the cached reference
(``quant_eval.reference``). Two methods:

* ``measured``: that measurement for every (group, type): ``groups × types`` quantizations and model
  evaluations.
* ``proxy`` (default): a calibrated proxy. One whole-model llama.cpp quantization per candidate type;
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
the imatrix, the candidate types, the probes, the method and the calibration selection, so a changed
input is re-measured. The reference outputs go to the evaluation's reference cache. The file records
the cost: wall seconds, quantizations and model evaluations.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
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
from medgemma_gguf.convert.quantize.auto import SensitivityTable, TensorGroup, ggml_type, parse_sensitivity_table
from medgemma_gguf.convert.quantize.recipe import is_quantizable, parse_recipe
from medgemma_gguf.errors import UserError, setting
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
METHODS = ("proxy", "measured")
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


def calibration_parts(calibration: Any | None = None, *, max_text: int | None = None,
                      max_images: int | None = None, image_size: int = 256) -> tuple[list[Any], list[Any]]:
    """(text chunks, image items) of a calibration set (default: the bundled one); see the module docstring.

    ``max_text`` / ``max_images`` keep the first N of each (None: all).
    """
    from PIL import Image

    from medgemma_gguf.convert.quantize.calibration import CalibrationSet, load_calibration, render_image
    from medgemma_gguf.quant_eval.items import ImageRef, Item
    from medgemma_gguf.quant_eval.slices import TextChunk

    if not isinstance(calibration, CalibrationSet):
        calibration = load_calibration(calibration)
    for label, value in (("max_text", max_text), ("max_images", max_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"{label} must be a whole number of at least 0, got {value!r}")
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
        buffer = io.BytesIO()
        Image.fromarray(render_image(spec, image_size)).save(buffer, format="PNG")
        items.append(Item(id=f"calibration-{item_id}", question=question, options=[_cut(answer), _cut(other)],
                          answer_index=0, image=ImageRef(data=buffer.getvalue()), provenance=dict(PROVENANCE)))
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

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "quantizations": self.quantizations,
                "evaluations": self.evaluations, "reference_parts_computed": self.reference_parts_computed}


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
        from medgemma_gguf.gguf_info import read_gguf_info
        from medgemma_gguf.quant_eval.reference import GGUFReference, ReferenceCache, reference_parts
        from medgemma_gguf.quant_eval.slices import Slice

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
        from medgemma_gguf.convert.quantize.llama_quantize import QuantSpec, quantize_file

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
        from medgemma_gguf.quant_eval.evaluate import Candidate, evaluate_candidate

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


def cache_key(*, model_sha: str, mmproj_sha: str | None, imatrix_sha: str | None, calibration_sha: str,
              max_text: int | None, max_images: int | None, candidates: Sequence[GGMLQuantizationType],
              probes: Sequence[GGMLQuantizationType], method: str) -> str:
    """The cache key of a sensitivity measurement (every input that changes the table, including how the KL
    is measured: the reference cache format and its default coverage)."""
    import llama_cpp

    from medgemma_gguf.quant_eval.reference import CACHE_FORMAT_VERSION, CoverageSpec

    material = {"version": CACHE_VERSION, "model": model_sha, "mmproj": mmproj_sha, "imatrix": imatrix_sha,
                "calibration": calibration_sha, "max_text": max_text, "max_images": max_images,
                "candidates": [t.name for t in candidates], "probes": [t.name for t in probes] if method == "proxy"
                else [], "method": method, "llama_cpp": llama_cpp.__version__,
                "kl": {"reference_cache": CACHE_FORMAT_VERSION, **CoverageSpec().key()}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def measure_sensitivity(source: Path | str, mmproj: Path | str | None = None, imatrix: Path | str | None = None, *,
                        method: str = "proxy", candidates: Sequence[str | GGMLQuantizationType] = DEFAULT_CANDIDATES,
                        probes: Sequence[str | GGMLQuantizationType] = DEFAULT_PROBES,
                        calibration: Path | str | Any | None = None, max_text: int | None = None,
                        max_images: int | None = None, cache_dir: Path | str | None = None, force: bool = False,
                        n_threads: int | None = None, progress: bool = True) -> SensitivityResult:
    """The sensitivity table of the unquantized text GGUF ``source`` (cached; see the module docstring).

    ``imatrix``: the file the final quant will use (its weights enter the proxy and llama.cpp's quantizer);
    without one, types that llama.cpp refuses without an imatrix are dropped from the candidates.
    """
    from medgemma_gguf.convert.quantize.calibration import CalibrationSet, load_calibration
    from medgemma_gguf.convert.quantize.imatrix import check_imatrix_matches, read_imatrix
    from medgemma_gguf.hashing import cached_file_sha256

    if method not in METHODS:
        raise UserError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")
    source = Path(source)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    imatrix_data = read_imatrix(imatrix) if imatrix is not None else None
    if imatrix_data is not None:
        check_imatrix_matches(imatrix_data, source)
    types = _parse_types(candidates, "candidate")
    if imatrix_data is None:
        dropped = [t.name for t in types if t in LLAMA_IMATRIX_TYPES]
        types = tuple(t for t in types if t not in LLAMA_IMATRIX_TYPES)
        if dropped:
            log.info("no imatrix: dropping %s from the candidates (llama.cpp needs one for them)", ", ".join(dropped))
        if not types:
            raise UserError(f"every candidate type needs an imatrix; pass {setting('imatrix')}")
    probe_types = _parse_types(probes, "probe") if method == "proxy" else ()
    missing = [t.name for t in probe_types if t not in types]
    if missing:
        raise UserError(f"probe type(s) {', '.join(missing)} are not among the candidates; add them or change "
                        "the probes")
    calibration_set = calibration if isinstance(calibration, CalibrationSet) else load_calibration(calibration)
    hash_dir = root / "reference"
    try:
        hash_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the cache folder {hash_dir}: {exc.strerror}; pass a writable cache "
                        "folder") from exc
    model_sha = cached_file_sha256(source, hash_dir)
    mmproj_sha = cached_file_sha256(Path(mmproj), hash_dir) if mmproj else None
    imatrix_sha = cached_file_sha256(Path(imatrix), hash_dir) if imatrix else None
    key = cache_key(model_sha=model_sha, mmproj_sha=mmproj_sha, imatrix_sha=imatrix_sha,
                    calibration_sha=calibration_set.sha256, max_text=max_text, max_images=max_images,
                    candidates=types, probes=probe_types, method=method)
    path = root / "sensitivity" / f"{key[:32]}.json"
    if path.is_file() and not force:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                result = SensitivityResult(table=parse_sensitivity_table(cached["table"], str(path)),
                                           meta=cached["meta"], cache_path=path, from_cache=True,
                                           probes=cached.get("probes", {}), errors=cached.get("errors", {}))
                log.info("sensitivity table from the cache: %s", path)
                return result
        except (OSError, ValueError, KeyError, UserError) as exc:
            log.warning("sensitivity cache %s is unreadable (%s); re-measuring", path, exc)

    started = time.perf_counter()
    with Measurer(source, Path(mmproj) if mmproj else None, imatrix_data, cache_dir=root,
                  calibration=calibration_set, max_text=max_text, max_images=max_images, n_threads=n_threads,
                  progress=progress) as measurer:
        groups = model_groups(measurer.info)
        if method == "measured":
            table, probe_values, errors = _measure_all(measurer, groups, types, progress), {}, {}
        else:
            table, probe_values, errors = _measure_proxy(measurer, groups, types, probe_types, progress)
        measurer.cost.seconds = time.perf_counter() - started
        meta = {
            "method": method, "candidates": [t.name for t in types], "probes": [t.name for t in probe_types],
            "source": str(source), "source_sha256": model_sha, "mmproj_sha256": mmproj_sha,
            "imatrix": str(imatrix) if imatrix else None, "imatrix_sha256": imatrix_sha,
            "calibration": {"name": calibration_set.name, "sha256": calibration_set.sha256, "max_text": max_text,
                            "max_images": max_images, "text_sequences": sum(p.n_sequences for p in measurer.parts
                                                                            if p.kind == "text"),
                            "image_sequences": sum(len(s) for s in measurer.slices),
                            "positions": measurer.n_positions, "image_positions": measurer.n_image_positions},
            "groups": len(groups), "cost": measurer.cost.to_json(),
        }
    data = {"key": key, "table": json.loads(table.to_json()), "meta": meta, "probes": probe_values, "errors": errors}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    except (OSError, UserError) as exc:
        log.warning("cannot write the sensitivity cache %s (%s); continuing without it", path, exc)
        path = None
    return SensitivityResult(table=table, meta=meta, cache_path=path, probes=probe_values, errors=errors)


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
                    imatrix: Path | str | None = None, *, n_groups: int = 6, n_types: int = 4, seed: int = 0,
                    cache_dir: Path | str | None = None, calibration: Path | str | None = None,
                    n_threads: int | None = None, progress: bool = True,
                    choose: Callable[[random.Random, list[str]], list[str]] | None = None) -> Agreement:
    """Measure ``n_groups`` seeded groups × ``n_types`` non-probe candidate types directly; rank-correlate them
    with the table. Uses the table's calibration selection (``result.meta``)."""
    from medgemma_gguf.convert.quantize.imatrix import read_imatrix
    from medgemma_gguf.quant_eval.metrics import spearman_rank_correlation

    rng = random.Random(seed)
    names = [g.name for g in result.table.groups]
    chosen = (choose or (lambda r, n: r.sample(n, min(n_groups, len(n)))))(rng, names)
    probes = set(result.meta.get("probes", []))
    calibration_meta = result.meta["calibration"]
    pairs = []
    started = time.perf_counter()
    imatrix_data = read_imatrix(imatrix) if imatrix is not None else None
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    with Measurer(Path(source), Path(mmproj) if mmproj else None, imatrix_data, cache_dir=root,
                  calibration=calibration, max_text=calibration_meta["max_text"],
                  max_images=calibration_meta["max_images"], n_threads=n_threads, progress=progress) as measurer:
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
            value = spearman_rank_correlation([p[2] for p in rows], [p[3] for p in rows])
            if not math.isnan(value):
                within.append(value)
    return Agreement(pairs=tuple(pairs), spearman=spearman,
                     spearman_within_group=float(np.mean(within)) if within else math.nan, cost=cost)
