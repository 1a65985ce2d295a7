"""Write the evaluation report: ``report.json``, ``report.md``, ``report.csv`` and ``pareto.png``.

All four files are staged under temporary names and renamed together when every one is complete
(``medgemma_gguf.atomic.StagedOutputs``), so a failed run leaves the folder as it was.

The per-budget recommendation: for each memory budget (GiB), the quant with the lowest mean KL among the
successful rows whose files — the text GGUF plus its mmproj, what must be loaded to run it — fit in it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import StagedOutputs

GIB = 1 << 30
BUDGETS_GIB = (0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80)
REPORT_FILES = ("report.json", "report.md", "report.csv", "pareto.png")
CSV_COLUMNS = ("file", "type", "bytes", "bpw", "kld_mean", "kld_median", "kld_p90", "kld_p99", "kld_p999",
               "kld_max", "kld_upper_mean", "top1_agreement", "rms_dp", "rms_dp_top", "ppl_ratio",
               "image_kld_mean", "image_kld_p99", "image_kld_upper_mean", "image_top1_agreement", "prompt_tps",
               "gen_tps", "image_encode_s", "peak_rss_bytes", "mmproj", "mmproj_bytes", "error")


def footprint_bytes(row: dict[str, Any]) -> int | None:
    """Bytes that must be loaded to run the row's quant: the text GGUF plus its mmproj."""
    if row.get("bytes") is None:
        return None
    return int(row["bytes"]) + int(row.get("mmproj_bytes") or 0)


def recommendations(rows: Sequence[dict[str, Any]], budgets_gib: Sequence[float] = BUDGETS_GIB) -> list[dict[str, Any]]:
    """Per budget, the successful row with the lowest ``kld_mean`` that fits; budgets after the first one
    that fits every row are left out (they would repeat it), as are budgets nothing fits."""
    usable = [r for r in rows if not r.get("error") and r.get("kld_mean") is not None and footprint_bytes(r)]
    if not usable:
        return []
    largest = max(footprint_bytes(r) or 0 for r in usable)
    out = []
    for budget in budgets_gib:
        fitting = [r for r in usable if (footprint_bytes(r) or 0) <= budget * GIB]
        if fitting:
            best = min(fitting, key=lambda r: (r["kld_mean"], footprint_bytes(r)))
            out.append({"budget_gib": budget, "file": best["file"], "type": best.get("type"),
                        "bytes": footprint_bytes(best), "kld_mean": best["kld_mean"]})
        if largest <= budget * GIB:
            break
    return out


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


