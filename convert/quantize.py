"""Quantize a text GGUF with llama.cpp's own quantizer (``llama_model_quantize``), standard types or recipes.

* Standard types (``Q4_K_M``, ``IQ2_XXS``, ...) pass llama.cpp's file type (``LLAMA_FTYPE_MOSTLY_*``) and
  let llama.cpp choose its own per-tensor mixture, as ``llama-quantize`` does.
* Recipes (``convert.recipe``: the bundled ``UD-*`` or a user's TOML) give every quantizable tensor an
  explicit type through llama.cpp's tensor-type overrides, so only llama.cpp's shape fallbacks can
  change a planned type.
* AUTO (``auto_quantize_folder``, ``quantize --target-bpw/--target-size/--vram``): a recipe chosen by
  ``convert.auto_quant`` from the sensitivity table of ``convert.sensitivity``, written as
  ``<model>-AUTO-<bpw>.toml`` beside ``<model>-AUTO-<bpw>.gguf`` and quantized like any other recipe; the
  manifest row's ``auto`` field records the budget, predicted KL, method and sensitivity cache.
* After writing, the real per-tensor types are read back from the file's header; ``fallbacks`` lists
  each tensor whose type is not the one asked for (for recipes) or that llama.cpp moved to another type
  because of its row length (its ``falling back to`` warnings, for standard types).
* Bits per weight (``bpw``) = 8 × bytes of the quantizable tensors / their element count. Quantizable
  tensors are those llama.cpp's quantizer may change: the ``*.weight`` matrices with two or more
  dimensions that are not norms (token embedding, attention and feed-forward weights); the 1-D norms,
  always F32, are not counted. The file size (``bytes``) includes everything.

Types whose tensors llama.cpp refuses to write without an importance matrix (``tensor_requires_imatrix``
in llama.cpp's src/llama-quant.cpp: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, except on the token
embedding and output) are refused here before any work, with how to make one.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from convert.recipe import QuantPlan, Recipe, builtin_recipe, builtin_recipe_names, is_quantizable, plan_recipe
from medgemma_gguf.atomic import atomic_output
from medgemma_gguf.errors import UserError
from runtime.gguf_info import bits_per_weight, read_gguf_info

log = logging.getLogger(__name__)
T = GGMLQuantizationType

# quant name -> llama_ftype (values of LLAMA_FTYPE_* in llama.h), in llama-quantize's order of size
STANDARD_TYPES: dict[str, int] = {
    "BF16": 32, "F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q4_K_M": 15, "Q4_K_S": 14,
    "Q4_0": 2, "IQ4_XS": 30, "IQ4_NL": 25, "Q3_K_L": 13, "Q3_K_M": 12, "Q3_K_S": 11, "IQ3_M": 27,
    "IQ3_XXS": 23, "Q2_K": 10, "IQ2_M": 29, "IQ2_XS": 20, "IQ2_XXS": 19, "IQ1_M": 31, "IQ1_S": 24,
}  # fmt: skip
# llama_ftype_get_default_type: the ggml type most tensors of a standard file type get
_DEFAULT_TYPE: dict[str, GGMLQuantizationType] = {
    "BF16": T.BF16, "F16": T.F16, "Q8_0": T.Q8_0, "Q6_K": T.Q6_K, "Q5_K_M": T.Q5_K, "Q5_K_S": T.Q5_K,
    "Q4_K_M": T.Q4_K, "Q4_K_S": T.Q4_K, "Q4_0": T.Q4_0, "IQ4_XS": T.IQ4_XS, "IQ4_NL": T.IQ4_NL,
    "Q3_K_L": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_S": T.Q3_K, "IQ3_M": T.IQ3_S, "IQ3_XXS": T.IQ3_XXS,
    "Q2_K": T.Q2_K, "IQ2_M": T.IQ2_S, "IQ2_XS": T.IQ2_XS, "IQ2_XXS": T.IQ2_XXS, "IQ1_M": T.IQ1_M,
    "IQ1_S": T.IQ1_S,
}  # fmt: skip
# tensor_requires_imatrix: these destination types need an imatrix (Q2_K only inside a Q2_K_S file)
IMATRIX_TYPES = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})
_NO_IMATRIX_NEEDED = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")
# ggml_quantize_requires_imatrix (ggml.c): ggml aborts the process when one of these is written without
# imatrix data for that very tensor, whatever llama.cpp's rules above say (token_embd included)
GGML_REQUIRES_IMATRIX = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S})
# the llama_ftype a recipe's file is written with (general.file_type), by its base type
_RECIPE_FTYPE: dict[GGMLQuantizationType, int] = {
    T.Q8_0: 7, T.Q6_K: 18, T.Q5_K: 17, T.Q5_1: 9, T.Q5_0: 8, T.Q4_K: 15, T.Q4_1: 3, T.Q4_0: 2, T.IQ4_XS: 30,
    T.IQ4_NL: 25, T.Q3_K: 12, T.IQ3_S: 26, T.IQ3_XXS: 23, T.Q2_K: 10, T.IQ2_S: 28, T.IQ2_XS: 20,
    T.IQ2_XXS: 19, T.IQ1_M: 31, T.IQ1_S: 24,
}  # fmt: skip
_UNQUANTIZED_FTYPE = {T.F32: 0, T.F16: 1, T.BF16: 32}
HIGH_PRECISION = ("F32", "BF16", "F16")  # source types, best first

_FALLBACK_LOG = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)[^\n]*?"
    r"-> falling back to\s+(\S+)")
_PROGRESS_LOG = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_FAILURE_LOG = re.compile(r"failed to quantize: ([^\n]+)")


@dataclass(frozen=True)
class QuantSpec:
    """One requested output: a standard llama.cpp type or a recipe."""

    name: str  # file label: Q4_K_M, UD-Q4_K_XL, or a user recipe's name
    ftype: int | None = None
    recipe: Recipe | None = None

    @property
    def is_recipe(self) -> bool:
        return self.recipe is not None


@dataclass(frozen=True)
class Fallback:
    """A tensor that llama.cpp wrote as another type than the one asked for."""

    tensor: str
    wanted: str
    actual: str
    reason: str


@dataclass
class QuantResult:
    """What one quantization wrote, with the per-tensor types read back from the file."""

    path: Path
    type_name: str
    bytes: int
    bpw: float
    tensor_type_counts: dict[str, int]
    planned_types: dict[str, str]  # recipes: every quantizable tensor; standard types: {} (llama.cpp's mix)
    actual_types: dict[str, str]  # every tensor of the file
    fallbacks: list[Fallback]
    skipped: bool = False
    imatrix: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- resolving names ------------------------------------------------------------------------------------
def valid_quant_names() -> list[str]:
    """Standard types and bundled recipes, as accepted by --quants."""
    return [*STANDARD_TYPES, *builtin_recipe_names()]


def parse_quant_list(text: str | Sequence[str] | None) -> list[str]:
    """``"Q8_0, Q4_K_M"`` (or a list of such strings) -> ["Q8_0", "Q4_K_M"], duplicates dropped."""
    items = [text] if isinstance(text, str) else list(text or [])
    names: list[str] = []
    for item in items:
        for name in item.split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def resolve_quants(names: Iterable[str], recipes: Sequence[Recipe] = ()) -> list[QuantSpec]:
    """QuantSpecs for names (case-insensitive) plus every recipe in ``recipes`` (user files).

    UserError listing the valid names for an unknown one, or for a user recipe named like another quant.
    """
    by_upper = {name.upper(): name for name in STANDARD_TYPES}
    builtin = {name.upper(): name for name in builtin_recipe_names()}
    user = {}
    for recipe in recipes:
        if recipe.name.upper() in by_upper or recipe.name.upper() in builtin or recipe.name.upper() in user:
            raise UserError(f"recipe {recipe.source} is named {recipe.name!r}, like another quant type; give it "
                            "another name = \"...\"")
        user[recipe.name.upper()] = recipe
    specs: list[QuantSpec] = []
    for name in names:
        key = name.strip().upper()
        if key in by_upper:
            spec = QuantSpec(by_upper[key], ftype=STANDARD_TYPES[by_upper[key]])
        elif key in user:
            spec = QuantSpec(user[key].name, recipe=user[key])
        elif key in builtin:
            spec = QuantSpec(builtin[key], recipe=builtin_recipe(builtin[key]))
        else:
            known = valid_quant_names() + [r.name for r in recipes]
            raise UserError(f"unknown quant type {name!r}; valid: {', '.join(known)} (or --recipe FILE.toml)")
        if spec.name not in [s.name for s in specs]:
            specs.append(spec)
    for recipe in recipes:
        if recipe.name not in [s.name for s in specs]:
            specs.append(QuantSpec(recipe.name, recipe=recipe))
    return specs


# --- what a quantization needs --------------------------------------------------------------------------
def _row_fits(qtype: GGMLQuantizationType, shape: Sequence[int]) -> bool:
    return shape[0] % GGML_QUANT_SIZES[qtype][0] == 0


def needs_imatrix(spec: QuantSpec, tensors: Sequence[Any]) -> list[str]:
    """Tensors that llama.cpp would refuse to write as planned without an imatrix (empty: none).

    Standard types: those whose default type is an imatrix type (the tensors kept at it are not known
    before llama.cpp runs, so the answer is every quantizable tensor of a fitting row length).
    """
    if spec.recipe is not None:
        plan = plan_recipe(spec.recipe, tensors)
        shapes = {t.name: t.shape for t in tensors}
        return [name for name, qtype in plan.types.items()
                if qtype in IMATRIX_TYPES and name not in _NO_IMATRIX_NEEDED and _row_fits(qtype, shapes[name])]
    default = _DEFAULT_TYPE[spec.name]
    if default not in IMATRIX_TYPES:
        return []
    return [t.name for t in tensors if is_quantizable(t.name, t.shape) and t.name not in _NO_IMATRIX_NEEDED
            and _row_fits(default, t.shape)]


def may_need_imatrix(spec: QuantSpec) -> bool:
    """Whether ``spec`` asks for an imatrix type anywhere, before the model's shapes are known."""
    if spec.recipe is not None:
        return spec.recipe.base in IMATRIX_TYPES or any(rule.type in IMATRIX_TYPES for rule in spec.recipe.rules)
    return _DEFAULT_TYPE[spec.name] in IMATRIX_TYPES


