"""Run candidate GGUF quants over the reference's stored sequences and compute their metrics.

Every candidate replays the token ids the reference stored (so both score the same positions), through
``runtime.engine.Engine``. Per quant: KL statistics (the mean with its exact bracket from the coverage
cache, and llama.cpp's percentiles) over all text positions and over the image-conditioned ones, top-1
agreement ("same top p"), llama.cpp's Δp statistics (the observed next token) and RMS Δp of the
reference's top token, perplexity ratio on the held-out text, task
accuracy per slice with a 95 % Wilson interval and McNemar's exact test against the reference's answers,
file size and bits per weight, prompt/generation speed, image encode time and peak memory.

Peak memory: Linux's ``VmHWM`` (peak resident set) is reset before each quant by writing ``5`` to
``/proc/self/clear_refs``; ``peak_rss_bytes`` is the process's peak while that quant ran (the Python
process and the loaded quant), ``None`` where the platform does not allow the reset.

A quant that fails (unreadable file, another model than the reference, an mmproj that does not fit)
becomes a row with ``error`` set; the other quants are still evaluated. Rows are
:class:`medgemma_gguf.report_schema.ReportRow` records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.integrity import check_file_against_folder, check_sizes, open_manifest
from medgemma_gguf.manifest import MMPROJ_PRECISION_ORDER
from medgemma_gguf.provenance import InputHash, collect_provenance, hash_input
from medgemma_gguf.quant_eval.metrics import (
    accuracy_with_ci,
    delta_p_statistics,
    kld_statistics,
    ln_perplexity_ratio,
    log_softmax,
    paired_test,
    rms_delta_p,
    same_top_statistics,
    score_candidate,
    top1_agreement,
)
from medgemma_gguf.quant_eval.reference import (
    HELDOUT_PART,
    CoverageSpec,
    ModelSignature,
    ReferenceCache,
    ReferencePart,
    coverage_summary,
    default_cache_dir,
    gguf_signature,
    mmproj_from_manifest,
    native_pixels,
    open_reference,
    option_choices,
    reference_parts,
    rows_at,
    sequence_parts,
    text_positions,
)
from medgemma_gguf.quant_eval.report import REPORT_FILES, write_report
from medgemma_gguf.quant_eval.slices import Slice, load_heldout_text, load_slice, parse_spec
from medgemma_gguf.report_schema import (
    Coverage,
    DeltaPStats,
    EvalReport,
    KLStats,
    PartStats,
    ReportRow,
    SliceAccuracy,
)

log = logging.getLogger(__name__)

SPEED_PROMPT_TOKENS = 128
SPEED_GEN_TOKENS = 32


@dataclass(frozen=True)
class Candidate:
    """A text GGUF to evaluate, with the mmproj it runs with (None: text only)."""

    path: Path
    mmproj: Path | None = None
    type: str | None = None


def _type_from_name(path: Path) -> str:
    """The last ``-`` field of a file name: the type of a file whose header cannot be read (error rows only)."""
    stem = path.stem
    return stem.rsplit("-", 1)[-1] if "-" in stem else stem


def candidates_from_paths(paths: Sequence[Path], mmproj: Path | None = None) -> list[Candidate]:
    """Candidates from folders (every text model of their manifest, or found in them) and GGUF files.

    A folder's quants run with the mmproj listed in their manifest row (``mmproj`` key), else the most
    precise mmproj of the folder that fits them (``Manifest.mmproj_for``); ``mmproj`` overrides both. A file
    gets ``mmproj``, else the one beside it. Files whose header says they are not a text model (an mmproj,
    an importance matrix: a glob like ``out/*.gguf`` catches them) are skipped.
    """
    found: list[Candidate] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path} does not exist; pass GGUF files or a folder of GGUFs")
        if path.is_dir():
            manifest = open_manifest(path)  # recovers what a killed convert/quantize left
            rows = manifest.present(path, "text")
            if not rows:
                why = f" ({'; '.join(manifest.problems)})" if manifest.problems else ""
                raise UserError(f"{path} holds no text model{why}; run medgemma-gguf convert, or pass a folder of "
                                "MedGemma GGUFs")
            check_sizes(path, rows)  # cheap: each file's recorded size (verify re-hashes)
            for row in rows:
                chosen = mmproj or (path / row.mmproj if row.mmproj else
                                    manifest.mmproj_for(path, path / row.path, MMPROJ_PRECISION_ORDER).path)
                found.append(Candidate(path / row.path, chosen, row.type))
        else:
            try:
                kind = read_gguf_info(path).kind
            except UserError:
                kind = "text"  # unreadable: evaluated, so the report says why it failed
            if kind != "text":
                continue  # a glob like out/*.gguf also matches the projector: it is not a quant
            check_file_against_folder(path)
            found.append(Candidate(path, mmproj or mmproj_from_manifest(path), None))
    if not found:
        raise UserError("no quants to evaluate; pass GGUF files or a folder of GGUFs")
    return found


def _vm_hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def file_stats(path: Path) -> dict[str, Any]:
    """Size, bits per weight (``runtime.gguf_info.bits_per_weight``) and tensor totals of a GGUF."""
    info = read_gguf_info(path)
    n_elements = sum(t.n_elements for t in info.tensors)
    return {"info": info, "bytes": info.file_bytes, "tensor_bytes": info.total_tensor_bytes,
            "n_elements": n_elements, "bpw": info.bits_per_weight or None}


@dataclass
class _PartScores:
    kl: np.ndarray  # estimate = the bracket's low end
    kl_upper: np.ndarray
    top1: np.ndarray  # candidate argmax per position
    next_lp: np.ndarray  # candidate ln q of the observed next token (NaN where none)
    ref_top_lp: np.ndarray  # candidate ln q of the reference's top token
    choices: np.ndarray | None  # chosen option per item


def _score_part(engine, part: ReferencePart, slice_: Slice | None, image_size: int, progress: bool) -> _PartScores:
    from tqdm import tqdm

    n = part.pos_seq.size
    scores = _PartScores(kl=np.empty(n), kl_upper=np.empty(n), top1=np.empty(n, dtype=np.int64),
                         next_lp=np.full(n, np.nan), ref_top_lp=np.empty(n), choices=None)
    n_items = part.item_ids.size
    choices = np.full(n_items, -1, dtype=np.int64)
    for s in tqdm(range(part.n_sequences), desc=f"  {part.name}", disable=not progress, leave=False):
        tokens = part.sequence(s)
        span = (int(part.image_start[s]), int(part.image_end[s])) if part.image_start[s] >= 0 else None
        item_index = int(part.seq_item[s])
        pixels = None
        if span is not None:
            if not engine.has_vision:
                raise UserError(f"{part.name} has images but this quant runs without an mmproj; pass "
                                f"{setting('mmproj')}")
            item = slice_.items[item_index] if slice_ is not None else None
            if item is None or item.image is None:
                raise RuntimeError(f"{part.name}: sequence {s} has an image span but its item has no image")
            pixels = native_pixels(item, image_size)
            from medgemma_gguf.runtime.engine import ImagePart

            n_image = engine.image_token_count(ImagePart(pixels))
            if n_image != span[1] - span[0]:
                raise UserError(f"the mmproj gives {n_image} image positions but the reference used "
                                f"{span[1] - span[0]}; use the mmproj of the reference model")
        rows = part.positions_of(s)
        closed = item_index >= 0 and part.answer_index[item_index] >= 0  # a closed question: the chosen option
        if rows.size == 0 and not closed:
            continue  # nothing of this sequence is scored
        all_positions = text_positions(tokens.size, span)
        # logits only where they are used: the scored positions and a closed item's last position
        wanted = np.isin(all_positions, part.pos_token[rows])
        if closed:
            wanted[-1] = True
        engine.reset()
        all_logits = engine.eval_parts(sequence_parts(tokens, span, pixels), logits=wanted)
        if all_logits.shape[0] != int(wanted.sum()):
            raise RuntimeError(f"{part.name}: got {all_logits.shape[0]} logit rows for {int(wanted.sum())} positions")
        if closed:
            last = log_softmax(all_logits[-1].astype(np.float64))
            options = part.option_tokens[item_index]
            lps = np.where(options >= 0, last[np.clip(options, 0, None)], np.nan)
            choices[item_index] = option_choices(lps[None, :])[0]
        if rows.size == 0:
            continue
        logits = rows_at(all_logits, all_positions[wanted], part.pos_token[rows])
        ref_rows = part.dist.take(rows)
        scored = score_candidate(ref_rows, logits, {"ref_top": ref_rows.top1_ids, "next": part.next_token[rows]})
        scores.kl[rows], scores.kl_upper[rows] = scored.bounds.estimate, scored.bounds.upper
        scores.top1[rows] = scored.top1
        scores.ref_top_lp[rows] = scored.token_logprobs["ref_top"]
        scores.next_lp[rows] = scored.token_logprobs["next"]
    if n_items:
        scores.choices = choices
    return scores


def _kl_stats(kl: np.ndarray, kl_upper: np.ndarray) -> KLStats | None:
    if kl.size == 0:
        return None
    stats = kld_statistics(kl)
    return KLStats(mean_low=stats["mean"], mean_high=float(np.mean(kl_upper)), **stats)


def _aggregate(parts: Sequence[ReferencePart], scores: Sequence[_PartScores]) -> dict[str, Any]:
    kl = np.concatenate([s.kl for s in scores])
    kl_upper = np.concatenate([s.kl_upper for s in scores])
    after = np.concatenate([p.after_image for p in parts])
    ref_top1 = np.concatenate([p.dist.top1_ids for p in parts])
    cand_top1 = np.concatenate([s.top1 for s in scores])
    ref_next = np.concatenate([p.next_logprob for p in parts])
    cand_next = np.concatenate([s.next_lp for s in scores])
    ref_top_lp = np.concatenate([p.dist.top1_logprobs for p in parts])
    cand_top_lp = np.concatenate([s.ref_top_lp for s in scores])
    fields: dict[str, Any] = {"kld": _kl_stats(kl, kl_upper), "image_kld": _kl_stats(kl[after], kl_upper[after])}
    fields["top1_agreement"], fields["top1_agreement_stderr"] = same_top_statistics(ref_top1, cand_top1)
    fields["image_top1_agreement"] = top1_agreement(ref_top1[after], cand_top1[after]) if after.any() else None
    has_next = ~np.isnan(ref_next) & ~np.isnan(cand_next)
    fields["dp"] = (DeltaPStats(**delta_p_statistics(ref_next[has_next], cand_next[has_next]))
                    if has_next.any() else None)
    fields["rms_dp_top"] = rms_delta_p(ref_top_lp, cand_top_lp)
    for part, score in zip(parts, scores, strict=True):
        if part.name == HELDOUT_PART:
            valid = ~np.isnan(part.next_logprob)
            ln_ratio, stderr = ln_perplexity_ratio(score.next_lp[valid], part.next_logprob[valid])
            fields.update(ppl_ratio=float(np.exp(ln_ratio)), ln_ppl_ratio=ln_ratio, ln_ppl_ratio_stderr=stderr)
    accuracy: dict[str, SliceAccuracy] = {}
    for part, score in zip(parts, scores, strict=True):
        if part.kind != "task" or score.choices is None or not part.closed.any():
            continue  # free-text items: KL only
        correct = score.choices[part.closed] == part.answer_index[part.closed]
        acc, low, high = accuracy_with_ci(correct)
        test = paired_test(correct, part.reference_correct())
        accuracy[part.name] = SliceAccuracy(accuracy=acc, ci95_low=low, ci95_high=high, n=int(correct.size),
                                            reference_accuracy=test["ref_accuracy"], mcnemar_p=test["p_value"],
                                            only_quant_right=test["b"], only_reference_right=test["c"])
    fields["accuracy"] = accuracy
    fields["parts"] = {part.name: PartStats(n_positions=int(score.kl.size), kld_mean=float(score.kl.mean()),
                                            kld_mean_low=float(score.kl.mean()),
                                            kld_mean_high=float(score.kl_upper.mean()),
                                            kld_max=float(score.kl.max()),
                                            top1_agreement=top1_agreement(part.dist.top1_ids, score.top1))
                       for part, score in zip(parts, scores, strict=True) if score.kl.size}
    return fields


def _speed(engine, prompt_tokens: Sequence[int], pixels: np.ndarray | None) -> dict[str, Any]:
    """Prompt tokens/s (one eval of the prompt), greedy generation tokens/s, image encode seconds."""
    prompt = list(prompt_tokens)[:SPEED_PROMPT_TOKENS]
    engine.reset()
    engine.eval_tokens(prompt[:8], logits="last")  # warm-up: graph allocation, page-in
    engine.reset()
    start = time.perf_counter()
    logits = engine.eval_tokens(prompt, logits="last")
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    generated = 0
    for _ in range(SPEED_GEN_TOKENS):
        token = int(np.argmax(logits[-1]))
        logits = engine.eval_tokens([token], logits="last")
        generated += 1
    gen_s = time.perf_counter() - start
    encode_s = None
    if pixels is not None and engine.has_vision:
        from medgemma_gguf.runtime.engine import ImagePart

        timings = []
        for _ in range(2):  # the first call includes allocation; report the faster
            start = time.perf_counter()
            engine.encode_image(ImagePart(pixels))
            timings.append(time.perf_counter() - start)
        encode_s = min(timings)
    engine.reset()
    return {"prompt_tps": len(prompt) / prompt_s if prompt_s > 0 else None,
            "gen_tps": generated / gen_s if gen_s > 0 else None, "image_encode_s": encode_s,
            "speed_prompt_tokens": len(prompt), "speed_gen_tokens": generated}


def evaluate_candidate(candidate: Candidate, parts: Sequence[ReferencePart], slices: dict[str, Slice],
                       signature: ModelSignature, image_size: int, *, n_threads: int | None = None,
                       measure_speed: bool = True, progress: bool = False) -> ReportRow:
    """All metrics of one quant as one report row (raises UserError for a quant that cannot be evaluated)."""
    from medgemma_gguf.runtime.engine import Engine

    stats = file_stats(candidate.path)
    info = stats.pop("info")
    differences = signature.differences(gguf_signature(info))
    if differences:
        raise UserError(f"{candidate.path.name} is another model than the reference ({'; '.join(differences)}); "
                        "evaluate quants of the reference model")
    row: dict[str, Any] = {"file": candidate.path.name, "path": str(candidate.path),
                           "type": candidate.type or info.quant_type,
                           "bytes": stats["bytes"], "bpw": stats["bpw"], "tensor_bytes": stats["tensor_bytes"],
                           "n_elements": stats["n_elements"],
                           "mmproj": candidate.mmproj.name if candidate.mmproj else None,
                           "mmproj_bytes": candidate.mmproj.stat().st_size if candidate.mmproj else 0}
    needs_images = any(bool((p.image_start >= 0).any()) for p in parts)
    mmproj = candidate.mmproj if needs_images else None
    if needs_images and mmproj is None:
        raise UserError(f"{candidate.path.name} has no mmproj but the slices have images; pass {setting('mmproj')}")
    longest = max(int(np.diff(p.seq_offsets).max()) for p in parts)
    n_ctx = max(512, -(-(longest + SPEED_GEN_TOKENS + 16) // 256) * 256)
    row.update(prompt_tps=None, gen_tps=None, image_encode_s=None)
    hwm_reset = _vm_hwm_reset()
    start = time.perf_counter()
    with Engine(candidate.path, mmproj, n_ctx=n_ctx, n_threads=n_threads) as engine:
        if engine.n_vocab != signature.n_vocab:
            raise UserError(f"{candidate.path.name} has a vocabulary of {engine.n_vocab} tokens, the reference "
                            f"{signature.n_vocab}; evaluate quants of the reference model")
        scores = [_score_part(engine, part, slices.get(part.name), image_size, progress) for part in parts]
        row.update(_aggregate(parts, scores))
        if measure_speed:
            pixels = None
            for part in parts:
                items = slices.get(part.name)
                image_items = [it for it in items.items if it.image is not None] if items else []
                if image_items and engine.has_vision:
                    pixels = native_pixels(image_items[0], image_size)
                    break
            text_only = [p.sequence(s) for p in parts for s in range(p.n_sequences) if p.image_start[s] < 0]
            prompt = np.concatenate(text_only or [parts[0].sequence(0)])[:SPEED_PROMPT_TOKENS]
            row.update(_speed(engine, prompt.tolist(), pixels))
    row["eval_seconds"] = time.perf_counter() - start
    row["peak_rss_bytes"] = _vm_hwm() if hwm_reset else None
    return ReportRow(**row)


def error_row(candidate: Candidate, error: BaseException) -> ReportRow:
    """The report row of a quant that could not be evaluated."""
    size = candidate.path.stat().st_size if candidate.path.is_file() else None
    return ReportRow(file=candidate.path.name, path=str(candidate.path),
                     type=candidate.type or _type_from_name(candidate.path), bytes=size,
                     error=str(error) or type(error).__name__)


def evaluate_candidates(candidates: Sequence[Candidate], parts: Sequence[ReferencePart], slices: Sequence[Slice],
                        signature: ModelSignature, image_size: int, *, n_threads: int | None = None,
                        measure_speed: bool = True, progress: bool = False) -> list[ReportRow]:
    """One row per candidate, in order; a failing candidate gives an error row and the rest still run."""
    from tqdm import tqdm

    by_name = {s.spec: s for s in slices}
    rows = []
    for candidate in tqdm(candidates, desc="quants", disable=not progress):
        try:
            rows.append(evaluate_candidate(candidate, parts, by_name, signature, image_size, n_threads=n_threads,
                                           measure_speed=measure_speed, progress=progress))
        except (UserError, RuntimeError, OSError, ValueError) as exc:
            log.warning("%s: %s", candidate.path.name, exc)
            rows.append(error_row(candidate, exc))
    return rows


def _check_max_items(max_items: int | None) -> None:
    if max_items is not None and (isinstance(max_items, bool) or max_items < 1):
        raise UserError(f"{setting('max_items')} must be at least 1, got {max_items}")


def load_slices(specs: Sequence[str], *, data_dir: Path | None = None, max_items: int | None = None) -> list[Slice]:
    """Load each slice spec; ``max_items`` keeps the first N items of each (the spec then names the cut)."""
    _check_max_items(max_items)
    slices = []
    for spec in specs:
        loaded = load_slice(spec, local_dir=data_dir)
        if max_items is not None and len(loaded) > max_items:
            parsed = parse_spec(spec)
            name = f"{spec}:{max_items}" if parsed.limit is None and parsed.seed is None else f"{spec}+first{max_items}"
            loaded = Slice(spec=name, items=loaded.items[:max_items])
        slices.append(loaded)
    names = [s.spec for s in slices]
    if len(set(names)) != len(names):
        raise UserError(f"a slice is named twice in {', '.join(names)}; give each slice once")
    return slices


@dataclass(frozen=True)
class EvalOptions:
    """How ``run_eval`` evaluates (``medgemma-gguf eval``'s options), checked when made, before any work.

    ``slices``: slice specs (default: medqa-mini, plus vqa-mini when the reference sees images); ``mmproj``:
    for every quant (default: each quant's own, ``candidates_from_paths``); ``reference_mmproj`` /
    ``reference_dtype``: of the reference; ``cache_dir``: the reference cache (default
    ``reference.default_cache_dir``); ``data_dir``: downloaded benchmark files; ``coverage``: the reference
    mass left out per position (ε; default: the one chosen for the reference's model family,
    ``reference.model_coverage``); ``full_vocab``: keep every logit instead (llama.cpp's method; 1 MiB a
    position at Gemma 3's vocabulary); ``max_items``: at most N items per slice; ``heldout``: score the
    held-out text (perplexity ratio); ``measure_speed``: time prompt and generation; ``token``: for a gated
    Hub reference; ``force``: overwrite an existing report.
    """

    slices: Sequence[str] | None = None
    mmproj: Path | None = None
    reference_mmproj: Path | None = None
    reference_dtype: str | None = None
    cache_dir: Path | None = None
    data_dir: Path | None = None
    coverage: float | None = None
    full_vocab: bool = False
    max_items: int | None = None
    heldout: bool = True
    n_threads: int | None = None
    measure_speed: bool = True
    token: str | None = field(default=None, repr=False)
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.slices is not None:
            object.__setattr__(self, "slices", tuple(self.slices))
        CoverageSpec.make(self.coverage, self.full_vocab)
        _check_max_items(self.max_items)


def run_eval(targets: Sequence[Path], reference_source: str, outdir: Path,
             options: EvalOptions | None = None) -> EvalReport:
    """The whole ``medgemma-gguf eval``: reference (cached), every candidate, the report files in ``outdir``,
    as ``options`` (``EvalOptions``; default: its defaults) say."""
    opts = options or EvalOptions()
    outdir = Path(outdir)
    if not opts.force:
        existing = [outdir / name for name in REPORT_FILES if (outdir / name).exists()]
        if existing:
            raise UserError(f"{existing[0]} already exists; pass {setting('force')} to overwrite it or choose another "
                            f"{setting('eval_outdir')}")
    candidates = candidates_from_paths(targets, opts.mmproj)
    cache = ReferenceCache(opts.cache_dir or default_cache_dir())
    reference = open_reference(reference_source, cache_dir=cache.cache_dir, dtype=opts.reference_dtype,
                               mmproj=opts.reference_mmproj, token=opts.token, n_threads=opts.n_threads)
    spec = CoverageSpec.make(opts.coverage, opts.full_vocab, model=reference.signature)  # the model's ε by default
    slices = opts.slices
    if slices is None:
        slices = ["medqa-mini", "vqa-mini"] if reference.has_vision else ["medqa-mini"]
    loaded = load_slices(slices, data_dir=opts.data_dir, max_items=opts.max_items)
    chunks = load_heldout_text() if opts.heldout else []
    if not loaded and not chunks:
        raise UserError(f"nothing to evaluate: give at least one of {setting('slices')} or keep the held-out text")
    try:
        parts = reference_parts(reference, cache, heldout=chunks, slices=loaded, coverage=spec,
                                progress=opts.progress)
    finally:
        reference.close()  # free the reference model before loading any quant
    image_size = max((int(p.meta.get("image_size") or 0) for p in parts), default=0)
    rows = evaluate_candidates(candidates, parts, loaded, reference.signature, image_size, n_threads=opts.n_threads,
                               measure_speed=opts.measure_speed, progress=opts.progress)
    report = EvalReport(
        reference=reference.describe(),
        coverage=Coverage(**coverage_summary(parts)),
        slices=[{**s.describe(), "reference_accuracy": float(p.reference_correct().mean()) if p.closed.any() else None}
                for s, p in zip(loaded, [p for p in parts if p.kind == "task"], strict=True)],
        heldout={"n_chunks": len(chunks), "n_positions": int(parts[0].pos_seq.size)} if chunks else None,
        cache={"dir": str(cache.cache_dir), "hits": cache.hits, "misses": cache.misses,
               "stale_removed": cache.stale_removed},
        rows=rows,
        provenance=eval_provenance(candidates, reference, loaded, opts.n_threads).to_json(),
    )
    write_report(report, outdir, force=opts.force)
    return report


def eval_provenance(candidates: Sequence[Candidate], reference: Any, slices: Sequence[Slice],
                    n_threads: int | None):
    """The report's provenance record: every quant and mmproj file, the reference (its content hash), own
    evaluation files, the slices' sampling seeds."""
    inputs = [hash_input("model", c.path) for c in candidates if c.path.is_file()]
    mmprojs = sorted({c.mmproj for c in candidates if c.mmproj is not None and c.mmproj.is_file()})
    inputs += [hash_input("mmproj", m) for m in mmprojs]
    inputs.append(InputHash("reference", str(reference.source), reference.content_hash))
    inputs += [InputHash("slice", s.source["file"], s.source["sha256"], Path(s.source["file"]).stat().st_size)
               for s in slices if s.source]
    seeds = {s.spec: parse_spec(s.spec).seed for s in slices if parse_spec(s.spec).seed is not None}
    libraries = ("torch", "transformers") if getattr(reference, "kind", "") == "hf" else ()
    return collect_provenance(threads=n_threads, seeds={"slice sampling": seeds, "sampling": None}, inputs=inputs,
                              libraries=libraries)
