"""Quantize an output folder: every requested type or recipe from its unquantized text GGUF, the importance
matrix (``--imatrix auto``: computed once, reused), AUTO mixes chosen from measured sensitivity, manifest
rows and the model card.

* The importance matrix: ``imatrix_choice`` is the one policy every command follows — an explicit file,
  ``auto`` (computed once on the bundled calibration set, reused while the source and calibration set are
  unchanged) or ``none``; by default the folder's own (``folder_default_imatrix``: the one the manifest
  records for the source model), for every type and recipe, said in the output. It is saved as
  ``<model>.imatrix`` (llama.cpp's GGUF imatrix format inside; llama.cpp's tools read the format from the
  content), so globs of models (``*.gguf``: LM Studio, llama.cpp's ``-hf``, Ollama's folder import) do not
  take it for a model.

* AUTO (``auto_quantize_folder``, ``quantize --target-bpw/--target-size/--vram``): a recipe chosen by
  ``convert.quantize.auto`` from the sensitivity table of ``convert.quantize.sensitivity``, written as
  ``<model>-AUTO-<bpw>.toml`` beside ``<model>-AUTO-<bpw>.gguf`` and quantized like any other recipe; the
  manifest row's ``auto`` field records the budget, predicted KL, method and sensitivity cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.convert.quantize.auto import (
    allocate,
    check_budget,
    feasible_range,
    mix_to_recipe_toml,
    model_facts,
    parse_budget,
)
from medgemma_gguf.convert.quantize.imatrix import (
    calibration_description,
    check_imatrix_matches,
    compute_imatrix,
    read_imatrix,
    write_imatrix_gguf,
)
from medgemma_gguf.convert.quantize.llama_quantize import (
    Fallback,
    QuantResult,
    QuantSpec,
    imatrix_help,
    needs_imatrix,
    parse_quant_list,
    quantize_file,
    read_back,
    resolve_quants,
    valid_quant_names,
)
from medgemma_gguf.convert.quantize.model_card import write_model_card
from medgemma_gguf.convert.quantize.recipe import load_recipe, parse_recipe, plan_recipe
from medgemma_gguf.convert.quantize.sensitivity import (
    SensitivityJob,
    SensitivityOptions,
    SensitivityResult,
    plan_sensitivity,
)
from medgemma_gguf.errors import UserError, render, setting
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.gguf_split import same_model_file, split_gguf, split_size
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.integrity import open_manifest
from medgemma_gguf.manifest import entry_for
from medgemma_gguf.quant_types import UNQUANTIZED_PRECISION

log = logging.getLogger(__name__)


# --- an output folder -----------------------------------------------------------------------------------
IMATRIX_AUTO = "auto"
IMATRIX_NONE = "none"
IMATRIX_SUFFIX = ".imatrix"


def imatrix_file(folder: Path, model: str) -> Path:
    """Where ``--imatrix auto`` saves the folder's importance matrix: ``<model>.imatrix`` (GGUF inside)."""
    return Path(folder) / f"{model}{IMATRIX_SUFFIX}"


def source_entry(folder: Path, manifest: Any) -> Any:
    """The folder's highest-precision unquantized text GGUF (F32, then BF16, then F16) from its manifest."""
    rows = [row for row in manifest.present(folder, "text") if row.type.upper() in UNQUANTIZED_PRECISION]
    if not rows:
        raise UserError(f"{folder} has no unquantized (F32/BF16/F16) text GGUF in its manifest; run "
                        f"`medgemma-gguf convert SOURCE --outdir {folder}` first")
    return min(rows, key=lambda row: UNQUANTIZED_PRECISION.index(row.type.upper()))


def _mmproj_entry(folder: Path, manifest: Any) -> Any | None:
    rows = manifest.mmprojs(folder)
    return rows[0] if rows else None


def quant_path(folder: Path, model: str, spec: QuantSpec) -> Path:
    """``<model>-<TYPE>.gguf`` in ``folder``."""
    return Path(folder) / f"{model}-{spec.name}.gguf"