def imatrix_help(source: Path, mmproj: Path | None) -> str:
    """How to make an imatrix for ``source``: the command line to run."""
    folder = source.parent
    mm = f" --mmproj {mmproj}" if mmproj else ""
    return (f"pass --imatrix auto to compute one, or run `medgemma-gguf imatrix {source}{mm} -o "
            f"{folder / 'imatrix.gguf'}` and pass --imatrix {folder / 'imatrix.gguf'}")


# --- llama.cpp call -------------------------------------------------------------------------------------
class _LogCapture:
    """Routes llama.cpp's log lines through Python while the quantizer runs: kept, parsed, forwarded."""

    def __init__(self, progress: Any | None):
        import llama_cpp

        self.text: list[str] = []
        self.progress = progress
        self._callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        message = text.decode("utf-8", errors="replace")
        self.text.append(message)
        match = _PROGRESS_LOG.match(message)
        if match and self.progress is not None:
            self.progress.total = int(match.group(2))
            self.progress.update(int(match.group(1)) - self.progress.n)
        if message.strip():  # warnings (overrides applied, fallbacks) are summarised by the caller
            log.log(logging.ERROR if level == 4 else logging.DEBUG, message.rstrip())

    @property
    def joined(self) -> str:
        return "".join(self.text)

    def __enter__(self) -> _LogCapture:
        import llama_cpp

        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        import llama_cpp

        from runtime import engine

        llama_cpp.llama_log_set(engine._forward_log, ctypes.c_void_p(0))  # back to the runtime's routing


