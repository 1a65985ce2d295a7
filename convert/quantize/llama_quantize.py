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
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from medgemma_gguf.atomic import atomic_output
from medgemma_gguf.convert.quantize.recipe import (
    QuantPlan,
    Recipe,
    TensorSpec,
    builtin_recipe,
    builtin_recipe_names,
    is_quantizable,
    plan_recipe,
)
from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import bits_per_weight, read_gguf_info
from medgemma_gguf.quant_types import (
    FILE_TYPE,
    FILE_TYPES,
    GGML_IMATRIX_TYPES,
    IMATRIX_EXEMPT_TENSORS,
    LLAMA_IMATRIX_TYPES,
    recipe_file_type,
)

log = logging.getLogger(__name__)
T = GGMLQuantizationType

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
    return [*(row.name for row in FILE_TYPES), *builtin_recipe_names()]


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
    by_upper = {row.name.upper(): row.name for row in FILE_TYPES}
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
            spec = QuantSpec(by_upper[key], ftype=FILE_TYPE[by_upper[key]].ftype)
        elif key in user:
            spec = QuantSpec(user[key].name, recipe=user[key])
        elif key in builtin:
            spec = QuantSpec(builtin[key], recipe=builtin_recipe(builtin[key]))
        else:
            known = valid_quant_names() + [r.name for r in recipes]
            raise UserError(f"unknown quant type {name!r}; valid: {', '.join(known)} (or {setting('recipe')} "
                            f"FILE.toml)")
        if spec.name not in [s.name for s in specs]:
            specs.append(spec)
    for recipe in recipes:
        if recipe.name not in [s.name for s in specs]:
            specs.append(QuantSpec(recipe.name, recipe=recipe))
    return specs


def medgemma_4b_tensors() -> list[TensorSpec]:
    """The quantizable tensors of MedGemma 4B's text model (34 layers, width 2560, 8 query and 4 key/value heads
    of 256, feed-forward 10240, the 262,208-row vocabulary tied to the output), in ggml shape order."""
    width, heads, kv_heads, head, ff, vocab = 2560, 8, 4, 256, 10240, 262208
    tensors = [TensorSpec("token_embd.weight", (width, vocab))]
    for i in range(34):
        tensors += [TensorSpec(f"blk.{i}.attn_q.weight", (width, heads * head)),
                    TensorSpec(f"blk.{i}.attn_k.weight", (width, kv_heads * head)),
                    TensorSpec(f"blk.{i}.attn_v.weight", (width, kv_heads * head)),
                    TensorSpec(f"blk.{i}.attn_output.weight", (heads * head, width)),
                    TensorSpec(f"blk.{i}.ffn_gate.weight", (width, ff)),
                    TensorSpec(f"blk.{i}.ffn_up.weight", (width, ff)),
                    TensorSpec(f"blk.{i}.ffn_down.weight", (ff, width))]
    return tensors


@dataclass(frozen=True)
class QuantListing:
    """One row of ``quantize --list``."""

    name: str
    kind: str  # "llama.cpp" (a standard mix) or "recipe"
    bits: float
    exact: bool  # bits computed for the model's tensors (recipes); else the mix's main type's bits
    needs_imatrix: bool
    description: str


