"""Pick a quant (text GGUF + mmproj) from a folder, and check that a pair belongs together.

Folders: this project's output folders (``manifest.json``) and any folder of GGUFs without one (as
Unsloth, bartowski and ggml-org publish them, or as ``pull`` downloads them): ``Manifest.for_folder``
describes those from the files' headers — quant types from ``general.file_type`` and the tensor types,
split models as one model, the mmproj chosen by ``Manifest.mmproj_for`` (F16, then BF16, F32, Q8_0; another
model's mmproj is passed over with the reason).

Ranking: by measured quality (lowest mean KL divergence in a ``quant_eval`` report, rows matched by file
name; the report is read as the typed :class:`medgemma_gguf.report_schema.EvalReport`, older schema
versions upgraded) when a report is given or ``FOLDER/report/report.json`` exists, else by bits per weight
(more is better: closer to the source weights). Each measured quant carries the KL's bracket, so a caller
can say when two ranks are not established by the measurement.
Bits per weight = 8 x tensor bytes / weights, read from the GGUF header.

Fitting: with a GPU budget, a quant fits when ``plan_offload`` puts every layer on the GPU within it
(weights, KV cache for ``n_ctx``, mmproj, compute buffers and headroom). Without a GPU, it fits when its
CPU footprint (weights + KV cache + mmproj + compute and logits buffers) is below the memory available now
(``MemAvailable``).

The default choice (``choose_quant``; ``chat DIR``, ``serve DIR``, ``load(DIR)``): with a GPU, the best quant
that fits; without one, the best that fits among those of at most ``CPU_MAX_BPW`` (5.5) bits per weight —
on a CPU every token reads all the weights, so a BF16 or Q8_0 file that fits in RAM is still 2-3x slower
than Q4_K_M/Q5_K_M for a KL difference that rarely matters; when no such quant fits, the best that fits.
``quant`` overrides the rule.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from medgemma_gguf.errors import NotFoundError, UserError, setting
from medgemma_gguf.gguf_info import SPLIT_NAME, check_model_pair, read_gguf_info
from medgemma_gguf.integrity import check_sizes, open_manifest
from medgemma_gguf.manifest import Manifest, MmprojChoice
from medgemma_gguf.report_schema import EvalReport
from medgemma_gguf.runtime.context_settings import ContextSettings
from medgemma_gguf.runtime.offload import OffloadPlan, plan_offload
from medgemma_gguf.sizes import format_size

log = logging.getLogger(__name__)

__all__ = ["CPU_MAX_BPW", "QuantCandidate", "check_model_pair", "choose_quant", "folder_mmproj", "rank_quants"]

# without a GPU the default is the best quant of at most this many bits per weight that fits (module docstring)
CPU_MAX_BPW = 5.5


def bits_per_weight(path: Path) -> float:
    """The file's bits per weight (``runtime.gguf_info.bits_per_weight``), from its header."""
    bpw = read_gguf_info(path).bits_per_weight
    if bpw == 0:
        raise UserError(f"{path} holds no weight matrices; re-convert the model")
    return bpw


@dataclass(frozen=True)
class QuantCandidate:
    """One text GGUF of a folder with the mmproj that goes with it, and whether it fits the budget."""

    path: Path
    type: str
    bytes: int
    bpw: float
    mmproj: Path | None
    mmproj_bytes: int
    kld_mean: float | None
    fits: bool
    plan: OffloadPlan
    kld_bracket: tuple[float, float] | None = None
    mmproj_note: str = ""  # which mmproj was taken and why others were not (Manifest.mmproj_for)
    why: str = ""  # why choose_quant took this one

    @property
    def footprint_bytes(self) -> int:
        return self.bytes + self.mmproj_bytes


def available_memory_bytes() -> int:
    """Memory the system can give a new process now (``MemAvailable``; free pages where /proc is absent)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def folder_mmproj(folder: Path, manifest: Manifest, model_path: Path) -> MmprojChoice:
    """The folder's mmproj that matches ``model_path`` (preferring F16, BF16, F32, Q8_0), with the note."""
    return manifest.mmproj_for(folder, model_path)


def read_report(path: Path) -> dict[str, tuple[float, tuple[float, float]]]:
    """``file name -> (kld_mean, (kld_mean_low, kld_mean_high))`` of the successfully measured rows of a
    quant_eval ``report.json`` (any schema version this package knows; a clear error otherwise)."""
    report = EvalReport.load(Path(path))
    return {Path(r.file).name: (r.kld.mean, r.kld.bracket) for r in report.rows if r.ok and r.kld is not None}