def _kv_override(key: str, value: str | int) -> Any:
    import llama_cpp

    entry = llama_cpp.llama_model_kv_override()
    entry.key = key.encode()[:127]
    if isinstance(value, int):
        entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        entry.value.val_i64 = value
    else:
        entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        entry.value.val_str = value.encode()[:127]
    return entry


def run_llama_quantize(source: Path, output: Path, ftype: int, *, imatrix: Any | None = None,
                       overrides: Sequence[tuple[str, GGMLQuantizationType]] = (),
                       metadata: dict[str, str | int] | None = None, n_threads: int | None = None,
                       progress: Any | None = None) -> str:
    """One ``llama_model_quantize`` call; returns llama.cpp's log text, UserError on a failure status.

    ``imatrix``: a ``convert.imatrix.Imatrix`` (its per-column mean squares are passed, as llama-quantize
    passes its file's); ``overrides``: (regex on tensor names, ggml type), first match wins in llama.cpp;
    ``metadata``: GGUF keys to set in the output. The ctypes arrays live until the call returns.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or 0
    keep: list[Any] = []  # everything llama.cpp points into during the call
    if imatrix is not None:
        names = imatrix.tensor_names
        entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()  # zeroed last entry ends it
        for i, name in enumerate(names):
            values = np.ascontiguousarray(imatrix.mean_squares(name), dtype=np.float32)
            encoded = name.encode()
            keep += [values, encoded]
            entries[i].name = encoded
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if overrides:
        patterns = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()  # NULL pattern ends it
        for i, (pattern, qtype) in enumerate(overrides):
            encoded = pattern.encode()
            keep.append(encoded)
            patterns[i].pattern = encoded
            patterns[i].type = int(qtype)
        keep.append(patterns)
        params.tt_overrides = ctypes.cast(patterns, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if metadata:
        kvs = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()  # empty key ends it
        for i, (key, value) in enumerate(metadata.items()):
            kvs[i] = _kv_override(key, value)
        keep.append(kvs)
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    llama_cpp.llama_backend_init()
    with _LogCapture(progress) as capture:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    del keep
    text = capture.joined
    if status != 0:
        reason = _FAILURE_LOG.search(text)
        detail = reason.group(1).strip() if reason else f"status {status}"
        raise UserError(f"llama.cpp could not quantize {source.name}: {detail}; check that it is an "
                        "unquantized text GGUF made by medgemma-gguf convert")
    return text


# --- one file -------------------------------------------------------------------------------------------
def read_back(path: Path, type_name: str, plan: QuantPlan | None, log_text: str = "") -> QuantResult:
    """A QuantResult from the file's header: real per-tensor types, counts, bpw, fallbacks."""
    info = read_gguf_info(path)
    actual = {t.name: t.ggml_type.name for t in info.tensors}
    logged = {m.group(1): m for m in _FALLBACK_LOG.finditer(log_text)}
    fallbacks: list[Fallback] = []
    planned: dict[str, str] = {}
    if plan is not None:
        planned = {name: qtype.name for name, qtype in plan.types.items()}
        for name, wanted in planned.items():
            if actual.get(name) != wanted:
                fallbacks.append(Fallback(name, wanted, actual.get(name, "missing"), _reason(logged.get(name))))
    else:
        for name, match in logged.items():
            fallbacks.append(Fallback(name, match.group(4).upper(), actual.get(name, "missing"), _reason(match)))
    return QuantResult(path=path, type_name=type_name, bytes=path.stat().st_size, bpw=bits_per_weight(info.tensors),
                       tensor_type_counts=info.quantizable_type_counts(), planned_types=planned,
                       actual_types=actual, fallbacks=fallbacks)


