"""The fast sensitivity method's pieces: per-kind calibration points, the fit, the plan and its time estimate.

``convert.quantize.sensitivity`` runs the method (``measure_sensitivity`` with
``SensitivityOptions(method="fast")``); this module holds what it needs that does not run a model:

* Calibration points. For each tensor kind (``attn_q``, ``ffn_down``, ``token_embd``, …) and each probe
  type, one whole-model measurement: every tensor of that kind quantized to the probe type, the rest at
  the source type, mean KL against the source on the calibration parts. With the per-tensor errors
  (``tensor_errors``) at the probe type, the point says how KL grows with that kind's error.
* The fit (``fit_kind``): ``ΔKL = c_k · Σ_tensors e^β_k`` through the kind's points — linear (β = 1, the
  second-order behaviour of KL for small weight perturbations) with one probe type, β fitted in
  ``EXPONENT_RANGE`` with more. A group's predicted ΔKL at type ``t`` is ``c_k · Σ_{tensor ∈ g} e(tensor, t)^β_k``.
* Points are cached one file each under ``<cache>/sensitivity/points/``, keyed by everything that changes
  the measurement (model, mmproj, imatrix, calibration selection, tensors, type, llama.cpp version).
* The plan (``Plan``): what will be measured, what the cache already holds, and the estimated time from
  quick timings — ggml quantizing a few rows of each type, and llama.cpp loading the source model and
  decoding one batch (plus one image encode) — counted for every error, calibration point, reference and
  (when AUTO has to make one) importance-matrix pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.errors import UserError

log = logging.getLogger(__name__)
T = GGMLQuantizationType

DEFAULT_FAST_PROBES = ("Q3_K",)
EXPONENT_RANGE = (0.5, 2.0)
MIN_DELTA_KL = 1e-12
POINT_FORMAT = "medgemma-gguf-calibration-point"
POINT_VERSION = 1
DISK_BYTES_PER_SECOND = 1e9  # assumed for the plan: copying the untouched tensors of a calibration point


# --- the fit --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KindFit:
    """``ΔKL = c · Σ e^β`` for one tensor kind, from its calibration points."""

    kind: str
    log_c: float
    beta: float
    points: tuple[tuple[str, float, float], ...]  # (type, Σ e at that type, measured KL)

    def predict(self, errors: Sequence[float]) -> float:
        """Predicted ΔKL of tensors with these errors."""
        total = sum(max(e, 0.0) ** self.beta for e in errors)
        return float(math.exp(self.log_c) * total) if total > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"c": math.exp(self.log_c), "beta": self.beta,
                "points": [{"type": t, "error": e, "kl": kl} for t, e, kl in self.points]}


def fit_kind(kind: str, points: Sequence[tuple[str, Sequence[float], float]],
             exponent_range: tuple[float, float] = EXPONENT_RANGE) -> KindFit:
    """Fit ``log KL = log c + log Σ e^β`` through ``points`` = (type, per-tensor errors, measured KL).

    One point (or all at one error level): β = 1 and c = KL / Σ e. More: β on a grid over ``exponent_range``
    (least squares in log space), c in closed form for each β.
    """
    if not points:
        raise ValueError(f"no calibration points for {kind}")
    errors = [np.maximum(np.asarray(e, dtype=np.float64), 1e-300) for _, e, _ in points]
    kl = np.log(np.maximum([p[2] for p in points], MIN_DELTA_KL))

    def solve(beta: float) -> tuple[float, float]:
        x = np.array([math.log(float(np.sum(e ** beta))) for e in errors])
        log_c = float(np.mean(kl - x))
        return log_c, float(np.sum((kl - x - log_c) ** 2))

    sums = [float(np.sum(e)) for e in errors]
    if len(points) == 1 or max(sums) <= min(sums) * (1 + 1e-9):
        beta = 1.0
    else:
        grid = np.linspace(exponent_range[0], exponent_range[1], 151)
        beta = float(min(grid, key=lambda b: solve(float(b))[1]))
    log_c, _ = solve(beta)
    return KindFit(kind, log_c, beta, tuple((qtype, float(np.sum(np.asarray(errs))), float(measured))
                                            for qtype, errs, measured in points))


# --- calibration points ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationPoint:
    """One whole-model measurement: ``tensors`` (all of one kind that fit) at ``qtype``."""

    kind: str
    qtype: GGMLQuantizationType
    tensors: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"kind-{self.kind}-{self.qtype.name}"


def plan_points(kinds: Mapping[str, Sequence[str]], allowed: Mapping[str, Sequence[GGMLQuantizationType]],
                probes: Sequence[GGMLQuantizationType]) -> list[CalibrationPoint]:
    """For each kind (``kinds``: kind → its tensors), one point per probe type that some of its tensors take;
    UserError for a kind no probe type fits."""
    points = []
    for kind, tensors in kinds.items():
        made = 0
        for probe in probes:
            fitting = tuple(t for t in tensors if probe in allowed.get(t, ()))
            if fitting:
                points.append(CalibrationPoint(kind, probe, fitting))
                made += 1
        if not made:
            raise UserError(f"no calibration probe type fits the {kind} tensors (rows of {len(tensors)} tensors); "
                            "add a probe type with a smaller block, such as Q8_0 or Q4_0")
    return points


@dataclass
class PointCache:
    """Measured KL of calibration points, one JSON file per point."""

    root: Path | None
    material: dict[str, Any]

    def key(self, point: CalibrationPoint) -> str:
        data = {**self.material, "format": POINT_FORMAT, "version": POINT_VERSION, "type": point.qtype.name,
                "tensors": hashlib.sha256("\n".join(point.tensors).encode()).hexdigest()}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def _path(self, point: CalibrationPoint) -> Path | None:
        return None if self.root is None else self.root / f"{point.label}-{self.key(point)[:24]}.json"

    def get(self, point: CalibrationPoint) -> dict[str, Any] | None:
        path = self._path(point)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if data.get("key") == self.key(point) else None
        except (OSError, ValueError) as exc:
            log.warning("calibration point cache %s is unreadable (%s); measuring again", path, exc)
            return None

    def put(self, point: CalibrationPoint, values: dict[str, Any]) -> None:
        path = self._path(point)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"key": self.key(point), "label": point.label, **values}) + "\n")
        except (OSError, UserError) as exc:
            log.warning("cannot write the calibration point cache %s (%s); continuing without it", path, exc)


# --- timings for the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelTiming:
    """Quick timings of the source model in llama.cpp, to estimate evaluations (module docstring)."""

    load_seconds: float
    seconds_per_position: float
    seconds_per_image: float
    positions: int  # calibration positions one evaluation scores (estimated from the token counts)
    images: int
    all_positions: int = 0  # the same over the whole calibration set (what an importance matrix reads)
    all_images: int = 0

    @property
    def evaluation_seconds(self) -> float:
        """One evaluation over the selected calibration parts."""
        return self.load_seconds + self.positions * self.seconds_per_position + self.images * self.seconds_per_image

    @property
    def whole_set_seconds(self) -> float:
        """One pass over the whole calibration set."""
        return (self.load_seconds + self.all_positions * self.seconds_per_position
                + self.all_images * self.seconds_per_image)


def time_model(source: Path, mmproj: Path | None, texts: Sequence[str], image_items: Sequence[Any],
               n_threads: int | None, batch_tokens: int = 128, selected: tuple[int, int] | None = None,
               image: Any | None = None) -> ModelTiming:
    """Load ``source`` (+ ``mmproj`` when there are images), decode one batch of the first text and encode
    ``image`` (an item with a rendered image); count the positions of ``texts`` and ``image_items``
    (question, options, image tokens) — of all of them, and of the first ``selected`` = (texts, items) that
    an evaluation scores (default: all)."""
    from medgemma_gguf.runtime.engine import Engine, ImagePart

    started = time.perf_counter()
    with Engine(source, mmproj if image_items and image is not None else None, n_ctx=max(512, batch_tokens * 2),
                n_threads=n_threads) as engine:
        load = time.perf_counter() - started
        text_counts = [len(engine.tokenize(text)) for text in texts]
        item_counts = [len(engine.tokenize(item.question + "\n" + "\n".join(item.options))) for item in image_items]
        tokens = (engine.tokenize(" ".join(texts)) if texts else engine.tokenize("timing " * batch_tokens))
        tokens = (tokens * (1 + batch_tokens // max(1, len(tokens))))[:batch_tokens]
        started = time.perf_counter()
        engine.eval_tokens(tokens, logits="all")
        per_position = (time.perf_counter() - started) / len(tokens)
        per_image = 0.0
        image_tokens = 0
        if image_items and image is not None:
            part = ImagePart(pixels=np.asarray(image.image.load().convert("RGB")))
            image_tokens = engine.image_token_count(part)
            started = time.perf_counter()
            engine.encode_image(part)
            per_image = time.perf_counter() - started
    n_text, n_items = selected if selected is not None else (len(texts), len(image_items))
    return ModelTiming(load, per_position, per_image, sum(text_counts[:n_text]) + sum(item_counts[:n_items])
                       + image_tokens * min(n_items, len(image_items)), min(n_items, len(image_items)),
                       sum(text_counts) + sum(item_counts) + image_tokens * len(image_items), len(image_items))


# --- the plan -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a sensitivity measurement will do, what the cache holds, and how long it should take."""

    method: str
    groups: int
    tensors: int
    types: tuple[str, ...]
    error_items: int = 0  # (tensor, type) errors in the table
    error_items_cached: int = 0
    sampled_weights: int = 0  # weights quantized per type, summed over the pending errors
    quantizations: int = 0
    quantizations_cached: int = 0
    evaluations: int = 0
    evaluations_cached: int = 0
    reference_cached: bool = True
    table_cached: bool = False
    imatrix: str = "none"
    workers: int = 1
    seconds: dict[str, float] = field(default_factory=dict)  # estimated, by part
    timing_seconds: float = 0.0  # spent on the quick timings the estimate comes from
    notes: list[str] = field(default_factory=list)

    @property
    def estimated_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "groups": self.groups, "tensors": self.tensors, "types": list(self.types),
                "error_items": self.error_items, "error_items_cached": self.error_items_cached,
                "sampled_weights": self.sampled_weights, "quantizations": self.quantizations,
                "quantizations_cached": self.quantizations_cached, "evaluations": self.evaluations,
                "evaluations_cached": self.evaluations_cached, "reference_cached": self.reference_cached,
                "table_cached": self.table_cached, "imatrix": self.imatrix, "workers": self.workers,
                "estimated_seconds": {k: round(v, 1) for k, v in self.seconds.items()},
                "timing_seconds": round(self.timing_seconds, 1)}

    def lines(self) -> list[str]:
        """The plan as printed before any work."""
        if self.table_cached:
            return [f"sensitivity ({self.method}): cached table for {self.groups} groups x {len(self.types)} types; "
                    "nothing to measure"]
        out = [f"sensitivity ({self.method}): {self.groups} tensor groups ({self.tensors} tensors) x {len(self.types)} "
               f"types ({', '.join(self.types)})"]
        if self.imatrix != "none":
            out.append(f"  importance matrix: {self.imatrix}")
        if self.error_items:
            pending = self.error_items - self.error_items_cached
            out.append(f"  per-tensor errors (ggml quantize/dequantize, no model runs): {self.error_items} "
                       f"(tensor, type) pairs, {self.error_items_cached} cached, {pending} to measure "
                       f"({self.sampled_weights / 1e6:.1f} M weights quantized in all), "
                       f"{self.workers} worker{'s' if self.workers != 1 else ''}")
        if self.quantizations or self.evaluations:
            reference = "" if self.reference_cached else "; the reference outputs are computed first"
            out.append(f"  whole-model measurements: {self.quantizations} quantizations "
                       f"({self.quantizations_cached} cached) and {self.evaluations} evaluations "
                       f"({self.evaluations_cached} cached){reference}")
        out += [f"  {note}" for note in self.notes]
        parts = ", ".join(f"{name} {format_seconds(value)}" for name, value in self.seconds.items() if value > 0.5)
        out.append(f"  estimated time: {format_seconds(self.estimated_seconds)}" + (f" ({parts})" if parts else "")
                   + (f"; timing it took {format_seconds(self.timing_seconds)}" if self.timing_seconds >= 0.5 else ""))
        return out


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