def _accuracy_cell(row: dict[str, Any], name: str) -> str:
    entry = (row.get("accuracy") or {}).get(name)
    if not entry:
        return "–"
    return f"{entry['accuracy']:.3f} [{entry['ci95_low']:.2f}, {entry['ci95_high']:.2f}] p={entry['mcnemar_p']:.2g}"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: reference, slices, one table row per quant, budget recommendations."""
    rows = report["rows"]
    ref = report["reference"]
    slice_names = [s["spec"] for s in report.get("slices", [])]
    lines = ["# Quantization report", "",
             f"Reference: `{ref.get('source')}` ({ref.get('kind')}, {ref.get('dtype')}, sha256 "
             f"{str(ref.get('sha256'))[:12]}…); top-K = {report.get('top_k')}.", ""]
    for part in report.get("slices", []):
        lines.append(f"- slice `{part['spec']}`: {part['n_items']} items, hash {part['hash'][:12]}…")
    if report.get("heldout"):
        lines.append(f"- held-out text: {report['heldout']['n_chunks']} chunks")
    lines += ["", "KL in nats (estimate = top-K exact + lumped tail, a lower bound; the upper bound is in "
              "report.json). Accuracy: value [95 % Wilson CI] and McNemar p vs the reference's answers.", ""]
    header = ["file", "type", "size", "bpw", "KL mean", "KL p99", "KL upper", "top-1", "PPL ratio", "image KL",
              *[f"acc {n}" for n in slice_names], "prompt t/s", "gen t/s", "error"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row["file"], str(row.get("type") or "–"), _size(row.get("bytes")), _fmt(row.get("bpw"), 3),
                 _fmt(row.get("kld_mean")), _fmt(row.get("kld_p99")), _fmt(row.get("kld_upper_mean")),
                 _fmt(row.get("top1_agreement")), _fmt(row.get("ppl_ratio")), _fmt(row.get("image_kld_mean")),
                 *[_accuracy_cell(row, n) for n in slice_names], _fmt(row.get("prompt_tps"), 3),
                 _fmt(row.get("gen_tps"), 3), (row.get("error") or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Best quant per memory budget", "",
              "Lowest mean KL among the quants whose text GGUF + mmproj fit the budget.", ""]
    recs = report.get("recommendations") or []
    if not recs:
        lines.append("No quant was evaluated successfully.")
    for rec in recs:
        budget = rec["budget_gib"]
        label = f"{budget:g} GiB"
        lines.append(f"- best quant under {label}: **{rec['file']}** ({rec.get('type')}, {_size(rec['bytes'])}, "
                     f"mean KL {_fmt(rec['kld_mean'])})")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "## Failed", ""] + [f"- {r['file']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def render_csv(rows: Sequence[dict[str, Any]], slice_names: Sequence[str]) -> str:
    """One line per quant: the main fields, then accuracy, CI and McNemar p per slice."""
    buffer = io.StringIO()
    acc_columns = [f"{kind}[{n}]" for n in slice_names for kind in ("accuracy", "ci95_low", "ci95_high", "mcnemar_p")]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *acc_columns])
    for row in rows:
        values = [row.get(column) for column in CSV_COLUMNS]
        for name in slice_names:
            entry = (row.get("accuracy") or {}).get(name) or {}
            values += [entry.get("accuracy"), entry.get("ci95_low"), entry.get("ci95_high"), entry.get("mcnemar_p")]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Scatter of file size vs mean KL (log scale), generation speed as marker colour, quant type as label."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    usable = [r for r in rows if not r.get("error") and r.get("kld_mean") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        if usable:
            sizes = [(footprint_bytes(r) or 0) / (1 << 20) for r in usable]
            kls = [max(float(r["kld_mean"]), 1e-12) for r in usable]
            speeds = [r.get("gen_tps") or 0.0 for r in usable]
            points = ax.scatter(sizes, kls, c=speeds, cmap="viridis", s=50, zorder=3)
            fig.colorbar(points, ax=ax, label="generation tokens/s")
            for size, kl, row in zip(sizes, kls, usable, strict=True):
                ax.annotate(str(row.get("type") or row["file"]), (size, kl), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
            front = _pareto_front(list(zip(sizes, kls, strict=True)))
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", zorder=2, label="Pareto front")
            ax.set_yscale("log")
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no quant evaluated successfully", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("text GGUF + mmproj size (MiB)")
        ax.set_ylabel("mean KL vs reference (nats)")
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


def _json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python numbers, NaN/inf to null, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict[str, Any], outdir: Path, force: bool = False) -> list[Path]:
    """Write the four report files into ``outdir`` together (all or none)."""
    outdir = Path(outdir)
    report = dict(report)
    report["recommendations"] = recommendations(report["rows"])
    slice_names = [s["spec"] for s in report.get("slices", [])]
    finals = [outdir / name for name in REPORT_FILES]
    with StagedOutputs(force=force) as staged:
        json_tmp, md_tmp, csv_tmp, png_tmp = (staged.stage(p) for p in finals)
        json_tmp.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        md_tmp.write_text(render_markdown(report), encoding="utf-8")
        csv_tmp.write_text(render_csv(report["rows"], slice_names), encoding="utf-8")
        plot_pareto(report["rows"], png_tmp)
        staged.commit()
    return finals