def _reason(match: re.Match[str] | None) -> str:
    if match is None:
        return "llama.cpp chose another type"
    return (f"row length {match.group(2)} is not a multiple of {match.group(4).upper()}'s block of "
            f"{match.group(3)}; llama.cpp fell back to {match.group(5).upper()}")


def quantize_file(source: Path, output: Path, spec: QuantSpec, *, imatrix: Any | None = None,
                  imatrix_name: str | None = None, force: bool = False, n_threads: int | None = None,
                  progress: bool = True) -> QuantResult:
    """Quantize ``source`` (an unquantized text GGUF) to ``output`` as ``spec``; written atomically.

    Refuses, before writing anything, an imatrix type without ``imatrix`` and an imatrix that does not
    match the model.
    """
    from tqdm import tqdm

    source, output = Path(source), Path(output)
    info = read_gguf_info(source)
    if info.architecture == "clip":
        raise UserError(f"{source} is an mmproj; llama.cpp's quantizer takes the text model GGUF")
    quantized = sorted({t.ggml_type.name for t in info.tensors if t.ggml_type not in (T.F32, T.F16, T.BF16)})
    if quantized:
        raise UserError(f"{source.name} is already quantized ({', '.join(quantized)}); quantize from the "
                        "unquantized BF16/F32 GGUF that convert wrote")
    plan = plan_recipe(spec.recipe, info.tensors) if spec.recipe is not None else None
    if imatrix is None:
        needing = needs_imatrix(spec, info.tensors)
        if needing:
            raise UserError(f"{spec.name} needs an importance matrix (llama.cpp refuses {needing[0]} "
                            f"without one); {imatrix_help(source, None)}")
    else:
        from convert.imatrix import check_imatrix_matches

        check_imatrix_matches(imatrix, source)
    if plan is not None:
        shapes = {t.name: t.shape for t in info.tensors}
        covered = set(imatrix.tensor_names) if imatrix is not None else set()
        bare = [name for name, qtype in plan.types.items() if qtype in GGML_REQUIRES_IMATRIX and name not in covered
                and _row_fits(qtype, shapes[name])]
        if bare:
            raise UserError(f"{spec.name} asks for {plan.types[bare[0]].name} on {bare[0]}, which the importance "
                            f"matrix does not cover (ggml cannot write that type without it); give {bare[0]} "
                            "another type, e.g. Q2_K or IQ2_S")
    metadata: dict[str, str | int] = {"medgemma_gguf.quant": spec.name}
    if imatrix is not None:
        metadata.update({"quantize.imatrix.file": imatrix_name or "imatrix",
                         "quantize.imatrix.entries_count": len(imatrix.tensor_names)})
        if imatrix.datasets:
            metadata["quantize.imatrix.dataset"] = imatrix.datasets[0]
        if imatrix.chunk_count > 0:
            metadata["quantize.imatrix.chunks_count"] = int(imatrix.chunk_count)
    if plan is not None:
        ftype, overrides = _recipe_ftype(plan, metadata), plan.overrides
        metadata["medgemma_gguf.recipe_sha256"] = plan.recipe.sha256
    else:
        ftype, overrides = STANDARD_TYPES[spec.name], []
    bar = tqdm(desc=output.name, unit="tensor", disable=not progress, total=len(info.tensors))
    try:
        with atomic_output(output, force=force) as tmp:
            text = run_llama_quantize(source, tmp, ftype, imatrix=imatrix, overrides=overrides, metadata=metadata,
                                      n_threads=n_threads, progress=bar)
    finally:
        bar.close()
    result = read_back(output, spec.name, plan, text)
    if result.fallbacks:
        first = result.fallbacks[0]
        log.warning("%s: %d tensor(s) got another type than asked for, e.g. %s is %s, not %s (%s)", output.name,
                    len(result.fallbacks), first.tensor, first.actual, first.wanted, first.reason)
    return result


