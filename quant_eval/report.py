"""Write the evaluation report: ``report.json``, ``report.md``, ``report.csv`` and ``pareto.png``.

All four files are staged under temporary names and renamed together when every one is complete
(``medgemma_gguf.atomic.StagedOutputs``), so a failed run leaves the folder as it was. The report is a
:class:`medgemma_gguf.report_schema.EvalReport` (typed rows, ``schema_version``).

The per-budget recommendation: for each memory budget (GiB), the quant with the lowest mean KL among the
successful rows whose files — the text GGUF plus its mmproj, what must be loaded to run it — fit in it.
Where two quants' KL brackets overlap, the markdown says their order is not established at this coverage
and which ``--coverage`` (or ``--full-vocab``) would settle it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import StagedOutputs
from medgemma_gguf.cache import cache_root
from medgemma_gguf.quant_eval.metrics import ROUNDOFF_KL, brackets_overlap
from medgemma_gguf.report_schema import EvalReport, ReportRow

GIB = 1 << 30
BUDGETS_GIB = (0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80)
REPORT_FILES = ("report.json", "report.md", "report.csv", "pareto.png")
CSV_COLUMNS = ("file", "type", "bytes", "bpw", "kld_mean", "kld_mean_low", "kld_mean_high", "kld_mean_stderr",
               "kld_median", "kld_p90", "kld_p95", "kld_p99", "kld_p999", "kld_max", "top1_agreement",
               "top1_agreement_stderr", "rms_dp", "rms_dp_stderr", "dp_mean", "rms_dp_top", "ppl_ratio",
               "ln_ppl_ratio", "ln_ppl_ratio_stderr", "image_kld_mean", "image_kld_mean_low", "image_kld_mean_high",
               "image_kld_p99", "image_top1_agreement", "prompt_tps", "gen_tps", "image_encode_s", "peak_rss_bytes",
               "mmproj", "mmproj_bytes", "error")


def footprint_bytes(row: ReportRow) -> int | None:
    """Bytes that must be loaded to run the row's quant: the text GGUF plus its mmproj."""
    return row.footprint_bytes


def recommendations(rows: Sequence[ReportRow], budgets_gib: Sequence[float] = BUDGETS_GIB) -> list[dict[str, Any]]:
    """Per budget, the successful row with the lowest ``kld_mean`` that fits; budgets after the first one
    that fits every row are left out (they would repeat it), as are budgets nothing fits."""
    usable = [r for r in rows if r.ok and r.footprint_bytes]
    if not usable:
        return []
    largest = max(r.footprint_bytes or 0 for r in usable)
    out = []
    for budget in budgets_gib:
        fitting = [r for r in usable if (r.footprint_bytes or 0) <= budget * GIB]
        if fitting:
            best = min(fitting, key=lambda r: (r.kld_mean, r.footprint_bytes))
            out.append({"budget_gib": budget, "file": best.file, "type": best.type, "bytes": best.footprint_bytes,
                        "kld_mean": best.kld_mean, "kld_mean_low": best.kld.mean_low if best.kld else None,
                        "kld_mean_high": best.kld.mean_high if best.kld else None})
        if largest <= budget * GIB:
            break
    return out


def unresolved_pairs(rows: Sequence[ReportRow]) -> list[tuple[ReportRow, ReportRow]]:
    """Neighbours in KL order whose brackets overlap: the cache cannot tell which of the two is better."""
    ranked = sorted((r for r in rows if r.ok and r.kld is not None), key=lambda r: r.kld_mean or 0.0)
    return [(a, b) for a, b in zip(ranked, ranked[1:], strict=False)
            if brackets_overlap(a.kld.bracket, b.kld.bracket)]  # type: ignore[union-attr]


def suggested_coverage(a: ReportRow, b: ReportRow, epsilon: float) -> float | None:
    """An ε that would likely separate ``a`` (lower KL) from ``b``: the bracket width shrinks about in
    proportion to ε, so scale ε by half the gap over ``a``'s width. None when ``--full-vocab`` is the answer
    (the means are within 1e-3 of the width, or equal)."""
    low_a, high_a = a.kld.bracket  # type: ignore[union-attr]
    width = high_a - low_a
    gap = (b.kld_mean or 0.0) - (a.kld_mean or 0.0)
    if width <= 0 or gap <= 0 or not math.isfinite(width) or gap / width < 1e-3:
        return None
    value = epsilon * gap / width / 2
    exponent = math.floor(math.log10(value))
    return math.floor(value / 10**exponent) * 10**exponent


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _accuracy_cell(row: ReportRow, name: str) -> str:
    entry = row.accuracy.get(name)
    if entry is None:
        return "–"
    return f"{entry.accuracy:.3f} [{entry.ci95_low:.2f}, {entry.ci95_high:.2f}] p={_fmt(entry.mcnemar_p, 2)}"