def quant_listing(tensors: Sequence[Any] | None = None) -> list[QuantListing]:
    """Every name ``--quants`` accepts with its bits per weight and whether it needs an importance matrix.

    Recipes are planned on ``tensors`` (default: MedGemma 4B's, ``medgemma_4b_tensors``), so their bits per
    weight are exact for that model; llama.cpp's own mixes are decided by llama.cpp tensor by tensor, so
    their main type's bits are shown (k-quant mixes keep some tensors at more bits)."""
    from medgemma_gguf.quant_types import TENSOR_TYPE

    tensors = list(tensors) if tensors is not None else medgemma_4b_tensors()
    rows = [QuantListing(row.name, "llama.cpp", TENSOR_TYPE[row.default].bits, False, row.needs_imatrix,
                         row.description) for row in FILE_TYPES]
    for name in builtin_recipe_names():
        recipe = builtin_recipe(name)
        plan = plan_recipe(recipe, tensors)
        sizes = {t.name: math.prod(t.shape) for t in tensors}
        weights = sum(sizes[n] for n in plan.types)
        bits = sum(TENSOR_TYPE[q].bits * sizes[n] for n, q in plan.types.items()) / weights
        rows.append(QuantListing(name, "recipe", bits, True, bool(needs_imatrix(QuantSpec(name, recipe=recipe),
                                                                                tensors)), recipe.description))
    return rows


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
                if qtype in LLAMA_IMATRIX_TYPES and name not in IMATRIX_EXEMPT_TENSORS
                and _row_fits(qtype, shapes[name])]
    default = FILE_TYPE[spec.name].default
    if not FILE_TYPE[spec.name].needs_imatrix:
        return []
    return [t.name for t in tensors if is_quantizable(t.name, t.shape) and t.name not in IMATRIX_EXEMPT_TENSORS
            and _row_fits(default, t.shape)]


def may_need_imatrix(spec: QuantSpec) -> bool:
    """Whether ``spec`` asks for an imatrix type anywhere, before the model's shapes are known."""
    if spec.recipe is not None:
        return spec.recipe.base in LLAMA_IMATRIX_TYPES or any(rule.type in LLAMA_IMATRIX_TYPES
                                                              for rule in spec.recipe.rules)
    return FILE_TYPE[spec.name].needs_imatrix


def imatrix_help(source: Path, mmproj: Path | None) -> str:
    """How to make an imatrix for ``source``: the command line to run."""
    folder = source.parent
    mm = f" --mmproj {mmproj}" if mmproj else ""
    return (f"pass {setting('imatrix')} auto to compute one, or run `medgemma-gguf imatrix {source}{mm} -o "
            f"{folder / 'imatrix.gguf'}` and pass {setting('imatrix')} {folder / 'imatrix.gguf'}")


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
        from medgemma_gguf.runtime.llama_log import restore_llama_log_routing

        restore_llama_log_routing()


def _kv_override(key: str, value: str | int) -> Any:
    import llama_cpp

    entry: Any = llama_cpp.llama_model_kv_override()
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
                  progress: bool = True,
                  on_written: Callable[[Path, QuantResult], Any] | None = None) -> QuantResult:
    """Quantize ``source`` (an unquantized text GGUF) to ``output`` as ``spec``; written atomically.

    Refuses, before writing anything, an imatrix type without ``imatrix`` and an imatrix that does not
    match the model. ``on_written(temporary_path, result)`` runs once the file is complete and before it
    is renamed to ``output`` (to record it in the manifest first: ``medgemma_gguf.integrity``).
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
        from medgemma_gguf.convert.quantize.imatrix import check_imatrix_matches

        check_imatrix_matches(imatrix, source)
    if plan is not None:
        shapes = {t.name: t.shape for t in info.tensors}
        covered = set(imatrix.tensor_names) if imatrix is not None else set()
        bare = [name for name, qtype in plan.types.items() if qtype in GGML_IMATRIX_TYPES and name not in covered
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
        ftype, overrides = FILE_TYPE[spec.name].ftype, []
    bar = tqdm(desc=output.name, unit="tensor", disable=not progress, total=len(info.tensors))
    try:
        with atomic_output(output, force=force) as tmp:
            text = run_llama_quantize(source, tmp, ftype, imatrix=imatrix, overrides=overrides, metadata=metadata,
                                      n_threads=n_threads, progress=bar)
            result = read_back(tmp, spec.name, plan, text)
            result.path = output
            if on_written is not None:
                on_written(tmp, result)
    finally:
        bar.close()
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
    if base not in (T.F32, T.F16, T.BF16):
        return int(recipe_file_type(base))
    metadata["general.file_type"] = int(recipe_file_type(base))
    return int(recipe_file_type(T.Q8_0))