def _recipe_ftype(plan: QuantPlan, metadata: dict[str, str | int]) -> int:
    """The file type a recipe is written with. llama.cpp applies tensor overrides only when the file
    type's default is a quantized type, so an unquantized base is written as Q8_0 with every tensor
    overridden and ``general.file_type`` set back to the base's."""
    base = plan.recipe.base
    if base in _RECIPE_FTYPE:
        return _RECIPE_FTYPE[base]
    metadata["general.file_type"] = _UNQUANTIZED_FTYPE[base]
    return _RECIPE_FTYPE[T.Q8_0]


# --- an output folder -----------------------------------------------------------------------------------
IMATRIX_AUTO = "auto"


def source_entry(folder: Path, manifest: Any) -> Any:
    """The folder's highest-precision unquantized text GGUF (F32, then BF16, then F16) from its manifest."""
    rows = [row for row in manifest.present(folder, "text") if row.type.upper() in HIGH_PRECISION]
    if not rows:
        raise UserError(f"{folder} has no unquantized (F32/BF16/F16) text GGUF in its manifest; run "
                        f"`medgemma-gguf convert SOURCE --outdir {folder}` first")
    return min(rows, key=lambda row: HIGH_PRECISION.index(row.type.upper()))


def _mmproj_entry(folder: Path, manifest: Any) -> Any | None:
    rows = manifest.mmprojs(folder)
    return rows[0] if rows else None