def _computed_row(folder: Path, manifest: Any, source: Any, calibration_sha256: str | None = None) -> Any | None:
    """The manifest row of an imatrix ``--imatrix auto`` computed for ``source`` (and this calibration set, when
    given) whose file is still there, under its current or an earlier name; None."""
    rows = [row for row in manifest.present(folder, "imatrix") if row.source_sha256 == source.sha256
            and row.calibration_sha256 and (calibration_sha256 is None or row.calibration_sha256 == calibration_sha256)]
    return rows[-1] if rows else None


def _resolve_imatrix(folder: Path, manifest: Any, imatrix: str | Path | None, source: Any, mmproj: Any | None,
                     calibration: Any | None, force: bool, progress: bool, n_threads: int | None,
                     max_chunks: int | None = None) -> tuple[Any | None, Path | None]:
    """(Imatrix, file) for a resolved choice (``imatrix_choice``): None, a file, or ``auto`` (computed once into
    the folder on the first ``max_chunks`` chunks of the calibration set — None: all —, reused)."""
    if imatrix is None or str(imatrix) == IMATRIX_NONE:
        return None, None
    if str(imatrix) != IMATRIX_AUTO:
        path = Path(imatrix)
        return read_imatrix(path), path
    path = imatrix_file(folder, manifest.model)
    described = calibration_description(calibration)
    row = None if force else _computed_row(folder, manifest, source, described["sha256"])
    if row is not None and sha256_of(folder / row.path) == row.sha256:
        log.info("reusing %s", row.path)
        return read_imatrix(folder / row.path), folder / row.path
    if path.exists() and not force:
        raise UserError(f"{path} exists but the manifest does not record it for {source.path} and this "
                        f"calibration set; pass {setting('force')} to recompute it")
    computed = compute_imatrix(folder / source.path, folder / mmproj.path if mmproj else None,
                               calibration=calibration, max_chunks=max_chunks, progress=progress, n_threads=n_threads)

    def record(temporary: Path) -> None:  # the row is saved before the file gets its name (integrity)
        manifest.upsert(entry_for(folder, temporary, "imatrix", "F32", stored_as=path, source=source.path,
                                  source_sha256=source.sha256, calibration_sha256=described["sha256"],
                                  calibration=computed.calibration, chunks=computed.chunk_count,
                                  chunk_size=computed.chunk_size))
        manifest.save(folder)

    write_imatrix_gguf(computed, path, force=True, on_written=record)
    return computed, path


def _inputs(source: Any, spec: QuantSpec, imatrix_path: Path | None) -> dict[str, Any]:
    """What a quant file is built from: a rebuild is skipped only while these and its sha256 are unchanged."""
    return {"source": source.path, "source_sha256": source.sha256, "quant": spec.name,
            "recipe_sha256": spec.recipe.sha256 if spec.recipe else None,
            "imatrix_sha256": sha256_of(imatrix_path) if imatrix_path else None}


