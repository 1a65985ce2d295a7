"""Pick a quant (text GGUF + mmproj) from an output folder's manifest, and check that a pair belongs together.

Ranking: by measured quality (lowest mean KL divergence in a ``quant_eval`` report, rows matched by file
name; the report is read as the typed :class:`medgemma_gguf.report_schema.EvalReport`, older schema
versions upgraded) when a report is given, else by bits per weight (more is better: closer to the source
weights). Each measured quant carries the KL's bracket, so a caller can say when two ranks are not
established by the measurement.
Bits per weight = 8 x tensor bytes / weights, read from the GGUF header.

Fitting: with a GPU budget, a quant fits when ``plan_offload`` puts every layer on the GPU within it
(weights, KV cache for ``n_ctx``, mmproj, compute buffers and headroom). Without a GPU, it fits when its
CPU footprint (weights + KV cache + mmproj) is below the memory available now (``MemAvailable``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.manifest import Manifest
from medgemma_gguf.report_schema import EvalReport
from medgemma_gguf.runtime.offload import OffloadPlan, plan_offload
from medgemma_gguf.sizes import format_size

log = logging.getLogger(__name__)



def bits_per_weight(path: Path) -> float:
    """The file's bits per weight (``runtime.gguf_info.bits_per_weight``), from its header."""
    bpw = read_gguf_info(path).bits_per_weight
    if bpw == 0:
        raise UserError(f"{path} holds no weight matrices; re-convert the model")
    return bpw


def check_model_pair(model_path: Path, mmproj_path: Path | None) -> None:
    """Refuse a text GGUF that is not Gemma 3, and an mmproj that is not Gemma 3's or belongs to another model.

    Checked from the headers, before anything is loaded: the mmproj's ``clip.vision.projection_dim`` must
    equal the text model's ``gemma3.embedding_length`` and its projector type must be ``gemma3``.
    """
    text = read_gguf_info(model_path)
    if text.architecture == "clip":
        raise UserError(f"{model_path} is an mmproj (vision) file; pass the text model as the model and this as "
                        f"{setting('mmproj')}")
    if text.architecture != "gemma3":
        raise UserError(
            f"{model_path} is a {text.architecture or 'unknown'} model, not Gemma 3; pass a MedGemma GGUF made by "
            "medgemma-gguf convert"
        )
    if mmproj_path is None:
        return
    vision = read_gguf_info(mmproj_path)
    if vision.architecture != "clip":
        raise UserError(
            f"{mmproj_path} is not an mmproj (general.architecture is {vision.architecture!r}); pass the "
            "mmproj-*.gguf written next to the model"
        )
    projector = vision.metadata.get("clip.vision.projector_type") or vision.metadata.get("clip.projector_type")
    if projector != "gemma3":
        raise UserError(f"{mmproj_path} has projector type {projector!r}, not gemma3; use MedGemma's own mmproj")
    if not vision.metadata.get("clip.has_vision_encoder", True):
        raise UserError(f"{mmproj_path} has no vision encoder; use MedGemma's image mmproj")
    width = text.metadata.get("gemma3.embedding_length")
    projected = vision.metadata.get("clip.vision.projection_dim")
    if width != projected:
        raise UserError(
            f"{mmproj_path.name} projects images to width {projected} but {model_path.name} has width {width}: "
            "the mmproj belongs to another model; use the mmproj from the same conversion"
        )


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


def folder_mmproj(folder: Path, manifest: Manifest, model_path: Path) -> Path | None:
    """The folder's mmproj that matches ``model_path`` (preferring F16, BF16, F32, Q8_0), or None."""
    for row in manifest.mmprojs(folder):
        path = folder / row.path
        try:
            check_model_pair(model_path, path)
        except UserError:
            continue
        return path
    return None


def read_report(path: Path) -> dict[str, tuple[float, tuple[float, float]]]:
    """``file name -> (kld_mean, (kld_mean_low, kld_mean_high))`` of the successfully measured rows of a
    quant_eval ``report.json`` (any schema version this package knows; a clear error otherwise)."""
    report = EvalReport.load(Path(path))
    return {Path(r.file).name: (r.kld.mean, r.kld.bracket) for r in report.rows if r.ok and r.kld is not None}


def rank_quants(folder: Path, *, n_ctx: int, vram_bytes: int | None = None, gpu: bool | None = None,
                report: Path | None = None) -> list[QuantCandidate]:
    """Every text GGUF of ``folder``'s manifest, fitting ones first, each group best first.

    ``gpu``: plan for a GPU of ``vram_bytes`` (None: a GPU when ``vram_bytes`` is given or llama-cpp-python
    can offload). ``report``: a quant_eval report.json; ``folder/report/report.json`` is used when present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the output folder of medgemma-gguf convert")
    manifest = Manifest.load(folder)
    if report is None and (folder / "report" / "report.json").is_file():
        report = folder / "report" / "report.json"
    quality = read_report(report) if report is not None else {}
    if gpu is None and vram_bytes is not None:
        gpu = True
    ram = None
    candidates = []
    for row in manifest.find("text"):
        path = folder / row.path
        if not path.is_file():
            continue
        mmproj = folder_mmproj(folder, manifest, path)
        plan = plan_offload(path, n_ctx=n_ctx, vram_bytes=vram_bytes, mmproj_path=mmproj, gpu_available=gpu)
        if plan.gpu_available:
            fits = plan.fits_fully
        else:
            ram = available_memory_bytes() if ram is None else ram
            fits = plan.cpu_bytes <= ram
        candidates.append(QuantCandidate(
            path=path, type=row.type, bytes=path.stat().st_size, bpw=bits_per_weight(path), mmproj=mmproj,
            mmproj_bytes=mmproj.stat().st_size if mmproj else 0,
            kld_mean=quality[path.name][0] if path.name in quality else None, fits=fits, plan=plan,
            kld_bracket=quality[path.name][1] if path.name in quality else None))
    if not candidates:
        raise UserError(f"the manifest of {folder} lists no text GGUF that exists; re-run medgemma-gguf convert")

    def order(c: QuantCandidate) -> tuple:
        measured = c.kld_mean is not None
        return (not c.fits, not measured, c.kld_mean if measured else 0.0, -c.bpw, c.bytes)

    return sorted(candidates, key=order)


def choose_quant(folder: Path, *, n_ctx: int, vram_bytes: int | None = None, gpu: bool | None = None,
                 quant: str | None = None) -> QuantCandidate:
    """The best quant of ``folder`` that fits (or the one named ``quant``); the smallest when none fits."""
    ranked = rank_quants(folder, n_ctx=n_ctx, vram_bytes=vram_bytes, gpu=gpu)
    if quant is not None:
        named = [c for c in ranked if c.type.upper() == quant.upper() or c.path.name == quant]
        if not named:
            raise UserError(f"{folder} has no quant {quant!r}; it has {', '.join(c.type for c in ranked)}")
        return named[0]
    if ranked[0].fits:
        return ranked[0]
    smallest = min(ranked, key=lambda c: c.footprint_bytes)
    if smallest.plan.gpu_available:
        log.warning("no quant in %s fits the GPU budget entirely; using the smallest, %s, partly offloaded",
                    folder, smallest.path.name)
    else:
        log.warning("no quant in %s fits the %s of available memory; using the smallest, %s (needs %s)", folder,
                    format_size(available_memory_bytes()), smallest.path.name, format_size(smallest.plan.cpu_bytes))
    return smallest