def quant_path(folder: Path, model: str, spec: QuantSpec) -> Path:
    """``<model>-<TYPE>.gguf`` in ``folder``."""
    return Path(folder) / f"{model}-{spec.name}.gguf"


def _resolve_imatrix(folder: Path, manifest: Any, imatrix: str | Path | None, source: Any, mmproj: Any | None,
                     calibration: Any | None, force: bool, progress: bool, n_threads: int | None
                     ) -> tuple[Any | None, Path | None]:
    """(Imatrix, file) for ``--imatrix``: None, a file, or ``auto`` (computed once into the folder, reused)."""
    from convert.imatrix import calibration_description, compute_imatrix, read_imatrix, write_imatrix_gguf
    from medgemma_gguf.manifest import entry_for, sha256_of

    if imatrix is None:
        return None, None
    if str(imatrix) != IMATRIX_AUTO:
        path = Path(imatrix)
        return read_imatrix(path), path
    path = folder / f"imatrix-{manifest.model}.gguf"
    described = calibration_description(calibration)
    for row in manifest.find("imatrix"):
        if (row.path == path.name and path.is_file() and row.extra.get("source_sha256") == source.sha256
                and row.extra.get("calibration_sha256") == described["sha256"] and not force
                and sha256_of(path) == row.sha256):
            log.info("reusing %s", path.name)
            return read_imatrix(path), path
    if path.exists() and not force:
        raise UserError(f"{path} exists but the manifest does not record it for {source.path} and this "
                        "calibration set; pass --force to recompute it")
    computed = compute_imatrix(folder / source.path, folder / mmproj.path if mmproj else None,
                               calibration=calibration, progress=progress, n_threads=n_threads)
    write_imatrix_gguf(computed, path, force=True)
    manifest.upsert(entry_for(folder, path, "imatrix", "F32", source=source.path, source_sha256=source.sha256,
                              calibration_sha256=described["sha256"], calibration=computed.calibration,
                              chunks=computed.chunk_count, chunk_size=computed.chunk_size))
    manifest.save(folder)
    return computed, path


def _inputs(source: Any, spec: QuantSpec, imatrix_path: Path | None) -> dict[str, Any]:
    """What a quant file is built from: a rebuild is skipped only while these and its sha256 are unchanged."""
    from medgemma_gguf.manifest import sha256_of

    return {"source": source.path, "source_sha256": source.sha256, "quant": spec.name,
            "recipe_sha256": spec.recipe.sha256 if spec.recipe else None,
            "imatrix_sha256": sha256_of(imatrix_path) if imatrix_path else None}