def quantize_folder(outdir: Path | str, quants: str | Sequence[str] | None, *, imatrix: str | Path | None = None,
                    recipe_files: Sequence[Path | str] = (), force: bool = False, progress: bool = True,
                    n_threads: int | None = None, calibration: Any | None = None,
                    row_extra: dict[str, dict[str, Any]] | None = None, recipes: Sequence[Any] = (),
                    report: Callable[[str], Any] | None = None,
                    split_max_size: int | None = None, imatrix_chunks: int | None = None) -> list[QuantResult]:
    """Quantize the folder's unquantized text GGUF to each of ``quants`` (+ each recipe file's recipe).

    Outputs are ``<model>-<TYPE>.gguf`` beside it, recorded in ``manifest.json`` (role, type, bytes, bpw,
    sha256, per-tensor type counts, fallbacks, inputs) and described in a generated ``README.md``.
    ``imatrix`` (``imatrix_choice``): None — the folder's importance matrix, when it has one for the source
    model; an imatrix file; ``"auto"`` (computed on ``calibration`` — default the bundled set — into
    ``<model>.imatrix`` once and reused; ``imatrix_chunks``: only the first that many chunks of 512 positions,
    None: all); ``"none"``. ``report`` gets a line saying which matrix is used
    (settings marked for ``errors.render``).
    A quant whose file still matches its manifest row and inputs is skipped; ``force`` rebuilds. Every
    request is checked before any file is written. ``row_extra``: more manifest fields per quant name (how
    an AUTO recipe was chosen). ``recipes``: parsed recipes, built like ``recipe_files``. Each file's manifest
    row is saved before the file is renamed into place, and the folder is recovered from killed runs first
    (``medgemma_gguf.integrity``). ``split_max_size``: parts of at most that many bytes in llama.cpp's split
    format (``medgemma_gguf.gguf_split``: None = its default rule, 45 GB parts for files over 49 GB; 0 = never).
    """
    check_imatrix_chunks(imatrix_chunks)
    folder = Path(outdir)
    manifest = open_manifest(folder)
    recipes = [*(load_recipe(path) for path in recipe_files), *recipes]
    specs = resolve_quants(parse_quant_list(quants), recipes)
    if not specs:
        raise UserError(f"no quant types given; pass {setting('quants')} with some of: "
                        f"{', '.join(valid_quant_names())}")
    source = source_entry(folder, manifest)
    source_path = folder / source.path
    mmproj = _mmproj_entry(folder, manifest)
    info = read_gguf_info(source_path)
    plans = {spec.name: plan_recipe(spec.recipe, info.tensors) for spec in specs if spec.recipe}
    imatrix, note = imatrix_choice(folder, manifest, source, imatrix)
    if imatrix is None:
        for spec in specs:
            needing = needs_imatrix(spec, info.tensors)
            if needing:
                raise UserError(f"{spec.name} needs an importance matrix (llama.cpp refuses {needing[0]} without "
                                f"one; {note}); {imatrix_help(source_path, folder / mmproj.path if mmproj else None)}")
    elif str(imatrix) != IMATRIX_AUTO:
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
        row = next((r for r in manifest.files if same_model_file(r.path, path.name)), None)
        if (path.exists() or (row is not None and (folder / row.path).exists())) and not force:
            if row is None or row.role != "text":
                raise UserError(f"{path} exists but the manifest does not record it; pass {setting('force')} to "
                                "rebuild it")
            pending_inputs[spec.name] = row
        todo.append(spec)

    if report is not None:
        report(f"importance matrix: {note}")
    imatrix_data, imatrix_path = _resolve_imatrix(folder, manifest, imatrix, source, mmproj, calibration, force,
                                                  progress, n_threads, imatrix_chunks)
    for spec in todo:
        path = quant_path(folder, manifest.model, spec)
        inputs = _inputs(source, spec, imatrix_path)
        row = pending_inputs.get(spec.name)
        if row is not None:
            if row.inputs != inputs or sha256_of(folder / row.path) != row.sha256:
                raise UserError(f"{row.path} was built from other inputs (source, recipe or imatrix) or changed "
                                f"since; pass {setting('force')} to rebuild it")
            result = read_back(folder / row.path, spec.name, plans.get(spec.name))
            result.fallbacks = [Fallback(**f) for f in row.fallbacks] or result.fallbacks
            result.skipped = True
            results[spec.name] = result
            if progress:
                log.info("%s is up to date; skipped", path.name)
            continue
        def record(temporary: Path, result: QuantResult, spec: QuantSpec = spec, path: Path = path,
                   inputs: dict[str, Any] = inputs) -> None:  # saved before the file gets its name (integrity)
            manifest.upsert(entry_for(
                folder, temporary, "text", spec.name, stored_as=path, bits_per_weight=round(result.bpw, 4),
                tensor_types=result.tensor_type_counts, inputs=inputs,
                recipe=spec.recipe.name if spec.recipe else None,
                imatrix=imatrix_path.name if imatrix_path else None, mmproj=mmproj.path if mmproj else None,
                fallbacks=[f.__dict__ for f in result.fallbacks], quantizer=_quantizer_version(),
                **(row_extra or {}).get(spec.name, {})))
            manifest.save(folder)

        result = quantize_file(source_path, path, spec, imatrix=imatrix_data,
                               imatrix_name=imatrix_path.name if imatrix_path else None, force=True,
                               n_threads=n_threads, progress=progress, on_written=record)
        result.imatrix = imatrix_path
        part_size = split_size(result.bytes, split_max_size)
        parts = split_gguf(path, part_size, force=True) if part_size else [path]
        if len(parts) > 1:  # the row recorded for the whole file now describes its parts
            result.path, result.bytes = parts[0], sum(part.stat().st_size for part in parts)
            whole = next(r for r in manifest.files if r.path == path.name)
            split = entry_for(folder, parts[0], "text", spec.name, parts=parts)
            manifest.files.remove(whole)
            manifest.upsert(replace(whole, path=split.path, bytes=split.bytes, sha256=split.sha256, parts=split.parts))
        for stale in [r for r in manifest.files if same_model_file(r.path, path.name)
                      and r.path != parts[0].name]:  # the other layout's row and files, from an earlier run
            for name in stale.part_paths:
                if folder / name not in parts:
                    (folder / name).unlink(missing_ok=True)
            manifest.files.remove(stale)
        manifest.save(folder)
        results[spec.name] = result
    write_model_card(folder, manifest)
    return [results[spec.name] for spec in specs]


