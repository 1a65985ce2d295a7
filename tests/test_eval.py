"""The quant evaluation end to end on the tiny ``mm-k256`` checkpoint: reference (HF and GGUF), its cache,
per-quant metrics, failures that stay per quant, and the report files."""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medgemma_gguf import hashing
from medgemma_gguf.errors import UserError
from medgemma_gguf.hashing import cached_file_sha256
from medgemma_gguf.quant_eval import reference as reference_module
from medgemma_gguf.quant_eval.evaluate import Candidate, EvalOptions, candidates_from_paths, run_eval
from medgemma_gguf.quant_eval.metrics import cover_from_logits
from medgemma_gguf.quant_eval.reference import (
    CoverageSpec,
    GGUFReference,
    HFReference,
    ReferenceCache,
    ReferencePart,
    coverage_summary,
    open_reference,
    reference_parts,
)
from medgemma_gguf.quant_eval.report import GIB, recommendations, write_report
from medgemma_gguf.quant_eval.slices import load_heldout_text, load_slice
from medgemma_gguf.report_schema import EvalReport, KLStats, ReportRow

SLICES = ["medqa-mini:5", "vqa-mini:3"]
VARIANT = "mm-k256"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One reference cache for the module: the HF and GGUF references are each computed once."""
    return tmp_path_factory.mktemp("reference-cache")


def _quantize(source: Path, target: Path, ftype: int) -> Path:
    """A test quant made with llama.cpp's own quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    assert status == 0 and target.is_file()
    return target