def quantize_folder(outdir: Path | str, quants: str | Sequence[str] | None, *, imatrix: str | Path | None = None,
                    recipe_files: Sequence[Path | str] = (), force: bool = False, progress: bool = True,
                    n_threads: int | None = None, calibration: Any | None = None,
                    row_extra: dict[str, dict[str, Any]] | None = None) -> list[QuantResult]:
    """Quantize the folder's unquantized text GGUF to each of ``quants`` (+ each recipe file's recipe).

    Outputs are ``<model>-<TYPE>.gguf`` beside it, recorded in ``manifest.json`` (role, type, bytes, bpw,
    sha256, per-tensor type counts, fallbacks, inputs) and described in a generated ``README.md``.
    ``imatrix``: None, an imatrix file, or ``"auto"`` (computed on ``calibration`` — default the bundled
    set — into ``imatrix-<model>.gguf`` once and reused). A quant whose file still matches its manifest
    row and inputs is skipped; ``force`` rebuilds. Every request is checked before any file is written.
    ``row_extra``: more manifest fields per quant name (how an AUTO recipe was chosen).
    """
    from convert.model_card import write_model_card
    from convert.recipe import load_recipe
    from medgemma_gguf.manifest import Manifest, entry_for, sha256_of

    folder = Path(outdir)
    manifest = Manifest.load(folder)
    recipes = [load_recipe(path) for path in recipe_files]
    specs = resolve_quants(parse_quant_list(quants), recipes)
    if not specs:
        raise UserError(f"no quant types given; pass --quants with some of: {', '.join(valid_quant_names())}")
    source = source_entry(folder, manifest)
    source_path = folder / source.path
    mmproj = _mmproj_entry(folder, manifest)
    info = read_gguf_info(source_path)
    plans = {spec.name: plan_recipe(spec.recipe, info.tensors) for spec in specs if spec.recipe}
    if imatrix is None:
        for spec in specs:
            needing = needs_imatrix(spec, info.tensors)
            if needing:
                raise UserError(f"{spec.name} needs an importance matrix (llama.cpp refuses {needing[0]} without "
                                f"one); {imatrix_help(source_path, folder / mmproj.path if mmproj else None)}")
    elif str(imatrix) != IMATRIX_AUTO:
        from convert.imatrix import check_imatrix_matches, read_imatrix

        check_imatrix_matches(read_imatrix(imatrix), source_path)
    todo: list[QuantSpec] = []
    results: dict[str, QuantResult] = {}
    pending_inputs = {}
    for spec in specs:
        path = quant_path(folder, manifest.model, spec)
        if path.resolve() == source_path.resolve():
            results[spec.name] = read_back(path, spec.name, None)
            results[spec.name].skipped = True
            continue
        row = next((r for r in manifest.files if r.path == path.name), None)
        if path.exists() and not force:
            if row is None or row.role != "text":
                raise UserError(f"{path} exists but the manifest does not record it; pass --force to rebuild it")
            pending_inputs[spec.name] = row
        todo.append(spec)

    imatrix_data, imatrix_path = _resolve_imatrix(folder, manifest, imatrix, source, mmproj, calibration, force,
                                                  progress, n_threads)
    for spec in todo:
        path = quant_path(folder, manifest.model, spec)
        inputs = _inputs(source, spec, imatrix_path)
        row = pending_inputs.get(spec.name)
        if row is not None:
            if row.extra.get("inputs") != inputs or sha256_of(path) != row.sha256:
                raise UserError(f"{path.name} was built from other inputs (source, recipe or imatrix) or changed "
                                "since; pass --force to rebuild it")
            result = read_back(path, spec.name, plans.get(spec.name))
            result.fallbacks = [Fallback(**f) for f in row.extra.get("fallbacks", [])] or result.fallbacks
            result.skipped = True
            results[spec.name] = result
            if progress:
                log.info("%s is up to date; skipped", path.name)
            continue
        result = quantize_file(source_path, path, spec, imatrix=imatrix_data,
                               imatrix_name=imatrix_path.name if imatrix_path else None, force=True,
                               n_threads=n_threads, progress=progress)
        result.imatrix = imatrix_path
        manifest.upsert(entry_for(
            folder, path, "text", spec.name, bits_per_weight=round(result.bpw, 4),
            tensor_types=result.tensor_type_counts, inputs=inputs, recipe=spec.recipe.name if spec.recipe else None,
            imatrix=imatrix_path.name if imatrix_path else None, mmproj=mmproj.path if mmproj else None,
            fallbacks=[f.__dict__ for f in result.fallbacks], quantizer=_quantizer_version(),
            **(row_extra or {}).get(spec.name, {})))
        manifest.save(folder)
        results[spec.name] = result
    write_model_card(folder, manifest)
    return [results[spec.name] for spec in specs]


def _quantizer_version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


# --- AUTO: a recipe chosen from measured sensitivity ----------------------------------------------------
AUTO_PREFIX = "AUTO"


@dataclass
class AutoResult:
    """An AUTO quant: the file, its recipe file and how the mix was chosen."""

    result: QuantResult
    recipe_path: Path
    mix: Any  # convert.auto_quant.QuantMix
    sensitivity: Any  # convert.sensitivity.SensitivityResult
    how: dict[str, Any]