def _quantizer_version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


# --- the folder's importance matrix -----------------------------------------------------------------------
def folder_default_imatrix(folder: Path, manifest: Any, source: Any) -> Path | None:
    """Which importance matrix a folder uses by default: the imatrix the manifest records for ``source`` (same
    sha256) whose file is still there, the latest such row; None when there is none."""
    rows = [row for row in manifest.present(folder, "imatrix") if row.source_sha256 == source.sha256]
    return Path(folder) / rows[-1].path if rows else None


def imatrix_choice(folder: Path, manifest: Any, source: Any, requested: str | Path | None
                   ) -> tuple[str | Path | None, str]:
    """THE policy for the importance matrix of ``quantize``, recipes and AUTO: ``(choice, note)``, the choice a
    file, ``IMATRIX_AUTO`` or None, and a line saying what is used and how to change it.

    ``requested``: None (the default: the folder's matrix, ``folder_default_imatrix``), ``"none"``
    (``--no-imatrix``), ``"auto"`` (compute one, or reuse the one computed before), or a file. AUTO asks for
    one to be computed when the default finds none (``plan_auto``).
    """
    if requested is None:
        found = folder_default_imatrix(folder, manifest, source)
        if found is not None:
            return found, (f"{found.name}, the folder's (computed for {source.path}); used by default for every type "
                           f"and recipe — {setting('no_imatrix')} to quantize without it")
        return None, (f"none ({folder} has no importance matrix for {source.path}; {setting('imatrix')} auto "
                      "computes one)")
    if str(requested) == IMATRIX_NONE:
        return None, f"none ({setting('no_imatrix')})"
    if str(requested) == IMATRIX_AUTO:
        return IMATRIX_AUTO, (f"{imatrix_file(folder, manifest.model).name}, computed on the bundled calibration set "
                              "(reused while the model and calibration set are unchanged)")
    return requested, f"{Path(requested).name} (given)"


# --- AUTO: a recipe chosen from measured sensitivity ----------------------------------------------------
AUTO_PREFIX = "AUTO"
AUTO_IMATRIX_CHUNKS = 6
"""Chunks of 512 positions of the calibration set the importance matrix is computed on when AUTO computes it
(about 3,000 of the bundled set's 10,300 positions: a third of the time on MedGemma 4B's widths; on the trained
fixture AUTO and the baselines from it kept their KL, BENCHMARKS.md). ``AutoRequest.imatrix_chunks`` /
``--imatrix-chunks`` choose more (None / 0: all)."""