@pytest.fixture(scope="module")
def quant_folder(tmp_path_factory, converted) -> Path:
    """F32, Q8_0, Q4_K_M and Q2_K of mm-k256 side by side with the F32 mmproj (no manifest)."""
    import llama_cpp

    result = converted(VARIANT)
    folder = tmp_path_factory.mktemp("quants")
    shutil.copy(result.text_path, folder / "tiny-F32.gguf")
    shutil.copy(result.mmproj_path, folder / "mmproj-tiny-F32.gguf")
    for name, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
                        ("Q2_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K)):
        _quantize(result.text_path, folder / f"tiny-{name}.gguf", ftype)
    return folder


def _rows_by_type(report: EvalReport) -> dict[str, ReportRow]:
    return {row.type: row for row in report.rows}


# ---------------------------------------------------------------------------------------------- accuracy


def test_f32_gguf_agrees_with_hf_reference(tiny_checkpoint, converted, cache_dir, tmp_path):
    """Consistency with the converter: the F32 GGUF scored against transformers (f32) is the same model."""
    folder = tiny_checkpoint(VARIANT)
    report = run_eval([converted(VARIANT).text_path.parent], str(folder), tmp_path / "report",
                      EvalOptions(slices=SLICES, reference_dtype="f32", cache_dir=cache_dir, progress=False))
    (row,) = report.rows
    assert row.error is None and row.type == "F32"
    assert row.kld.mean <= 1e-5 and row.image_kld.mean <= 1e-5
    assert row.image_kld.n > 0 and row.kld.n > row.image_kld.n
    for spec in SLICES:
        assert row.parts[spec].top1_agreement == 1.0
        accuracy = row.accuracy[spec]
        assert accuracy.only_quant_right == accuracy.only_reference_right == 0
        assert accuracy.accuracy == accuracy.reference_accuracy
        assert accuracy.ci95_low <= accuracy.accuracy <= accuracy.ci95_high
    # near-ties (|Δ ln p| ~ 1e-4) in held-out prose may flip between float32 implementations
    assert row.top1_agreement >= 0.999
    assert abs(row.ppl_ratio - 1.0) <= 1e-3
    assert row.dp.rms <= 1e-3
    assert row.kld.mean_high >= row.kld.mean == row.kld.mean_low
    assert report.reference["kind"] == "hf" and report.reference["dtype"] == "f32"


def test_quants_rank_by_precision_and_report_files_parse(tiny_checkpoint, quant_folder, cache_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    targets = sorted(p for p in quant_folder.glob("*.gguf"))  # includes the mmproj, which is skipped
    report = run_eval(targets, str(tiny_checkpoint(VARIANT)), out, EvalOptions(slices=SLICES, reference_dtype="f32",
                                                                               cache_dir=cache_dir, progress=False))
    rows = _rows_by_type(report)
    assert set(rows) == {"F32", "Q8_0", "Q4_K_M", "Q2_K"}
    assert all(row.error is None for row in rows.values())
    order = ("F32", "Q8_0", "Q4_K_M", "Q2_K")
    for name, value in (("kld", lambda r: r.kld.mean), ("image_kld", lambda r: r.image_kld.mean),
                        ("kld_p99", lambda r: r.kld.p99)):
        values = [value(rows[t]) for t in order]
        assert values == sorted(values) and len(set(values)) == 4, name
    assert rows["F32"].bpw > rows["Q8_0"].bpw > rows["Q4_K_M"].bpw > rows["Q2_K"].bpw
    assert abs(rows["Q8_0"].ln_ppl_ratio) < abs(rows["Q2_K"].ln_ppl_ratio)
    assert all(row.prompt_tps > 0 and row.gen_tps > 0 and row.image_encode_s > 0 for row in rows.values())
    assert all(row.peak_rss_bytes is None or row.peak_rss_bytes > row.bytes for row in rows.values())
    for row in rows.values():
        assert row.kld.mean_low == row.kld.mean <= row.kld.mean_high
        assert row.kld.min <= row.kld.median <= row.kld.p90 <= row.kld.p99 <= row.kld.max
        assert 0.0 <= row.top1_agreement_stderr < 0.1 and row.dp.rms_stderr >= 0.0

    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == 2
    assert data["coverage"]["epsilon"] == 1e-4 and data["coverage"]["mean_set_size"] >= 16
    assert data["coverage"]["cache_bytes_per_position"] > 0
    required = {"file", "type", "bytes", "bpw", "kld_mean", "kld_mean_low", "kld_mean_high", "kld_p99",
                "top1_agreement", "ppl_ratio", "image_kld_mean", "rms_dp", "accuracy", "prompt_tps", "gen_tps"}
    assert all(required <= set(row) for row in data["rows"])
    assert EvalReport.load(out / "report.json").to_json() == data  # the typed record round-trips
    assert set(data["rows"][0]["accuracy"]) == set(SLICES)
    assert data["recommendations"][0]["file"] == "tiny-F32.gguf"  # everything fits; F32 has the lowest KL
    with open(out / "report.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert sorted(r["type"] for r in csv_rows) == sorted(rows)
    q2_line = next(r for r in csv_rows if r["type"] == "Q2_K")
    assert float(q2_line["kld_mean"]) == pytest.approx(rows["Q2_K"].kld.mean)
    assert float(q2_line["kld_mean_high"]) == pytest.approx(rows["Q2_K"].kld.mean_high)
    assert float(q2_line["accuracy[medqa-mini:5]"]) == rows["Q2_K"].accuracy["medqa-mini:5"].accuracy
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "pareto.png") as image:
        assert image.format == "PNG" and image.width > 100
    markdown = (out / "report.md").read_text()
    assert "best quant under" in markdown and "tiny-Q2_K.gguf" in markdown
    assert "coverage 1 - ε with ε = 1.0e-04" in markdown and "round-off" in markdown


def test_bf16_hf_reference_is_cached_apart_from_f32(tiny_checkpoint, converted, tmp_path):
    from medgemma_gguf.quant_eval.evaluate import evaluate_candidate, load_slices

    folder = str(tiny_checkpoint(VARIANT))
    (medqa,) = load_slices(["medqa-mini"], max_items=2)
    assert medqa.spec == "medqa-mini:2" and len(medqa) == 2
    cache = ReferenceCache(tmp_path / "cache")
    parts = {}
    for dtype in ("bf16", "f32"):
        reference = open_reference(folder, cache_dir=cache.cache_dir, dtype=dtype)
        assert reference.describe()["dtype"] == dtype
        parts[dtype] = reference_parts(reference, cache, heldout=load_heldout_text()[:2], slices=[medqa],
                                       coverage=CoverageSpec.make(1e-3))
        reference.close()
    assert cache.misses == 4 and len(list(cache.cache_dir.rglob("*.npz"))) == 4
    bf16, f32 = parts["bf16"][0], parts["f32"][0]
    np.testing.assert_array_equal(bf16.seq_tokens, f32.seq_tokens)  # same positions, different precision
    assert not np.array_equal(bf16.dist.logits, f32.dist.logits)
    row = evaluate_candidate(Candidate(converted(VARIANT).text_path), parts["bf16"], {medqa.spec: medqa},
                             reference.signature, image_size=0, measure_speed=False)
    # the F32 GGUF differs from a bf16 reference by bf16 rounding only: small, but not float32-small
    assert 1e-7 < row.kld.mean < 1e-2 and row.top1_agreement >= 0.9


def test_gguf_reference_scores_itself_as_identical(converted, cache_dir, tmp_path):
    result = converted(VARIANT)
    report = run_eval([result.text_path], str(result.text_path), tmp_path / "r",
                      EvalOptions(slices=SLICES, cache_dir=cache_dir, progress=False, measure_speed=False))
    (row,) = report.rows
    assert report.reference["kind"] == "gguf" and report.reference["mmproj"].endswith("F32.gguf")
    assert row.kld.max == 0.0 and row.image_kld.max == 0.0  # identical logits: exactly 0, not -1e-10
    # rows stored whole are exact; a covered row's bracket still says what the cache cannot rule out
    cov = report.coverage
    assert 0 < cov.dense_positions <= cov.n_positions  # the tiny model's flat rows: most are stored whole
    assert row.kld.mean_high == 0.0 if cov.dense_positions == cov.n_positions else row.kld.mean_high > 0.0
    assert row.top1_agreement == 1.0 and row.ppl_ratio == 1.0 and row.dp.rms == 0.0
    assert row.prompt_tps is None  # speed skipped


# ---------------------------------------------------------------------------------------------- the cache


@pytest.fixture()
def compute_counter(monkeypatch):
    """Counts Reference.compute_part calls by part name."""
    calls: list[str] = []
    original = reference_module.Reference.compute_part

    def counting(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(reference_module.Reference, "compute_part", counting)
    return calls


def _gguf_parts(path: Path, cache: ReferenceCache, slices: list[str]) -> list[ReferencePart]:
    reference = open_reference(str(path), cache_dir=cache.cache_dir)
    try:
        return reference_parts(reference, cache, heldout=load_heldout_text()[:3],
                               slices=[load_slice(s) for s in slices])
    finally:
        reference.close()


def test_reference_cache_is_reused_and_a_changed_slice_recomputes(converted, tmp_path, compute_counter):
    text_path = converted(VARIANT).text_path
    cache = ReferenceCache(tmp_path / "cache")
    first = _gguf_parts(text_path, cache, SLICES)
    assert compute_counter == ["heldout", *SLICES]
    second = _gguf_parts(text_path, cache, SLICES)
    assert compute_counter == ["heldout", *SLICES]  # nothing recomputed
    assert cache.hits == 3
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.dist.ids, b.dist.ids)
        np.testing.assert_array_equal(a.dist.logits, b.dist.logits)
        np.testing.assert_array_equal(a.seq_tokens, b.seq_tokens)
        np.testing.assert_array_equal(a.option_logprobs, b.option_logprobs)
        assert b.dist.epsilon == 1e-4
    _gguf_parts(text_path, cache, ["medqa-mini:4", "vqa-mini:3"])
    assert compute_counter == ["heldout", *SLICES, "medqa-mini:4"]  # only the changed slice


def test_reference_cache_rejects_a_damaged_file_and_leaves_no_partial_file(converted, tmp_path, compute_counter,
                                                                           monkeypatch):
    text_path = converted(VARIANT).text_path
    cache = ReferenceCache(tmp_path / "cache")
    _gguf_parts(text_path, cache, ["medqa-mini:2"])
    files = sorted(cache.cache_dir.rglob("*.npz"))
    assert len(files) == 2
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    _gguf_parts(text_path, cache, ["medqa-mini:2"])
    assert compute_counter.count("medqa-mini:2") == 2
    assert ReferencePart.load(files[1]).n_sequences == 2  # rewritten whole

    def failing_write(handle, arrays, stored=()):
        handle.write(b"half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reference_module, "_write_npz", failing_write)
    _gguf_parts(text_path, cache, ["medqa-mini:3"])  # still returns the parts, but caches nothing
    leftovers = [p.name for p in cache.cache_dir.rglob("*") if p.is_file() and "medqa-mini_3" in p.name
                 or p.name.endswith(".partial")]
    assert leftovers == []


def test_file_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"a" * 1000)
    calls: list[Path] = []
    original = hashing.sha256_of
    monkeypatch.setattr(hashing, "sha256_of", lambda p: calls.append(p) or original(p))
    first = cached_file_sha256(target, tmp_path / "cache")
    assert cached_file_sha256(target, tmp_path / "cache") == first and len(calls) == 1
    target.write_bytes(b"b" * 1000)  # same size; mtime changes
    import os

    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cached_file_sha256(target, tmp_path / "cache") != first and len(calls) == 2


# ---------------------------------------------------------------------------------------------- bad inputs


def test_bad_quants_get_error_rows_and_the_rest_is_evaluated(converted, cache_dir, tmp_path):
    good = converted(VARIANT).text_path
    other_model = converted("mm-deep").text_path
    garbage = tmp_path / "garbage-Q4_K_M.gguf"
    garbage.write_bytes(b"this is not a model" * 10)
    truncated = tmp_path / "truncated-Q8_0.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    candidates = [other_model, garbage, good, truncated]
    report = run_eval(candidates, str(good), tmp_path / "r",
                      EvalOptions(slices=SLICES, cache_dir=cache_dir, reference_mmproj=converted(VARIANT).mmproj_path,
                                  progress=False, measure_speed=False))
    rows = {row.file: row for row in report.rows}
    assert [row.file for row in report.rows] == [p.name for p in candidates]
    assert "another model than the reference" in rows[other_model.name].error
    assert "n_embd 64 vs reference 256" in rows[other_model.name].error
    assert "not a GGUF file" in rows[garbage.name].error
    assert rows[truncated.name].error
    assert rows[good.name].error is None and rows[good.name].kld.mean == 0.0
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "## Failed" in markdown and garbage.name in markdown.split("## Failed")[1]
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [r["kld_mean"] is None for r in data["rows"]] == [True, True, False, True]
    assert [rec["file"] for rec in data["recommendations"]] == [good.name]


def test_empty_slice_is_a_clear_error_and_nothing_is_written(converted, cache_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "r"
    with pytest.raises(UserError, match="holds no items"):
        run_eval([converted(VARIANT).text_path], str(converted(VARIANT).text_path), out,
                 EvalOptions(slices=[str(empty)], cache_dir=cache_dir, progress=False))
    assert not out.exists() or not any(out.iterdir())


def test_bad_reference_and_options_are_clear_errors(converted, quant_folder, tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    text = converted(VARIANT).text_path
    with pytest.raises(UserError, match="must be unquantized"):
        open_reference(str(quant_folder / "tiny-Q4_K_M.gguf"), cache_dir=cache)
    with pytest.raises(UserError, match="f16 overflows"):
        HFReference(str(tiny_checkpoint(VARIANT)), cache, dtype="f16")
    with pytest.raises(UserError, match="max_items must be at least 1"):
        run_eval([text], str(text), tmp_path / "r", EvalOptions(slices=SLICES, cache_dir=cache, max_items=0,
                                                                progress=False))
    with pytest.raises(UserError, match=r"coverage must be a probability in \(0, 0.5\)") as info:
        run_eval([text], str(text), tmp_path / "r", EvalOptions(slices=SLICES, cache_dir=cache, coverage=0.7,
                                                                progress=False))
    assert "--coverage must be" in info.value.for_cli() and "--full-vocab" in info.value.for_cli()
    with pytest.raises(UserError, match="full_vocab=True keeps every token; drop coverage"):
        run_eval([text], str(text), tmp_path / "r", EvalOptions(slices=SLICES, cache_dir=cache, coverage=1e-4,
                                                                full_vocab=True, progress=False))
    # a GGUF reference without an mmproj cannot answer image questions
    lone = tmp_path / "lone" / "tiny-F32.gguf"
    lone.parent.mkdir()
    shutil.copy(text, lone)
    reference = open_reference(str(lone), cache_dir=cache)
    assert isinstance(reference, GGUFReference) and not reference.has_vision
    with pytest.raises(UserError, match="has images but the reference has no vision"):
        reference_parts(reference, ReferenceCache(cache), heldout=[], slices=[load_slice("vqa-mini:1")])
    # an existing report is not overwritten without force
    out = tmp_path / "existing"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        run_eval([text], str(text), out, EvalOptions(slices=SLICES, cache_dir=cache, progress=False))
    assert (out / "report.json").read_text() == "{}"


def test_candidates_from_a_folder_use_its_manifest_and_mmproj(converted):
    result = converted(VARIANT)
    (candidate,) = candidates_from_paths([result.text_path.parent])
    assert candidate == Candidate(result.text_path, result.mmproj_path, "F32")
    with pytest.raises(UserError, match="does not exist"):
        candidates_from_paths([result.text_path.parent / "missing"])
    with pytest.raises(UserError, match="has no manifest.json and no .gguf files"):
        candidates_from_paths([result.text_path.parent.parent])


# ---------------------------------------------------------------------------------------------- report


def _row(file: str, size_gib: float, kld: float | None, error: str | None = None, **fields) -> ReportRow:
    values = {"file": file, "type": file, "bytes": int(size_gib * GIB), "mmproj_bytes": 0, "error": error,
              "kld": KLStats(mean=kld, mean_low=kld, mean_high=kld * 1.01) if kld is not None else None}
    return ReportRow(**(values | fields))


def test_recommendations_pick_the_lowest_kl_that_fits_each_budget():
    rows = [_row("Q2", 1.5, 0.3), _row("Q4", 3.0, 0.05), _row("Q3", 2.5, 0.1), _row("Q8", 7.0, 0.002),
            _row("BAD", 0.2, None, error="not a GGUF")]
    recs = recommendations(rows)
    assert [(r["budget_gib"], r["file"]) for r in recs] == [(2, "Q2"), (4, "Q4"), (8, "Q8")]
    mmproj_row = _row("Q4m", 3.5, 0.01, mmproj_bytes=int(0.6 * GIB))  # 4.1 GiB with its mmproj
    assert [r["file"] for r in recommendations([mmproj_row, *rows]) if r["budget_gib"] == 4] == ["Q4"]
    assert recommendations([rows[-1]]) == []


def test_default_coverage_is_chosen_per_model_and_explicit_settings_win():
    from medgemma_gguf.quant_eval.metrics import DEFAULT_COVERAGE
    from medgemma_gguf.quant_eval.reference import MODEL_COVERAGE, ModelSignature, model_coverage

    medgemma = ModelSignature("gemma3", 262208, 2560, 34)
    other = ModelSignature("llama", 32000, 4096, 32)
    assert model_coverage(medgemma) == MODEL_COVERAGE[("gemma3", 262208)] < DEFAULT_COVERAGE
    assert model_coverage(other) == model_coverage(None) == DEFAULT_COVERAGE
    assert CoverageSpec.make(model=medgemma).epsilon == MODEL_COVERAGE[("gemma3", 262208)]
    assert CoverageSpec.make(model=other) == CoverageSpec.make() == CoverageSpec()
    assert CoverageSpec.make(1e-3, model=medgemma).epsilon == 1e-3  # an explicit --coverage wins
    assert CoverageSpec.make(None, True, model=medgemma).full_vocab


def test_report_says_which_ranking_the_brackets_cannot_settle_and_what_would():
    from medgemma_gguf.quant_eval.report import render_markdown, suggested_coverage, unresolved_pairs
    from medgemma_gguf.report_schema import Coverage

    def row(name: str, mean: float, high: float) -> ReportRow:
        return dataclasses.replace(_row(name, 3.0, mean), kld=KLStats(mean=mean, mean_low=mean, mean_high=high))

    q4_k_m, q4_k_s = row("Q4_K_M", 0.0200, 0.0230), row("Q4_K_S", 0.0210, 0.0240)  # 5 % apart, 15 % wide
    q8_a, q8_b = row("Q8_0", 0.00040, 0.0030), row("Q8_0-b", 0.00040, 0.0031)  # equal means: only every token
    q2 = row("Q2_K", 0.2, 0.21)  # far apart from the others: settled
    assert unresolved_pairs([q2, q4_k_m, q8_a, q4_k_s, q8_b]) == [(q8_a, q8_b), (q4_k_m, q4_k_s)]
    # the width shrinks about in proportion to ε: half the gap over the width, rounded down
    assert suggested_coverage(q4_k_m, q4_k_s, 1e-4) == pytest.approx(1e-5)
    assert suggested_coverage(q8_a, q8_b, 1e-4) is None
    report = EvalReport(reference={"source": "x", "kind": "gguf", "dtype": "f32", "sha256": "0" * 64},
                        coverage=Coverage(epsilon=1e-4, n_positions=10), rows=[q2, q4_k_m, q4_k_s, q8_a, q8_b])
    text = render_markdown(report)
    assert "## Ranking the coverage cannot settle" in text
    assert "Q4_K_M and Q4_K_S: their KL brackets overlap" in text and "--coverage 1e-05 (or --full-vocab)" in text
    assert "Q8_0 and Q8_0-b: their KL brackets overlap" in text and "re-run with --full-vocab" in text
    assert "Q2_K and" not in text and "0.0200 [0.0200, 0.0230]" in text
    settled = EvalReport(reference=report.reference, coverage=report.coverage, rows=[q2, q4_k_m])
    assert "cannot settle" not in render_markdown(settled)


def test_report_writes_all_files_or_none(tmp_path, monkeypatch):
    from medgemma_gguf.quant_eval import report as report_module

    report = EvalReport(reference={"source": "x", "kind": "gguf", "dtype": "f32", "sha256": "0" * 64},
                        rows=[_row("Q4", 1.0, 0.05, bpw=4.5)])

    def broken_plot(rows, path):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_module, "plot_pareto", broken_plot)
    with pytest.raises(RuntimeError):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_cli_eval_command(converted, cache_dir, tmp_path):
    from click.testing import CliRunner

    from medgemma_gguf.quant_eval.cli import eval_command

    result = converted(VARIANT)
    out = tmp_path / "report"
    args = [str(result.text_path.parent), "--reference", str(result.text_path), "--slice", ",".join(SLICES),
            "--out", str(out), "--cache-dir", str(cache_dir), "--coverage", "1e-4", "--no-speed", "--quiet"]
    run = CliRunner().invoke(eval_command, args)
    assert run.exit_code == 0, run.output
    assert "mean KL" in run.output and "KiB a position" in run.output and (out / "report.md").is_file()
    again = CliRunner().invoke(eval_command, args)
    assert isinstance(again.exception, UserError) and "already exists" in str(again.exception)
    forced = CliRunner().invoke(eval_command, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    data = json.loads((out / "report.json").read_text())
    assert data["cache"] == {"dir": str(cache_dir), "hits": 3, "misses": 0, "stale_removed": 0}  # not rerun


# ---------------------------------------------------------------------------------------------- exactness


def test_cache_kl_equals_full_vocabulary_kl_within_the_bracket(converted, quant_folder, tmp_path):
    """On a tiny model, the KL from a coverage cache brackets the KL from every logit (llama.cpp's method)."""
    from medgemma_gguf.quant_eval.evaluate import _score_part
    from medgemma_gguf.runtime.engine import Engine

    text = converted(VARIANT).text_path
    cache = ReferenceCache(tmp_path / "cache")
    reference = open_reference(str(text), cache_dir=cache.cache_dir, n_threads=1)
    chunks = load_heldout_text()[:2]
    try:
        (full,) = reference_parts(reference, cache, heldout=chunks, slices=[], coverage=CoverageSpec.make(None, True))
        # the tiny model's rows are flat: most are stored whole at a small ε; take the smallest ε of these that
        # still leaves some rows covered (with a tail), so both kinds are checked
        logits = full.dist.logits.reshape(full.dist.n_positions, -1)
        epsilon = next(e for e in (0.05, 0.1, 0.2, 0.4) if not cover_from_logits(logits, e).dense_rows.all())
        (covered,) = reference_parts(reference, cache, heldout=chunks, slices=[], coverage=CoverageSpec.make(epsilon))
    finally:
        reference.close()
    assert full.dist.dense and not covered.dist.dense
    assert np.all(covered.dist.tail_mass <= epsilon + 1e-12) and covered.dist.tail_mass.max() > 0.001
    assert covered.dist.set_sizes.mean() < full.dist.set_sizes.mean()
    with Engine(quant_folder / "tiny-Q4_K_M.gguf", None, n_ctx=768, n_threads=1) as engine:
        exact = _score_part(engine, full, None, 0, progress=False)
        bracket = _score_part(engine, covered, None, 0, progress=False)
    np.testing.assert_array_equal(exact.kl, exact.kl_upper)  # every logit: no bracket
    whole = covered.dist.dense_rows  # rows stored whole: the same exact KL
    np.testing.assert_allclose(bracket.kl[whole], exact.kl[whole], rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(bracket.kl[whole], bracket.kl_upper[whole])
    slack = 1e-9 + 1e-12 * exact.kl
    assert np.all(bracket.kl <= exact.kl + slack) and np.all(exact.kl <= bracket.kl_upper + slack)
    assert bracket.kl.mean() <= exact.kl.mean() <= bracket.kl_upper.mean()
    # the coarsened estimate misses only P_T (<= 0.05 here) times the KL between the two normalised tails
    assert bracket.kl.mean() == pytest.approx(exact.kl.mean(), rel=0.1)


def _write_format_1_part(path: Path, part: ReferencePart) -> None:
    """A cache file as the first release wrote it: top-K log-probabilities and tail mass, cache_format 1."""
    k = 8
    ids = np.stack([part.dist.row(n)[0][:k] for n in range(part.dist.n_positions)]).astype(np.int32)
    lps = np.stack([part.dist.row(n)[1][:k] for n in range(part.dist.n_positions)]).astype(np.float32)
    arrays = {name: getattr(part, name) for name in reference_module._ARRAY_FIELDS}
    arrays.update(topk_ids=ids, topk_logprobs=lps, topk_tail=1 - np.exp(lps.astype(np.float64)).sum(axis=1))
    arrays["meta_json"] = np.array(json.dumps({"name": part.name, "kind": part.kind, "key": part.key, "top_k": k,
                                               "cache_format": 1}))
    np.savez_compressed(path, **arrays)


def test_old_format_cache_is_refused_with_a_clear_message_and_recomputed(converted, tmp_path, compute_counter,
                                                                          caplog):
    text_path = converted(VARIANT).text_path
    cache = ReferenceCache(tmp_path / "cache")
    (part,) = _gguf_parts(text_path, cache, ["medqa-mini:2"])[1:]
    current = next(p for p in cache.cache_dir.rglob("medqa-mini_2-*.npz"))
    old = current.with_name("medqa-mini_2-0123456789abcdef.npz")  # a format-1 key: another file name
    _write_format_1_part(old, part)
    with pytest.raises(reference_module.StaleCacheError, match=r"cache format 1 .*top-K.*delete the file, or run"):
        ReferencePart.load(old)
    # the same key's file in the old format (e.g. written by a build that did not bump the version) is recomputed
    _write_format_1_part(current, part)
    calls_before = compute_counter.count("medqa-mini:2")
    with caplog.at_level("WARNING"):
        (again,) = _gguf_parts(text_path, cache, ["medqa-mini:2"])[1:]
    assert compute_counter.count("medqa-mini:2") == calls_before + 1
    assert not old.exists() and cache.stale_removed == 1
    assert "cache format 1" in caplog.text and "recomput" in caplog.text
    assert ReferencePart.load(current).dist.epsilon == 1e-4  # rewritten in the current format
    np.testing.assert_array_equal(again.dist.logits, part.dist.logits)


def _synthetic_part(dist) -> ReferencePart:
    """A one-sequence text part around ``dist`` (the arrays the cache stores; no model needed)."""
    n = dist.n_positions
    return ReferencePart(
        name="heldout", kind="text", key="k" * 64, seq_tokens=np.arange(n + 1, dtype=np.int32),
        seq_offsets=np.array([0, n + 1]), image_start=np.array([-1], dtype=np.int32),
        image_end=np.array([-1], dtype=np.int32), seq_item=np.array([-1], dtype=np.int32),
        pos_seq=np.zeros(n, dtype=np.int32), pos_token=np.arange(n, dtype=np.int32),
        after_image=np.zeros(n, dtype=bool), next_token=np.arange(1, n + 1, dtype=np.int32),
        next_logprob=np.full(n, -1.0), dist=dist, item_ids=np.array([], dtype=np.str_),
        answer_index=np.zeros(0, dtype=np.int32), option_tokens=np.zeros((0, 0), dtype=np.int32),
        option_logprobs=np.zeros((0, 0)), meta={"coverage": {"epsilon": 1e-3, "min_tokens": 16, "max_tokens": 64}})


def test_cache_round_trip_keeps_rows_stored_whole_and_covered_rows_bit_exact(tmp_path):
    import zipfile

    rng = np.random.default_rng(3)
    flat = rng.normal(size=(3, 300)) * 0.1  # stored whole
    peaked = rng.permutation(-0.5 * np.arange(300))[None].repeat(3, axis=0)  # covered
    logits = np.concatenate([flat, peaked])[[0, 3, 1, 4, 2, 5]].astype(np.float32)
    dist = cover_from_logits(logits, 1e-3, max_tokens=64)
    assert dist.dense_rows.tolist() == [True, False] * 3
    part = _synthetic_part(dist)
    path = tmp_path / "heldout-part.npz"
    part.save(path)
    back = ReferencePart.load(path)
    for name in ("offsets", "ids", "logits", "lse", "tail_mass", "dense_rows"):
        np.testing.assert_array_equal(getattr(back.dist, name), getattr(dist, name))
    assert back.dist.logits.dtype == np.float32 and back.dist.epsilon == 1e-3
    assert coverage_summary([back])["dense_positions"] == 3
    with zipfile.ZipFile(path) as archive:  # the logits plainly (they barely compress), the ids deflated
        kinds = {info.filename: info.compress_type for info in archive.infolist()}
    assert kinds["cov_logits.npy"] == zipfile.ZIP_STORED and kinds["cov_ids.npy"] == zipfile.ZIP_DEFLATED


def test_format_2_cache_is_refused_with_a_clear_message(tmp_path):
    """Format 2 capped every set at 65,536 tokens (no rows stored whole): refused, naming why."""
    dist = cover_from_logits(np.random.default_rng(4).normal(size=(2, 300)).astype(np.float32) * 4, 0.3)
    part = _synthetic_part(dist)
    arrays = {name: getattr(part, name) for name in reference_module._ARRAY_FIELDS}
    arrays.update(cov_offsets=dist.offsets, cov_logits=dist.logits, cov_lse=dist.lse, cov_tail=dist.tail_mass)
    if dist.ids is not None:
        arrays["cov_ids"] = dist.ids
    arrays["meta_json"] = np.array(json.dumps({"name": part.name, "kind": part.kind, "key": part.key,
                                               "cache_format": 2, "vocab_size": 300, "epsilon": 0.3}))
    path = tmp_path / "heldout-old.npz"
    np.savez_compressed(path, **arrays)
    with pytest.raises(reference_module.StaleCacheError,
                       match=r"cache format 2 \(format 2 capped .* stores such positions whole\).*delete the file"):
        ReferencePart.load(path)


def test_engine_computes_only_the_wanted_logits_rows(converted):
    """``logits=<mask>``: the rows of the flagged tokens, the same numbers as every row (llama.cpp computes only
    those, as llama-perplexity asks only for the positions it scores)."""
    from medgemma_gguf.runtime.engine import Engine

    with Engine(converted(VARIANT).text_path, None, n_ctx=256, n_threads=1) as engine:
        tokens = [engine.bos_token, *engine.tokenize(load_heldout_text()[0].text)][:120]
        engine.reset()
        every = engine.eval_tokens(tokens, logits="all")
        wanted = np.zeros(len(tokens), dtype=bool)
        wanted[60:-1] = True
        wanted[[3, 7]] = True
        engine.reset()
        some = engine.eval_tokens(tokens, logits=wanted)
        np.testing.assert_allclose(some, every[wanted], rtol=1e-5, atol=1e-5)
        engine.reset()
        runs = engine.eval_parts([tokens[:50], tokens[50:]], logits="all")  # two decodes: other last bits
        engine.reset()
        split = engine.eval_parts([tokens[:50], tokens[50:]], logits=wanted)  # one mask across the token runs
        np.testing.assert_allclose(split, runs[wanted], rtol=1e-5, atol=1e-5)
        engine.reset()
        assert engine.eval_tokens(tokens, logits=np.zeros(len(tokens), dtype=bool)).shape == (0, engine.n_vocab)
        with pytest.raises(ValueError, match="one flag for each"):
            engine.eval_parts([tokens[:50], tokens[50:]], logits=wanted[:-1])
