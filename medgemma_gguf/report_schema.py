"""The evaluation report (``report.json``) as a typed, versioned record: written by ``quant_eval``, read by
``fit`` (runtime), AUTO (convert), the demo and the report renderer.

It lives in the core because the runtime, a lower layer than ``quant_eval``, reads reports. One row per
quant (:class:`ReportRow`); its JSON form keeps the flat keys scripts already read (``file``, ``type``,
``bytes``, ``bpw``, ``kld_mean``, ``kld_p99``, ``top1_agreement``, ``ppl_ratio``, ``image_kld_mean``,
``accuracy``, ``prompt_tps``, ``gen_tps``, ``error`` …): each statistics group is stored under a key
prefix (``kld_``, ``image_kld_``, ``dp_``) and read back into its dataclass.

Schema versions (``schema_version`` at the top of ``report.json``):

1. the first release, unversioned: ``kld_mean`` from a top-K reference cache, a lower bound, with
   ``kld_upper_mean``. Read by :meth:`EvalReport.from_json` as version 2 rows whose bracket is those two
   numbers (the same mathematics, with a coarser cache); the llama.cpp statistics it lacks are ``None``.
2. the reference is stored by probability mass (coverage 1 - ε) with exact normalisers: ``kld_mean`` with
   its exact bracket ``kld_mean_low`` / ``kld_mean_high``, llama.cpp's full KL and Δp statistics, the
   coverage and cache size.

A report written by a newer schema than this module knows is refused with the fix (upgrade, or re-run
``eval`` with this version); a damaged one names the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from medgemma_gguf.errors import InputError, IntegrityError, NotFoundError, setting

REPORT_SCHEMA_VERSION = 2


class ReportFormatError(IntegrityError):
    """A report.json that is not valid for its schema version."""


def _number(value: Any, where: str, integer: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportFormatError(f"{where} is {value!r}, not a number; re-run medgemma-gguf eval")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ReportFormatError(f"{where} is {value!r}, not an integer; re-run medgemma-gguf eval")
        return int(value)
    return float(value)


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ReportFormatError(f"{where} is {value!r}, not text; re-run medgemma-gguf eval")
    return value


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python numbers, NaN/inf to null, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class _Stats:
    """A group of numeric statistics stored in a row under ``PREFIX`` (all fields numbers or None)."""

    PREFIX: ClassVar[str] = ""
    INTEGERS: ClassVar[frozenset[str]] = frozenset({"n"})
    RENAMED: ClassVar[dict[str, str]] = {}

    @classmethod
    def json_key(cls, name: str, prefix: str | None = None) -> str:
        """The row key of field ``name``: ``prefix`` + name (default prefix: the class's, with its renames)."""
        if prefix is not None:
            return prefix + name
        return cls.RENAMED.get(name, cls.PREFIX + name)

    @classmethod
    def json_keys(cls, prefix: str | None = None) -> list[str]:
        return [cls.json_key(f.name, prefix) for f in fields(cls)]

    def to_json(self, prefix: str | None = None) -> dict[str, Any]:
        return {self.json_key(f.name, prefix): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def empty_json(cls, prefix: str | None = None) -> dict[str, Any]:
        """The group's keys, all null (not measured)."""
        return dict.fromkeys(cls.json_keys(prefix))

    @classmethod
    def from_row(cls, row: Mapping[str, Any], where: str, prefix: str | None = None) -> Any:
        """The group from a flat row; None when its anchor value is absent or null (not measured)."""
        if row.get(cls.json_key(cls.ANCHOR, prefix)) is None:  # type: ignore[attr-defined]
            return None
        values = {f.name: _number(row.get(cls.json_key(f.name, prefix)), f"{where}.{cls.json_key(f.name, prefix)}",
                                  f.name in cls.INTEGERS) for f in fields(cls)}
        return cls(**values)


@dataclass(frozen=True)
class KLStats(_Stats):
    """KL divergence over a set of positions (nats): the mean with its exact bracket and llama.cpp's statistics.

    ``mean`` is the coarsened KL (``quant_eval.metrics.kl_divergence_covered``'s estimate, the bracket's
    low end); the true mean lies in ``[mean_low, mean_high]``. The percentiles are of the estimates.
    """

    PREFIX: ClassVar[str] = "kld_"
    ANCHOR: ClassVar[str] = "mean"

    mean: float
    mean_low: float | None = None
    mean_high: float | None = None
    mean_stderr: float | None = None
    n: int | None = None
    max: float | None = None
    p999: float | None = None
    p99: float | None = None
    p95: float | None = None
    p90: float | None = None
    median: float | None = None
    p10: float | None = None
    p05: float | None = None
    p01: float | None = None
    p001: float | None = None
    min: float | None = None

    @property
    def bracket(self) -> tuple[float, float]:
        """``(mean_low, mean_high)``. A missing ``mean_high`` is an unbounded one (``inf``, which JSON writes as
        null: a candidate giving a token probability 0 where the reference may have mass, or a report that never
        stated a bound); a missing ``mean_low`` is ``mean``, the bracket's low end by construction."""
        low = self.mean if self.mean_low is None else self.mean_low
        high = math.inf if self.mean_high is None else self.mean_high
        return low, high


@dataclass(frozen=True)
class DeltaPStats(_Stats):
    """llama.cpp's token probability statistics: ``Δp = q(t) - p(t)`` for the observed next token ``t``."""

    PREFIX: ClassVar[str] = "dp_"
    ANCHOR: ClassVar[str] = "rms"
    RENAMED: ClassVar[dict[str, str]] = {"rms": "rms_dp", "rms_stderr": "rms_dp_stderr"}

    rms: float
    rms_stderr: float | None = None
    mean: float | None = None
    mean_stderr: float | None = None
    n: int | None = None
    max: float | None = None
    p999: float | None = None
    p99: float | None = None
    p95: float | None = None
    p90: float | None = None
    p75: float | None = None
    median: float | None = None
    p25: float | None = None
    p10: float | None = None
    p05: float | None = None
    p01: float | None = None
    p001: float | None = None
    min: float | None = None


@dataclass(frozen=True)
class _Numbers:
    """A JSON object of numbers (null where not measured): ``INTEGERS`` are whole numbers, ``REQUIRED`` present."""

    INTEGERS: ClassVar[frozenset[str]] = frozenset()
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        return _plain({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def _values(cls, data: Any, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ReportFormatError(f"{where} is not an object; re-run medgemma-gguf eval")
        values = {f.name: _number(data.get(f.name), f"{where}.{f.name}", f.name in cls.INTEGERS)
                  for f in fields(cls) if f.name not in skip}
        missing = [name for name in cls.REQUIRED if values[name] is None]
        if missing:
            raise ReportFormatError(f"{where} has no {' / '.join(missing)}; re-run medgemma-gguf eval")
        return values

    @classmethod
    def from_json(cls, data: Any, where: str) -> Any:
        return cls(**cls._values(data, where))


@dataclass(frozen=True)
class SliceAccuracy(_Numbers):
    """Task accuracy on one slice, its 95 % Wilson interval and McNemar's exact test against the reference."""

    INTEGERS: ClassVar[frozenset[str]] = frozenset({"n", "only_quant_right", "only_reference_right"})
    REQUIRED: ClassVar[tuple[str, ...]] = ("accuracy", "ci95_low", "ci95_high", "n")

    accuracy: float
    ci95_low: float
    ci95_high: float
    n: int
    reference_accuracy: float | None = None
    mcnemar_p: float | None = None
    only_quant_right: int | None = None
    only_reference_right: int | None = None


@dataclass(frozen=True)
class PartStats(_Numbers):
    """KL and agreement over one part (the held-out text or one slice)."""

    INTEGERS: ClassVar[frozenset[str]] = frozenset({"n_positions"})
    REQUIRED: ClassVar[tuple[str, ...]] = ("kld_mean", "n_positions")

    n_positions: int
    kld_mean: float
    kld_mean_low: float | None = None
    kld_mean_high: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None


# scalar fields of a row: name -> (kind, required)
_ROW_TEXT = ("file", "path", "type", "mmproj", "error")
_ROW_INTS = ("bytes", "tensor_bytes", "n_elements", "mmproj_bytes", "speed_prompt_tokens", "speed_gen_tokens",
             "peak_rss_bytes")
_ROW_FLOATS = ("bpw", "top1_agreement", "top1_agreement_stderr", "image_top1_agreement", "rms_dp_top", "ppl_ratio",
               "ln_ppl_ratio", "ln_ppl_ratio_stderr", "prompt_tps", "gen_tps", "image_encode_s", "eval_seconds")
_IMAGE_PREFIX = "image_kld_"


@dataclass(frozen=True)
class ReportRow:
    """One quant's results. ``error`` set: the quant could not be evaluated and the metrics are None."""

    file: str
    path: str | None = None
    type: str | None = None
    bytes: int | None = None
    bpw: float | None = None
    tensor_bytes: int | None = None
    n_elements: int | None = None
    mmproj: str | None = None
    mmproj_bytes: int | None = None
    kld: KLStats | None = None
    image_kld: KLStats | None = None
    top1_agreement: float | None = None
    top1_agreement_stderr: float | None = None
    image_top1_agreement: float | None = None
    dp: DeltaPStats | None = None
    rms_dp_top: float | None = None
    ppl_ratio: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_stderr: float | None = None
    accuracy: dict[str, SliceAccuracy] = field(default_factory=dict)
    parts: dict[str, PartStats] = field(default_factory=dict)
    prompt_tps: float | None = None
    gen_tps: float | None = None
    image_encode_s: float | None = None
    speed_prompt_tokens: int | None = None
    speed_gen_tokens: int | None = None
    eval_seconds: float | None = None
    peak_rss_bytes: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kld_mean(self) -> float | None:
        """The mean KL fit and AUTO rank by (None for a failed or unmeasured quant)."""
        return self.kld.mean if self.kld is not None else None

    @property
    def kld_bracket(self) -> tuple[float, float] | None:
        return self.kld.bracket if self.kld is not None else None

    @property
    def ok(self) -> bool:
        """Evaluated successfully with a KL measurement."""
        return self.error is None and self.kld is not None

    @property
    def footprint_bytes(self) -> int | None:
        """Bytes that must be loaded to run the quant: the text GGUF plus its mmproj."""
        if self.bytes is None:
            return None
        return int(self.bytes) + int(self.mmproj_bytes or 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in _ROW_TEXT + _ROW_INTS + _ROW_FLOATS}
        out.update(self.kld.to_json() if self.kld else KLStats.empty_json())
        out.update(self.image_kld.to_json(_IMAGE_PREFIX) if self.image_kld else KLStats.empty_json(_IMAGE_PREFIX))
        out.update(self.dp.to_json() if self.dp else DeltaPStats.empty_json())
        out["accuracy"] = {name: entry.to_json() for name, entry in self.accuracy.items()}
        out["parts"] = {name: entry.to_json() for name, entry in self.parts.items()}
        out.update(self.extra)
        return _plain(out)

    @classmethod
    def from_json(cls, data: Any, where: str = "row", version: int = REPORT_SCHEMA_VERSION) -> ReportRow:
        if not isinstance(data, dict):
            raise ReportFormatError(f"{where} is not an object; re-run medgemma-gguf eval")
        row = dict(data)
        if version == 1:
            row = _upgrade_v1_row(row)
        file = _text(row.get("file"), f"{where}.file")
        if not file:
            raise ReportFormatError(f"{where} has no file name; re-run medgemma-gguf eval")
        values: dict[str, Any] = {name: _text(row.get(name), f"{where}.{name}") for name in _ROW_TEXT}
        values.update({name: _number(row.get(name), f"{where}.{name}", True) for name in _ROW_INTS})
        values.update({name: _number(row.get(name), f"{where}.{name}") for name in _ROW_FLOATS})
        values["kld"] = KLStats.from_row(row, where)
        values["image_kld"] = KLStats.from_row(row, where, prefix=_IMAGE_PREFIX)
        values["dp"] = DeltaPStats.from_row(row, where)
        accuracy, parts = row.get("accuracy") or {}, row.get("parts") or {}
        if not isinstance(accuracy, dict) or not isinstance(parts, dict):
            raise ReportFormatError(f"{where}.accuracy / .parts must be objects; re-run medgemma-gguf eval")
        values["accuracy"] = {str(k): SliceAccuracy.from_json(v, f"{where}.accuracy[{k}]") for k, v in accuracy.items()}
        values["parts"] = {str(k): PartStats.from_json(v, f"{where}.parts[{k}]") for k, v in parts.items()}
        known = set(_ROW_TEXT + _ROW_INTS + _ROW_FLOATS) | {"accuracy", "parts"}
        known |= {*KLStats.json_keys(), *KLStats.json_keys(_IMAGE_PREFIX), *DeltaPStats.json_keys()}
        values["extra"] = {k: v for k, v in row.items() if k not in known}
        values["file"] = file
        return cls(**values)


def _upgrade_v1_row(row: dict[str, Any]) -> dict[str, Any]:
    """A version-1 row in version-2 keys: its top-K lower bound and upper bound become the bracket."""
    out = dict(row)
    for prefix in ("kld_", _IMAGE_PREFIX):
        upper = out.pop(f"{prefix}upper_mean", None)
        if out.get(f"{prefix}mean") is not None:
            out.setdefault(f"{prefix}mean_low", out[f"{prefix}mean"])
            out.setdefault(f"{prefix}mean_high", upper)
    for part in (out.get("parts") or {}).values():
        if isinstance(part, dict) and part.get("kld_mean") is not None:
            part.setdefault("kld_mean_low", part["kld_mean"])
    return out


@dataclass(frozen=True)
class Coverage(_Numbers):
    """How the reference was stored: coverage ``1 - epsilon`` by mass (``epsilon = 0``: every token), the set
    size bounds, what was stored, and the cache's size. Version-1 reports carry ``top_k`` instead."""

    INTEGERS: ClassVar[frozenset[str]] = frozenset({"min_tokens", "max_tokens", "positions_at_cap", "n_positions",
                                                    "vocab_size", "cache_bytes", "top_k", "dense_positions"})

    epsilon: float | None = None
    full_vocab: bool = False
    min_tokens: int | None = None
    max_tokens: int | None = None
    mean_set_size: float | None = None
    max_tail_mass: float | None = None
    positions_at_cap: int | None = None
    dense_positions: int | None = None
    n_positions: int | None = None
    vocab_size: int | None = None
    cache_bytes: int | None = None
    cache_bytes_per_position: float | None = None
    top_k: int | None = None

    @classmethod
    def from_json(cls, data: Any, where: str = "coverage") -> Coverage:
        if data is None:
            return cls()
        values = cls._values(data, where, skip=("full_vocab",))
        return cls(**values, full_vocab=bool(data.get("full_vocab", False)))


@dataclass
class EvalReport:
    """A whole ``report.json``: what was compared (reference, coverage, slices, held-out text) and the rows."""

    reference: dict[str, Any]
    rows: list[ReportRow]
    coverage: Coverage = field(default_factory=Coverage)
    slices: list[dict[str, Any]] = field(default_factory=list)
    heldout: dict[str, Any] | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = REPORT_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # medgemma_gguf.provenance.Provenance.to_json()

    def row(self, file: str) -> ReportRow | None:
        """The row of ``file`` (matched by file name), or None."""
        name = Path(file).name
        return next((r for r in self.rows if Path(r.file).name == name), None)

    def to_json(self) -> dict[str, Any]:
        return _plain({"schema_version": REPORT_SCHEMA_VERSION, "reference": self.reference,
                       "coverage": self.coverage.to_json(), "slices": self.slices, "heldout": self.heldout,
                       "cache": self.cache, "rows": [r.to_json() for r in self.rows],
                       "recommendations": self.recommendations, **self.extra,
                       **({"provenance": self.provenance} if self.provenance else {})})

    @classmethod
    def from_json(cls, data: Any, where: str = "report") -> EvalReport:
        """Read any known schema version (older ones upgraded); refuse newer ones and damaged reports."""
        if isinstance(data, list):  # the bare list of rows some scripts write
            data = {"rows": data, "schema_version": 1}
        if not isinstance(data, dict):
            raise ReportFormatError(f"{where} is not a report object; pass a report.json written by medgemma-gguf eval")
        version = data.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ReportFormatError(f"{where} has schema_version {version!r}; re-run medgemma-gguf eval")
        if version > REPORT_SCHEMA_VERSION:
            raise InputError(f"{where} was written by a newer medgemma-gguf (report schema {version}, this version "
                             f"reads up to {REPORT_SCHEMA_VERSION}); upgrade medgemma-gguf, or re-run "
                             "medgemma-gguf eval with this version")
        rows = data.get("rows")
        if not isinstance(rows, list):
            raise ReportFormatError(f"{where} has no list of rows; pass a report.json written by medgemma-gguf eval")
        coverage = Coverage.from_json(data.get("coverage"), f"{where}.coverage")
        if version == 1 and data.get("top_k") is not None:
            coverage = Coverage(top_k=_number(data.get("top_k"), f"{where}.top_k", True))
        known = {"schema_version", "reference", "coverage", "slices", "heldout", "cache", "rows", "recommendations",
                 "top_k", "provenance"}
        return cls(reference=dict(data.get("reference") or {}),
                   rows=[ReportRow.from_json(r, f"{where}.rows[{i}]", version) for i, r in enumerate(rows)],
                   coverage=coverage, slices=list(data.get("slices") or []), heldout=data.get("heldout"),
                   cache=dict(data.get("cache") or {}), recommendations=list(data.get("recommendations") or []),
                   schema_version=REPORT_SCHEMA_VERSION, provenance=dict(data.get("provenance") or {}),
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        """Read ``report.json`` (older schema versions upgraded in memory; the file is not rewritten)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise NotFoundError(f"report {path} not found; run medgemma-gguf eval or drop {setting('report')}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportFormatError(f"report {path} is not valid JSON; re-run medgemma-gguf eval") from exc
        return cls.from_json(data, where=f"report {path}")

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