def check_imatrix_chunks(value: int | None) -> None:
    """UserError unless ``value`` is None (every chunk) or a whole number of at least 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{setting('imatrix_chunks')} must be a whole number of at least 1 (chunks of 512 "
                        f"positions of the calibration set), got {value!r}")


@dataclass(frozen=True)
class AutoRequest:
    """What ``quantize --target-…`` asks for: one budget — ``target_size`` (e.g. "2.6GB"), ``target_bpw``, or
    ``vram`` with ``ctx`` (checked against the folder by ``auto.parse_budget``) —, the importance matrix
    (``imatrix``: a file, ``"auto"`` to compute one into the folder or reuse the one computed before,
    ``"none"``: the types that need one are not candidates, or None: the folder's matrix,
    ``folder_default_imatrix``, else one is computed), the chunks of 512 calibration positions a matrix computed
    here reads (``imatrix_chunks``: default ``AUTO_IMATRIX_CHUNKS``; None: all) and how sensitivity is measured
    (``sensitivity``, ``SensitivityOptions``; its ``calibration``, ``force`` and ``n_threads`` are the whole
    request's: the importance matrix and the quant use them too)."""

    target_size: str | None = None
    target_bpw: float | None = None
    vram: str | None = None
    ctx: int | None = None
    imatrix: str | Path | None = None
    sensitivity: SensitivityOptions = field(default_factory=SensitivityOptions)
    imatrix_chunks: int | None = AUTO_IMATRIX_CHUNKS

    def __post_init__(self) -> None:
        check_imatrix_chunks(self.imatrix_chunks)


@dataclass
class AutoPlan:
    """What ``quantize --target-…`` will do, known before any work: the budget (checked against the feasible
    range), where the importance matrix comes from, and the sensitivity job with its plan and estimate."""

    folder: Path
    manifest: Any
    source: Any
    mmproj: Any | None
    budget: Any
    capacity: Any
    imatrix: str | Path | None  # a file, IMATRIX_AUTO (compute it first) or None
    imatrix_note: str
    job: SensitivityJob
    feasible: tuple[str, str]

    def lines(self, interface: str = "python") -> list[str]:
        """The plan as printed before any work, settings worded for ``interface`` (``errors.render``)."""
        low, high = self.feasible
        return [f"AUTO: {self.capacity.label} (feasible {low} .. {high})",
                f"  importance matrix: {render(self.imatrix_note, interface)}", *self.job.plan.lines()]


@dataclass
class AutoResult:
    """An AUTO quant: the file, its recipe file and how the mix was chosen."""

    result: QuantResult
    recipe_path: Path
    mix: Any  # convert.auto_quant.QuantMix
    sensitivity: SensitivityResult
    how: dict[str, Any]
    plan: AutoPlan | None = None


def plan_auto(outdir: Path | str, request: AutoRequest, *, timing: Any = True) -> AutoPlan:
    """Check an AUTO ``request`` and plan it without doing the work: bad options and a budget outside the
    feasible range fail here, before anything is hashed, timed, computed or written (the budget is checked
    against the layout read from the GGUF's header). ``timing``: as ``plan_sensitivity``'s."""
    folder = Path(outdir)
    manifest = open_manifest(folder)
    source = source_entry(folder, manifest)
    source_path = folder / source.path
    mmproj = _mmproj_entry(folder, manifest)
    mmproj_path = folder / mmproj.path if mmproj else None
    # bad options fail before any work
    budget = parse_budget(request.target_size, request.target_bpw, request.vram, request.ctx, mmproj_path)
    requested = request.imatrix
    imatrix, note = imatrix_choice(folder, manifest, source, requested)
    if imatrix is None and requested is None:  # AUTO's own step: a matrix is computed when the folder has none
        imatrix = IMATRIX_AUTO
        chunks = (f"the first {request.imatrix_chunks} chunks of 512 positions of" if request.imatrix_chunks
                  else "all of")
        note = (f"none in {folder} for {source.path}: computing {imatrix_file(folder, manifest.model).name} on "
                f"{chunks} the calibration set first ({setting('imatrix_chunks')} for more)")
    elif imatrix is None:
        note += "; types that need one are not candidates"
    pending = str(imatrix) == IMATRIX_AUTO
    computed = _computed_row(folder, manifest, source)
    if pending and not request.sensitivity.force and computed is not None:
        imatrix, pending = folder / computed.path, False  # "auto" with a matrix computed before: reuse it
    checked: list[Any] = []

    def check(layout: Any) -> None:  # from the header, before any hashing, cache look-up or timing
        capacity = budget.capacity(layout, model_facts(source_path, layout))
        check_budget(layout, capacity)
        checked[:] = [layout, capacity]

    job = plan_sensitivity(source_path, mmproj_path, None if pending else imatrix, request.sensitivity,
                           imatrix_pending=pending, imatrix_chunks=request.imatrix_chunks, timing=timing, check=check)
    layout, capacity = checked
    low, high = feasible_range(layout, capacity)
    return AutoPlan(folder=folder, manifest=manifest, source=source, mmproj=mmproj, budget=budget, capacity=capacity,
                    imatrix=imatrix, imatrix_note=note, job=job,
                    feasible=(capacity.user_value(low), capacity.user_value(high)))


def auto_quantize_folder(outdir: Path | str, request: AutoRequest, *, progress: bool = True,
                         report: Callable[[str], Any] | None = None) -> AutoResult:
    """``quantize OUTDIR --target-bpw/--target-size/--vram``: plan ``request`` (``plan_auto``; ``report`` gets
    its lines before any work), make the importance matrix if needed, measure (or reuse) the sensitivity table,
    choose the mix under the budget, write it as ``<model>-AUTO-<bpw>.toml`` and quantize it through the recipe
    engine to ``<model>-AUTO-<bpw>.gguf`` (``<bpw>``: the mix's bits per weight, 2 decimals)."""
    options = request.sensitivity
    force, n_threads = options.force, options.n_threads
    plan = plan_auto(outdir, request, timing=report is not None)
    if report is not None:
        for line in plan.lines("cli"):
            report(line)
    folder, manifest, source, mmproj = plan.folder, plan.manifest, plan.source, plan.mmproj
    source_path = folder / source.path
    mmproj_path = folder / mmproj.path if mmproj else None
    _, imatrix_path = _resolve_imatrix(folder, manifest, plan.imatrix, source, mmproj, options.calibration, force,
                                       progress, n_threads, request.imatrix_chunks)
    job = plan.job
    if job.imatrix_pending:  # plan again with the matrix that now exists: its hash keys the caches
        job = plan_sensitivity(source_path, mmproj_path, imatrix_path, options, timing=job.timing or False)
        if report is not None:
            report(f"  importance matrix ready: {imatrix_path.name if imatrix_path else 'none'}")
    sensitivity = job.run(progress)
    table = sensitivity.table
    facts = model_facts(source_path, table)
    capacity = plan.budget.capacity(table, facts)
    mix = allocate(table, capacity)
    bpw = 8 * mix.total_bytes / sum(g.n_elements for g in table.groups)
    name = f"{AUTO_PREFIX}-{bpw:.2f}"
    text = mix_to_recipe_toml(mix, name, description=f"Chosen by medgemma-gguf from measured sensitivity "
                                                       f"({sensitivity.meta['method']}); {mix.summary()}")
    recipe_path = folder / f"{manifest.model}-{name}.toml"
    recipe = parse_recipe(text, str(recipe_path))  # the written recipe must read back as a recipe
    if recipe_path.exists() and recipe_path.read_text(encoding="utf-8") != text and not force:
        raise UserError(f"{recipe_path} exists with another mix; pass {setting('force')} to replace it")
    how = {"budget": capacity.label, "budget_used": capacity.user_value(mix.counted_bytes),
           "predicted_delta_kl": mix.predicted_delta_kl, "allocator": mix.method,
           "sensitivity_method": sensitivity.meta["method"], "sensitivity_candidates": sensitivity.meta["candidates"],
           "sensitivity_probes": sensitivity.meta["probes"],
           "sensitivity_cache": str(sensitivity.cache_path) if sensitivity.cache_path else None,
           "sensitivity_cost": sensitivity.cost, "recipe_file": recipe_path.name,
           "imatrix": imatrix_path.name if imatrix_path else None}
    [result] = quantize_folder(folder, [], imatrix=str(imatrix_path) if imatrix_path else IMATRIX_NONE,
                               recipes=[recipe], force=force, progress=progress, n_threads=n_threads,
                               row_extra={name: {"auto": how}})
    # the recipe file is written once the quant and its row (which names it) are in place, so a killed run
    # never leaves a recipe no row describes; a rerun finds the quant up to date and writes it then
    if not recipe_path.exists() or recipe_path.read_text(encoding="utf-8") != text:
        write_text_atomic(recipe_path, text)
    limit = getattr(plan.budget, "total_bytes", None)
    if limit is not None and result.bytes > limit:
        log.warning("%s is %d bytes, %d over the budget: the header estimate was short", result.path.name,
                    result.bytes, result.bytes - limit)
    return AutoResult(result=result, recipe_path=recipe_path, mix=mix, sensitivity=sensitivity, how=how, plan=plan)
