"""The fast sensitivity method's pieces: calibration points, the fit, the plan and its time estimate.

``convert.quantize.sensitivity`` runs the method (``measure_sensitivity`` with
``SensitivityOptions(method="fast")``); this module holds what it needs that does not run a model.

The model: a group ``g`` (one tensor kind of one layer) at type ``t`` adds

    ΔKL(g, t) = c_kind · f_block(layer) · Σ_{tensor ∈ g} e(tensor, t)^β_kind

where ``e`` is the per-tensor imatrix-weighted error (``tensor_errors``), ``c_kind`` a per-kind scale,
``f_block(layer)`` a per-layer factor shared by the kinds of one block (``BLOCKS``: attention =
attn_q/k/v/output, ffn = ffn_gate/up/down; 1 for ``token_embd``), and β = 1 (the second-order behaviour of
KL for small weight perturbations) with one probe type, fitted in ``EXPONENT_RANGE`` per kind with more.
Why the layer factor (measured on the trained fixture, against the proxy method's per-group ΔKL at Q2_K
and Q5_K): ``log(ΔKL / e)`` varies across layers by orders of magnitude (attn_k: 6.7e-3 at layer 0,
3.8e-5 at layer 4), differently for attention and FFN; least-squares fits of it leave a residual std of
2.16 (natural log) with a per-kind constant alone, 1.00 with a per-layer term shared by both blocks and
0.27 with a per-(block, layer) term. AUTO from the per-kind model alone reached 0.647x Q4_K_M's KL at
equal size (the proxy: 0.326x). Normalising ``e`` by the output energy or the post-norm gammas did not help.

* Calibration points (``plan_points``), each one whole-model measurement at a probe type, the rest at the
  source type, mean KL against the source on the calibration parts: per kind (all tensors of that kind;
  one per probe type) and per (block, layer) for the sampled layers (``sample_layers``: every layer up to
  ``LAYER_SAMPLE``, else that many including the first two, the last and a global-attention layer; the
  block's tensors of that layer at the first probe type that fits them).
* The fit (``fit_fast``): alternately ``c_kind`` (and β) through the kind's points given ``f``
  (``fit_kind`` with per-tensor factors), and ``f_block(l) = P_(block,l) / Σ_{kind ∈ block} c_kind
  Σ e^β`` at the sampled layers given ``c``, ``log f`` interpolated over the others
  (``interpolate_factors``: Gemma 3's global and local layers apart when both are sampled), the scale fixed
  by a geometric mean of 1 over each block's sampled layers; until the factors change by less than
  ``FIT_TOLERANCE`` (relative) or ``FIT_ITERATIONS``. The kind points are then met exactly and the layer
  points up to one constant per block (KL is not exactly additive over tensors).
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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import GgufInfo
from medgemma_gguf.quant_types import tensor_kind
from medgemma_gguf.runtime.offload import sliding_layers

log = logging.getLogger(__name__)
T = GGMLQuantizationType

DEFAULT_FAST_PROBES = ("Q3_K",)
EXPONENT_RANGE = (0.5, 2.0)
MIN_DELTA_KL = 1e-12
POINT_FORMAT = "medgemma-gguf-calibration-point"
POINT_VERSION = 1
DISK_BYTES_PER_SECOND = 1e9  # assumed for the plan: copying the untouched tensors of a calibration point
# the blocks whose kinds share a per-layer factor (module docstring)
BLOCKS: dict[str, tuple[str, ...]] = {"attention": ("attn_q", "attn_k", "attn_v", "attn_output"),
                                      "ffn": ("ffn_gate", "ffn_up", "ffn_down")}
KIND_BLOCK = {kind: block for block, kinds in BLOCKS.items() for kind in kinds}
LAYER_SAMPLE = 4
"""Layers given (block, layer) calibration points: every layer of a model with at most this many, else this many
(``sample_layers``): 2 blocks x 4 = 8 evaluations on top of the kind points, whatever the depth. 4 rather than 6:
on the trained fixture (6 layers) AUTO at Q4_K_M's size reached 0.308x its KL from 4 sampled layers and 1 + 1
conversations, 0.289x from all 6 and 2 + 2 (3 layers: 0.314x, but 0.451x at UD-Q4_K_XL's size); on MedGemma 4B's
widths each point is a whole-model evaluation, about a minute on 2 cores (BENCHMARKS.md)."""
FIT_TOLERANCE = 1e-6
FIT_ITERATIONS = 50


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
             exponent_range: tuple[float, float] = EXPONENT_RANGE,
             factors: Sequence[Sequence[float]] | None = None) -> KindFit:
    """Fit ``log KL = log c + log Σ f e^β`` through ``points`` = (type, per-tensor errors, measured KL);
    ``factors``: per point, each tensor's layer factor ``f`` (default 1).

    One point (or all at one error level): β = 1 and c = KL / Σ f e. More: β on a grid over ``exponent_range``
    (least squares in log space), c in closed form for each β.
    """
    if not points:
        raise ValueError(f"no calibration points for {kind}")
    errors = [np.maximum(np.asarray(e, dtype=np.float64), 1e-300) for _, e, _ in points]
    weights = ([np.asarray(f, dtype=np.float64) for f in factors] if factors is not None
               else [np.ones_like(e) for e in errors])
    kl = np.log(np.maximum([p[2] for p in points], MIN_DELTA_KL))

    def solve(beta: float) -> tuple[float, float]:
        x = np.array([math.log(max(float(np.sum(w * e ** beta)), 1e-300))
                      for w, e in zip(weights, errors, strict=True)])
        log_c = float(np.mean(kl - x))
        return log_c, float(np.sum((kl - x - log_c) ** 2))

    sums = [float(np.sum(w * e)) for w, e in zip(weights, errors, strict=True)]
    if len(points) == 1 or max(sums) <= min(sums) * (1 + 1e-9):
        beta = 1.0
    else:
        grid = np.linspace(exponent_range[0], exponent_range[1], 151)
        beta = float(min(grid, key=lambda b: solve(float(b))[1]))
    log_c, _ = solve(beta)
    return KindFit(kind, log_c, beta, tuple((qtype, float(np.sum(np.asarray(errs))), float(measured))
                                            for qtype, errs, measured in points))


def global_layers(info: GgufInfo, n_layers: int) -> frozenset[int]:
    """The layers with global (not sliding-window) attention: those ``runtime.offload.sliding_layers`` (the
    planner's reader of ``<arch>.attention.sliding_window_pattern``, as llama.cpp's ``load_swa_pattern``) does not
    mark sliding; every layer of a model without a sliding window."""
    _, sliding = sliding_layers(info, info.architecture, n_layers)
    return frozenset(i for i, swa in enumerate(sliding) if not swa)


def sample_layers(n_layers: int, global_layers: Collection[int] = (), count: int = LAYER_SAMPLE) -> tuple[int, ...]:
    """The layers given (block, layer) points: all of them up to ``count``; else 0, 1, the last and the rest
    spread evenly between layer 1 and the last, one of them moved to the nearest global layer when none is
    picked and the model has one."""
    if n_layers <= count:
        return tuple(range(n_layers))
    last = n_layers - 1
    chosen = [0, 1, last]
    interior: list[int] = []
    spare = count - len(chosen)
    for i in range(spare):
        target = 1 + (last - 1) * (i + 1) / (spare + 1)
        free = [layer for layer in range(2, last) if layer not in interior]
        if free:
            interior.append(min(free, key=lambda layer: (abs(layer - target), layer)))
    globals_ = sorted(set(global_layers) & set(range(n_layers)))
    if globals_ and interior and not set(globals_) & set(chosen + interior):
        _, index, layer = min((abs(g - pick), index, g) for index, pick in enumerate(interior) for g in globals_
                              if g not in chosen)
        interior[index] = layer
    return tuple(sorted(chosen + interior))


def interpolate_factors(samples: Mapping[int, float], n_layers: int,
                        global_layers: Collection[int] = ()) -> tuple[float, ...]:
    """Every layer's factor from the sampled ones: ``log f`` linear over the layer index between samples,
    constant beyond the ends; global and local layers each from their own samples when both have some. 1
    everywhere without samples."""
    if not samples:
        return (1.0,) * n_layers
    glob = set(global_layers)
    classes = [{layer: v for layer, v in samples.items() if layer in glob},
               {layer: v for layer, v in samples.items() if layer not in glob}]
    both = all(classes)

    def line(points: Mapping[int, float], layer: int) -> float:
        xs = sorted(points)
        return float(np.exp(np.interp(layer, xs, [math.log(max(points[x], 1e-300)) for x in xs])))

    return tuple(line(classes[0 if layer in glob else 1] if both else samples, layer) for layer in range(n_layers))


@dataclass(frozen=True)
class LayerFactors:
    """``f_block(layer)`` for one block: every layer's factor, the sampled layers and their points."""

    block: str
    factors: tuple[float, ...]
    points: tuple[tuple[int, str, float], ...]  # (layer, type, measured KL)

    def to_json(self) -> dict[str, Any]:
        return {"factors": list(self.factors), "sampled": sorted({layer for layer, _, _ in self.points}),
                "points": [{"layer": layer, "type": t, "kl": kl} for layer, t, kl in self.points]}


@dataclass(frozen=True)
class FastFit:
    """The fitted model of the module docstring: per-kind ``KindFit`` and per-block ``LayerFactors``."""

    kinds: dict[str, KindFit]
    layers: dict[str, LayerFactors]
    iterations: int = 0

    def factor(self, kind: str, layer: int | None) -> float:
        """``f_block(layer)`` of a tensor of ``kind`` (1 outside the blocks and without layer points)."""
        block = self.layers.get(KIND_BLOCK.get(kind, ""))
        return block.factors[layer] if block is not None and layer is not None and layer < len(block.factors) else 1.0

    def predict(self, kind: str, layer: int | None, errors: Sequence[float]) -> float:
        """Predicted ΔKL of tensors of ``kind`` in ``layer`` with these errors."""
        return self.factor(kind, layer) * self.kinds[kind].predict(errors)

    def to_json(self) -> dict[str, Any]:
        return {"kinds": {k: f.to_json() for k, f in self.kinds.items()},
                "layers": {b: f.to_json() for b, f in self.layers.items()}, "iterations": self.iterations}


KindPoint = tuple[str, str, Sequence[tuple[int | None, float]], float]  # (kind, type, [(layer, e)], KL)
LayerPoint = tuple[str, int, str, Sequence[tuple[str, float]], float]  # (block, layer, type, [(kind, e)], KL)


def fit_fast(kind_points: Sequence[KindPoint], layer_points: Sequence[LayerPoint], n_layers: int,
             global_layers: Collection[int] = (), exponent_range: tuple[float, float] = EXPONENT_RANGE,
             tolerance: float = FIT_TOLERANCE, iterations: int = FIT_ITERATIONS) -> FastFit:
    """Fit ``c_kind`` (β) and ``f_block(layer)`` to measured points, alternately (module docstring).

    ``kind_points``: (kind, type, each tensor's (layer or None, error at that type), measured KL).
    ``layer_points``: (block, layer, type, each tensor's (kind, error at that type), measured KL).
    """
    kinds = list(dict.fromkeys(k for k, *_ in kind_points))
    blocks = list(dict.fromkeys(b for b, *_ in layer_points))
    factors = {b: np.ones(n_layers) for b in blocks}

    def factor(kind: str, layer: int | None) -> float:
        block = KIND_BLOCK.get(kind)
        return float(factors[block][layer]) if block in factors and layer is not None else 1.0

    def fit_kinds() -> dict[str, KindFit]:
        fits = {}
        for kind in kinds:
            mine = [p for p in kind_points if p[0] == kind]
            fits[kind] = fit_kind(kind, [(t, [e for _, e in errs], kl) for _, t, errs, kl in mine], exponent_range,
                                  factors=[[factor(kind, layer) for layer, _ in errs] for _, _, errs, _ in mine])
        return fits

    fits = fit_kinds()
    done = 0
    while done < iterations:
        done += 1
        change = 0.0
        for block in blocks:
            logs: dict[int, list[float]] = {}
            for b, layer, _, errs, kl in layer_points:
                if b != block:
                    continue
                base = sum(fits[kind].predict([e]) for kind, e in errs if kind in fits)
                if base > 0:
                    logs.setdefault(layer, []).append(math.log(max(kl, MIN_DELTA_KL) / base))
            samples = {layer: math.exp(float(np.mean(v))) for layer, v in logs.items()}
            if samples:
                scale = math.exp(float(np.mean([math.log(v) for v in samples.values()])))
                samples = {layer: v / scale for layer, v in samples.items()}
            new = np.asarray(interpolate_factors(samples, n_layers, global_layers))
            change = max(change, float(np.max(np.abs(new / factors[block] - 1))) if n_layers else 0.0)
            factors[block] = new
        fits = fit_kinds()
        if change < tolerance:
            break
    layers = {b: LayerFactors(b, tuple(float(v) for v in factors[b]),
                              tuple((layer, t, float(kl)) for bb, layer, t, _, kl in layer_points if bb == b))
              for b in blocks}
    return FastFit(fits, layers, done)


# --- calibration points ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationPoint:
    """One whole-model measurement: ``tensors`` at ``qtype`` — all of one kind that fit (``layer`` None), or
    the tensors of block ``kind`` (``BLOCKS``) in ``layer``."""

    kind: str
    qtype: GGMLQuantizationType
    tensors: tuple[str, ...]
    layer: int | None = None

    @property
    def label(self) -> str:
        if self.layer is None:
            return f"kind-{self.kind}-{self.qtype.name}"
        return f"layer-{self.kind}-{self.layer}-{self.qtype.name}"


def plan_points(kinds: Mapping[str, Sequence[str]], allowed: Mapping[str, Sequence[GGMLQuantizationType]],
                probes: Sequence[GGMLQuantizationType], layers: Sequence[int] = ()) -> list[CalibrationPoint]:
    """For each kind (``kinds``: kind → its tensors), one point per probe type that some of its tensors take
    (UserError for a kind no probe type fits); then for each block and each of ``layers`` (``sample_layers``),
    one point with the block's tensors of that layer at the first probe type that some of them take."""
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
    for block, members in BLOCKS.items():
        for layer in layers:
            tensors = [t for kind in members for t in kinds.get(kind, ()) if tensor_kind(t)[1] == layer]
            for probe in probes:
                fitting = tuple(t for t in tensors if probe in allowed.get(t, ()))
                if fitting:
                    points.append(CalibrationPoint(block, probe, fitting, layer))
                    break
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
    score_seconds_per_position: float = 0.0  # scoring a candidate's logits against the reference (KL, top tokens)
    cover_seconds_per_position: float = 0.0  # keeping the reference's covered distribution

    @property
    def evaluation_seconds(self) -> float:
        """One evaluation over the selected calibration parts, scored against the reference."""
        return (self.load_seconds + self.positions * (self.seconds_per_position + self.score_seconds_per_position)
                + self.images * self.seconds_per_image)

    @property
    def reference_seconds(self) -> float:
        """The reference pass over the selected calibration parts."""
        return (self.load_seconds + self.positions * (self.seconds_per_position + self.cover_seconds_per_position)
                + self.images * self.seconds_per_image)

    @property
    def whole_set_seconds(self) -> float:
        """One pass over the whole calibration set."""
        return self.imatrix_seconds(None)

    def imatrix_seconds(self, chunks: int | None, chunk_size: int = 512) -> float:
        """One pass over the first ``chunks`` chunks of ``chunk_size`` positions of the calibration set (None:
        all of it): at most ``chunks × chunk_size`` positions (chunks are packed with whole items, so fewer),
        their share of the images."""
        share = 1.0 if chunks is None or not self.all_positions else min(1.0, chunks * chunk_size / self.all_positions)
        return self.load_seconds + share * (self.all_positions * self.seconds_per_position
                                            + self.all_images * self.seconds_per_image)


def time_model(source: Path, mmproj: Path | None, texts: Sequence[str], image_items: Sequence[Any],
               n_threads: int | None, batch_tokens: int = 128, selected: tuple[int, int] | None = None,
               image: Any | None = None) -> ModelTiming:
    """Load ``source`` (+ ``mmproj`` when there are images), decode one batch of the first text with every
    logit, keep its reference distribution and score it against that (as the reference pass and each evaluation
    do with every position), and encode ``image`` (an item with a rendered image); count the positions of
    ``texts`` and ``image_items`` (question, options, image tokens) — of all of them, and of the first
    ``selected`` = (texts, items) that an evaluation scores (default: all)."""
    from medgemma_gguf.quant_eval.metrics import cover_from_logits, score_candidate
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
        logits = engine.eval_tokens(tokens, logits="all")
        per_position = (time.perf_counter() - started) / len(tokens)
        started = time.perf_counter()
        covered = cover_from_logits(logits)
        per_cover = (time.perf_counter() - started) / len(tokens)
        started = time.perf_counter()
        score_candidate(covered, logits, {"ref_top": covered.top1_ids, "next": np.asarray(tokens)})
        per_score = (time.perf_counter() - started) / len(tokens)
        del logits
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
                       sum(text_counts) + sum(item_counts) + image_tokens * len(image_items), len(image_items),
                       per_score, per_cover)


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