def _kl_cell(row: ReportRow) -> str:
    if row.kld is None:
        return "–"
    low, high = row.kld.bracket
    return f"{_fmt(row.kld.mean)} [{_fmt(low)}, {_fmt(high)}]"


def _coverage_line(report: EvalReport) -> str:
    cov = report.coverage
    if cov.top_k is not None and cov.epsilon is None:
        return f"Reference cache: top-K = {cov.top_k} (report schema 1)."
    size = f", {_size(cov.cache_bytes)} ({_size(round(cov.cache_bytes_per_position))} a position)" \
        if cov.cache_bytes is not None and cov.cache_bytes_per_position is not None else ""
    if cov.full_vocab:
        return f"Reference cache: every token of {cov.n_positions} positions (--full-vocab){size}."
    cap = f"; {cov.positions_at_cap} positions hit the cap of {cov.max_tokens} tokens" if cov.positions_at_cap else ""
    whole = (f"; {cov.dense_positions} positions stored whole — their tail would pass the cap of {cov.max_tokens} "
             "tokens or half the vocabulary — with an exact KL there" if cov.dense_positions else "")
    return (f"Reference cache: coverage 1 - ε with ε = {_fmt(cov.epsilon, 2)} over {cov.n_positions} positions, "
            f"{_fmt(cov.mean_set_size, 4)} tokens kept a position on average (largest tail mass "
            f"{_fmt(cov.max_tail_mass, 2)}{cap}{whole}){size}.")


def _provenance_line(record: dict) -> str:
    llama = record.get("llama_cpp") or {}
    hardware = record.get("hardware") or {}
    gpus = ", ".join(hardware.get("gpus") or []) or "no GPU"
    return (f"Produced by medgemma-gguf {record.get('tool_version')} with llama-cpp-python "
            f"{llama.get('llama_cpp_python')} (ggml {llama.get('ggml_version')}, {llama.get('ggml_commit')}) on "
            f"{hardware.get('cpu')} ({gpus}), {record.get('threads')} threads, {record.get('created')}; input sha256s "
            "in report.json's provenance.")