def rank_quants(folder: Path, *, n_ctx: int, vram_bytes: int | None = None, gpu: bool | None = None,
                report: Path | None = None, settings: ContextSettings | None = None) -> list[QuantCandidate]:
    """Every text GGUF of ``folder`` (its manifest's, or those found in it), fitting ones first, each group best
    first.

    ``gpu``: plan for a GPU of ``vram_bytes`` (None: a GPU when ``vram_bytes`` is given or llama-cpp-python
    can offload). ``report``: a quant_eval report.json; ``folder/report/report.json`` is used when present.
    ``settings``: the context (KV types, SWA cache, flash attention, sequences; ``n_ctx`` is taken from
    the argument), this runtime's defaults unless given.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is not a folder; pass a folder of GGUF files (or a .gguf file)")
    manifest = open_manifest(folder)  # recovers what a killed convert/quantize left (medgemma_gguf.integrity)
    check_sizes(folder, [*manifest.present(folder, "text"), *manifest.present(folder, "mmproj")])
    if report is None and (folder / "report" / "report.json").is_file():
        report = folder / "report" / "report.json"
    quality = read_report(report) if report is not None else {}
    if gpu is None and vram_bytes is not None:
        gpu = True
    ram = None
    candidates = []
    damaged: list[UserError] = []
    for row in manifest.present(folder, "text"):
        path = folder / row.path
        info = read_gguf_info(path)
        try:
            info.check_complete()  # a truncated or missing part: not a candidate
        except UserError as exc:
            log.warning("not ranking %s: %s", row.path, exc)
            damaged.append(exc)
            continue
        mmproj = manifest.mmproj_for(folder, path)
        plan = plan_offload(path, n_ctx=n_ctx, vram_bytes=vram_bytes, mmproj_path=mmproj.path, gpu_available=gpu,
                            settings=settings)
        if plan.gpu_available:
            fits = plan.fits_fully
        else:
            ram = available_memory_bytes() if ram is None else ram
            fits = plan.cpu_bytes <= ram
        candidates.append(QuantCandidate(
            path=path, type=row.type, bytes=info.file_bytes, bpw=bits_per_weight(path), mmproj=mmproj.path,
            mmproj_bytes=mmproj.path.stat().st_size if mmproj.path else 0,
            kld_mean=quality[path.name][0] if path.name in quality else None, fits=fits, plan=plan,
            kld_bracket=quality[path.name][1] if path.name in quality else None, mmproj_note=mmproj.note))
    if not candidates:
        if damaged:
            raise damaged[0]
        if manifest.discovered:
            found = f"; {'; '.join(manifest.problems)}" if manifest.problems else ""
            raise NotFoundError(f"{folder} holds no readable Gemma 3 text GGUF{found}")
        raise NotFoundError(f"the manifest of {folder} lists no text GGUF that exists; re-run medgemma-gguf convert")

    def order(c: QuantCandidate) -> tuple:
        measured = c.kld_mean is not None
        return (not c.fits, not measured, c.kld_mean if measured else 0.0, -c.bpw, c.bytes)

    return sorted(candidates, key=order)


def _name_tag(path: Path) -> str:
    """A file's name without ``.gguf`` and a split suffix, upper-cased: ``MEDGEMMA-4B-IT-UD-Q4_K_XL``."""
    match = SPLIT_NAME.match(path.name)
    stem = match.group("prefix") if match else path.name.removesuffix(".gguf")
    return stem.upper()


def select_quant(candidates: list[QuantCandidate], quant: str, where: str) -> QuantCandidate:
    """The candidate ``quant`` names: a file name, a name ending in ``-QUANT`` (``UD-Q4_K_XL``), or a quant type
    read from the headers (``Q4_K_M``); the best ranked when several match. NotFoundError listing the
    folder's quants otherwise."""
    wanted = quant.strip().upper().removesuffix(".GGUF")
    for matches in ([c for c in candidates if c.path.name == quant.strip()],
                    [c for c in candidates if _name_tag(c.path) == wanted or
                     _name_tag(c.path).endswith(("-" + wanted, "." + wanted, "_" + wanted))],
                    [c for c in candidates if c.type.upper() == wanted]):
        if matches:
            return matches[0]
    have = ", ".join(f"{c.type} ({c.path.name})" for c in candidates)
    raise NotFoundError(f"{where} has no quant {quant!r}; it has {have}; pick one with {setting('quant')}")


def choose_quant(folder: Path, *, n_ctx: int, vram_bytes: int | None = None, gpu: bool | None = None,
                 quant: str | None = None, settings: ContextSettings | None = None) -> QuantCandidate:
    """The quant of ``folder`` the default rule picks (module docstring), or the one named ``quant``; the
    smallest when none fits. ``why`` on the result says which rule chose it."""
    ranked = rank_quants(folder, n_ctx=n_ctx, vram_bytes=vram_bytes, gpu=gpu, settings=settings)
    if quant is not None:
        return replace(select_quant(ranked, quant, str(folder)), why=f"asked for {quant}")
    cpu = not ranked[0].plan.gpu_available
    fitting = [c for c in ranked if c.fits]
    by = "lowest KL in the report" if any(c.kld_mean is not None for c in ranked) else "most bits per weight"
    if cpu:
        light = [c for c in fitting if c.bpw <= CPU_MAX_BPW]
        if light:
            return replace(light[0], why=f"no GPU: the best quant of at most {CPU_MAX_BPW} bits per weight that "
                                         f"fits in RAM ({by}); pass {setting('quant')} to choose another")
        if fitting:
            return replace(fitting[0], why=f"no GPU and no quant of at most {CPU_MAX_BPW} bits per weight: the best "
                                           f"that fits in RAM ({by})")
    elif fitting:
        return replace(fitting[0], why=f"the best quant that fits the GPU ({by})")
    smallest = min(ranked, key=lambda c: c.footprint_bytes)
    if smallest.plan.gpu_available:
        why = f"no quant in {folder} fits the GPU budget entirely; using the smallest, partly offloaded"
    else:
        why = (f"no quant in {folder} fits the {format_size(available_memory_bytes())} of available memory; using "
               f"the smallest (needs {format_size(smallest.plan.cpu_bytes)})")
    log.warning("%s: %s", why, smallest.path.name)
    return replace(smallest, why=why)