def auto_quantize_folder(outdir: Path | str, *, target_size: str | None = None, target_bpw: float | None = None,
                         vram: str | None = None, ctx: int | None = None, imatrix: str | Path | None = None,
                         sensitivity_method: str = "proxy", cache_dir: Path | str | None = None,
                         candidates: Sequence[str] | None = None, probes: Sequence[str] | None = None,
                         max_text: int | None = None,
                         max_images: int | None = None, calibration: Any | None = None, force: bool = False,
                         progress: bool = True, n_threads: int | None = None) -> AutoResult:
    """``quantize OUTDIR --target-bpw/--target-size/--vram``: measure (or reuse) the sensitivity table, choose
    the mix under the budget, write it as ``<model>-AUTO-<bpw>.toml`` and quantize it through the recipe
    engine to ``<model>-AUTO-<bpw>.gguf`` (``<bpw>``: the mix's bits per weight, 2 decimals)."""
    from convert.auto_quant import allocate, mix_to_recipe_toml, model_facts, parse_budget
    from convert.recipe import parse_recipe
    from convert.sensitivity import DEFAULT_CANDIDATES, DEFAULT_PROBES, measure_sensitivity
    from medgemma_gguf.atomic import write_text_atomic
    from medgemma_gguf.manifest import Manifest

    folder = Path(outdir)
    manifest = Manifest.load(folder)
    source = source_entry(folder, manifest)
    source_path = folder / source.path
    mmproj = _mmproj_entry(folder, manifest)
    mmproj_path = folder / mmproj.path if mmproj else None
    budget = parse_budget(target_size, target_bpw, vram, ctx, mmproj_path)  # bad options fail before any work
    _, imatrix_path = _resolve_imatrix(folder, manifest, imatrix, source, mmproj, calibration, force, progress,
                                       n_threads)
    sensitivity = measure_sensitivity(
        source_path, mmproj_path, imatrix_path, method=sensitivity_method,
        candidates=tuple(candidates) if candidates else DEFAULT_CANDIDATES,
        probes=tuple(probes) if probes else DEFAULT_PROBES,
        calibration=calibration, max_text=max_text,
        max_images=max_images, cache_dir=cache_dir, n_threads=n_threads, progress=progress)
    table = sensitivity.table
    facts = model_facts(source_path, table)
    capacity = budget.capacity(table, facts)
    mix = allocate(table, capacity)
    bpw = 8 * mix.total_bytes / sum(g.n_elements for g in table.groups)
    name = f"{AUTO_PREFIX}-{bpw:.2f}"
    text = mix_to_recipe_toml(mix, name, description=f"Chosen by medgemma-gguf from measured sensitivity "
                                                       f"({sensitivity.meta['method']}); {mix.summary()}")
    recipe_path = folder / f"{manifest.model}-{name}.toml"
    parse_recipe(text, str(recipe_path))  # the written recipe must read back as a recipe
    created = False
    if recipe_path.exists():
        if recipe_path.read_text(encoding="utf-8") != text:
            if not force:
                raise UserError(f"{recipe_path} exists with another mix; pass --force to replace it")
            write_text_atomic(recipe_path, text)
    else:
        write_text_atomic(recipe_path, text)
        created = True
    how = {"budget": capacity.label, "budget_used": capacity.user_value(mix.counted_bytes),
           "predicted_delta_kl": mix.predicted_delta_kl, "allocator": mix.method,
           "sensitivity_method": sensitivity.meta["method"], "sensitivity_candidates": sensitivity.meta["candidates"],
           "sensitivity_probes": sensitivity.meta["probes"],
           "sensitivity_cache": str(sensitivity.cache_path) if sensitivity.cache_path else None,
           "sensitivity_cost": sensitivity.cost, "recipe_file": recipe_path.name}
    try:
        [result] = quantize_folder(folder, [], imatrix=str(imatrix_path) if imatrix_path else None,
                                   recipe_files=[recipe_path], force=force, progress=progress, n_threads=n_threads,
                                   row_extra={name: {"auto": how}})
    except BaseException:
        if created:
            recipe_path.unlink(missing_ok=True)
        raise
    limit = getattr(budget, "total_bytes", None)
    if limit is not None and result.bytes > limit:
        log.warning("%s is %d bytes, %d over the budget: the header estimate was short", result.path.name,
                    result.bytes, result.bytes - limit)
    return AutoResult(result=result, recipe_path=recipe_path, mix=mix, sensitivity=sensitivity, how=how)