def render_markdown(report: EvalReport) -> str:
    """The human-readable report: reference, coverage, slices, one table row per quant, whether the KL
    brackets settle the ranking, budget recommendations."""
    rows = report.rows
    ref = report.reference
    slice_names = [s["spec"] for s in report.slices]
    lines = ["# Quantization report", "",
             f"Reference: `{ref.get('source')}` ({ref.get('kind')}, {ref.get('dtype')}, sha256 "
             f"{str(ref.get('sha256'))[:12]}…).", "", _coverage_line(report), ""]
    if report.provenance:
        lines += [_provenance_line(report.provenance), ""]
    for part in report.slices:
        free = f" ({part['n_free_text']} free text, KL only)" if part.get("n_free_text") else ""
        own = f"; file {part['file']}, sha256 {part['sha256']}" if part.get("sha256") else ""
        lines.append(f"- slice `{part['spec']}`: {part['n_items']} items{free}, hash {part['hash'][:12]}…{own}")
    if report.heldout:
        lines.append(f"- held-out text: {report.heldout['n_chunks']} chunks")
    lines += ["", "KL in nats: mean [bracket]. The mean is exact over the stored tokens with the rest of the "
              "vocabulary lumped into one bucket (a lower bound); the true mean KL lies in the bracket, whose upper "
              "end is the largest KL any reference consistent with the cache could have. Per-position values with "
              f"|KL| < {ROUNDOFF_KL:g} are float64 round-off and are reported as 0. Same top = llama.cpp's \"Same top "
              "p\"; RMS Δp = llama.cpp's (the observed next token). Accuracy: value [95 % Wilson CI] and McNemar p "
              "vs the reference's answers.", ""]
    header = ["file", "type", "size", "bpw", "KL mean [bracket]", "KL p99", "same top", "RMS Δp", "PPL ratio",
              "image KL", *[f"acc {n}" for n in slice_names], "prompt t/s", "gen t/s", "error"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row.file, str(row.type or "–"), _size(row.bytes), _fmt(row.bpw, 3), _kl_cell(row),
                 _fmt(row.kld.p99 if row.kld else None), _fmt(row.top1_agreement),
                 _fmt(row.dp.rms if row.dp else None), _fmt(row.ppl_ratio),
                 _fmt(row.image_kld.mean if row.image_kld else None),
                 *[_accuracy_cell(row, n) for n in slice_names], _fmt(row.prompt_tps, 3), _fmt(row.gen_tps, 3),
                 (row.error or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = unresolved_pairs(rows)
    if pairs:
        epsilon = report.coverage.epsilon
        lines += ["", "## Ranking the coverage cannot settle", ""]
        for a, b in pairs:
            hint = "re-run with --full-vocab"
            if epsilon:
                suggestion = suggested_coverage(a, b, epsilon)
                if suggestion is not None:
                    hint = f"re-run with --coverage {suggestion:.0e} (or --full-vocab)"
            lines.append(f"- {a.file} and {b.file}: their KL brackets overlap, so which is better is not "
                         f"established at this coverage; {hint}")
    lines += ["", "## Best quant per memory budget", "",
              "Lowest mean KL among the quants whose text GGUF + mmproj fit the budget.", ""]
    recs = report.recommendations
    if not recs:
        lines.append("No quant was evaluated successfully.")
    for rec in recs:
        budget = rec["budget_gib"]
        label = f"{budget:g} GiB"
        lines.append(f"- best quant under {label}: **{rec['file']}** ({rec.get('type')}, {_size(rec['bytes'])}, "
                     f"mean KL {_fmt(rec['kld_mean'])})")
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["", "## Failed", ""] + [f"- {r.file}: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def render_csv(rows: Sequence[ReportRow], slice_names: Sequence[str]) -> str:
    """One line per quant: the main fields, then accuracy, CI and McNemar p per slice."""
    buffer = io.StringIO()
    acc_columns = [f"{kind}[{n}]" for n in slice_names for kind in ("accuracy", "ci95_low", "ci95_high", "mcnemar_p")]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *acc_columns])
    for row in rows:
        flat = row.to_json()
        values = [flat.get(column) for column in CSV_COLUMNS]
        for name in slice_names:
            entry = row.accuracy.get(name)
            values += [entry.accuracy, entry.ci95_low, entry.ci95_high, entry.mcnemar_p] if entry else [None] * 4
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def plot_pareto(rows: Sequence[ReportRow], path: Path) -> None:
    """Scatter of file size vs mean KL (log scale) with the brackets as error bars, generation speed as marker
    colour, quant type as label. matplotlib keeps its font cache under this package's cache root (README
    "Privacy"), not in ~/.config or ~/.cache, unless MPLCONFIGDIR says otherwise."""
    if "matplotlib" not in sys.modules:
        os.environ.setdefault("MPLCONFIGDIR", str(cache_root() / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    usable = [r for r in rows if r.ok]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        if usable:
            sizes = [(r.footprint_bytes or 0) / (1 << 20) for r in usable]
            kls = [max(float(r.kld_mean or 0.0), 1e-12) for r in usable]
            highs = [max(r.kld.bracket[1], kl) if r.kld else kl for r, kl in zip(usable, kls, strict=True)]
            speeds = [r.gen_tps or 0.0 for r in usable]
            finite = [min(h, 1e6) - kl for h, kl in zip(highs, kls, strict=True)]
            ax.errorbar(sizes, kls, yerr=[[0.0] * len(kls), finite], fmt="none", ecolor="grey", alpha=0.6, zorder=2)
            points = ax.scatter(sizes, kls, c=speeds, cmap="viridis", s=50, zorder=3)
            fig.colorbar(points, ax=ax, label="generation tokens/s")
            for size, kl, row in zip(sizes, kls, usable, strict=True):
                ax.annotate(str(row.type or row.file), (size, kl), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
            front = _pareto_front(list(zip(sizes, kls, strict=True)))
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", zorder=2, label="Pareto front")
            ax.set_yscale("log")
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no quant evaluated successfully", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("text GGUF + mmproj size (MiB)")
        ax.set_ylabel("mean KL vs reference (nats; bar: bracket)")
        ax.set_title("Quantization: size vs accuracy")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by a smaller-or-equal one with lower KL, sorted by size."""
    front: list[tuple[float, float]] = []
    best = math.inf
    for size, kl in sorted(points):
        if kl < best:
            front.append((size, kl))
            best = kl
    return front


def write_report(report: EvalReport, outdir: Path, force: bool = False) -> list[Path]:
    """Write the four report files into ``outdir`` together (all or none); sets ``report.recommendations``."""
    outdir = Path(outdir)
    report.recommendations = recommendations(report.rows)
    slice_names = [s["spec"] for s in report.slices]
    finals = [outdir / name for name in REPORT_FILES]
    with StagedOutputs(force=force) as staged:
        json_tmp, md_tmp, csv_tmp, png_tmp = (staged.stage(p) for p in finals)
        json_tmp.write_text(report.dumps(), encoding="utf-8")
        md_tmp.write_text(render_markdown(report), encoding="utf-8")
        csv_tmp.write_text(render_csv(report.rows, slice_names), encoding="utf-8")
        plot_pareto(report.rows, png_tmp)
        staged.commit()
    return finals
