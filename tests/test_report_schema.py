"""The typed, versioned report record: round trip, the flat keys scripts read, reading older reports, refusing
newer and damaged ones, and what ``fit`` reads from it."""

from __future__ import annotations

import json
import math

import pytest

from medgemma_gguf.errors import InputError, IntegrityError, NotFoundError
from medgemma_gguf.report_schema import (
    REPORT_SCHEMA_VERSION,
    Coverage,
    DeltaPStats,
    EvalReport,
    KLStats,
    PartStats,
    ReportRow,
    SliceAccuracy,
)


def _row(**changes) -> ReportRow:
    values = dict(
        file="m-Q4_K_M.gguf", path="/x/m-Q4_K_M.gguf", type="Q4_K_M", bytes=1000, bpw=4.8, tensor_bytes=900,
        n_elements=1500, mmproj="mmproj-F16.gguf", mmproj_bytes=200,
        kld=KLStats(mean=0.0123, mean_low=0.0123, mean_high=0.0131, mean_stderr=1e-4, n=500, max=0.9, p999=0.5,
                    p99=0.1, p95=0.05, p90=0.03, median=0.008, p10=0.001, p05=5e-4, p01=1e-4, p001=1e-5, min=0.0),
        image_kld=KLStats(mean=0.02, mean_low=0.02, mean_high=0.025, n=40, p99=0.2),
        top1_agreement=0.91, top1_agreement_stderr=0.01, image_top1_agreement=0.9,
        dp=DeltaPStats(rms=0.05, rms_stderr=0.002, mean=-0.001, mean_stderr=0.001, n=480, max=0.3, median=0.0,
                       min=-0.4),
        rms_dp_top=0.04, ppl_ratio=1.01, ln_ppl_ratio=0.00995, ln_ppl_ratio_stderr=0.001,
        accuracy={"medqa-mini": SliceAccuracy(accuracy=0.6, ci95_low=0.45, ci95_high=0.73, n=40,
                                              reference_accuracy=0.65, mcnemar_p=0.5, only_quant_right=1,
                                              only_reference_right=3)},
        parts={"heldout": PartStats(n_positions=300, kld_mean=0.01, kld_mean_low=0.01, kld_mean_high=0.011,
                                    kld_max=0.8, top1_agreement=0.92)},
        prompt_tps=500.0, gen_tps=40.0, image_encode_s=0.2, speed_prompt_tokens=128, speed_gen_tokens=32,
        eval_seconds=12.0, peak_rss_bytes=10**9)
    values.update(changes)
    return ReportRow(**values)


def test_a_row_round_trips_through_the_flat_json_scripts_read() -> None:
    row = _row()
    data = row.to_json()
    # the established flat keys stay where scripts read them
    assert data["kld_mean"] == 0.0123 and data["kld_p99"] == 0.1 and data["image_kld_mean"] == 0.02
    assert data["kld_mean_low"] == 0.0123 and data["kld_mean_high"] == 0.0131
    assert data["rms_dp"] == 0.05 and data["dp_mean"] == -0.001 and data["top1_agreement"] == 0.91
    assert data["accuracy"]["medqa-mini"]["accuracy"] == 0.6 and data["parts"]["heldout"]["kld_mean"] == 0.01
    assert ReportRow.from_json(json.loads(json.dumps(data))) == row
    assert row.kld_mean == 0.0123 and row.kld_bracket == (0.0123, 0.0131) and row.footprint_bytes == 1200


def test_an_error_row_has_no_metrics() -> None:
    row = ReportRow(file="bad.gguf", bytes=10, error="not a GGUF file")
    data = row.to_json()
    assert data["kld_mean"] is None and data["rms_dp"] is None and data["error"] == "not a GGUF file"
    back = ReportRow.from_json(data)
    assert back == row and back.kld is None and not back.ok and back.kld_mean is None


def test_a_report_round_trips_and_keeps_unknown_keys() -> None:
    report = EvalReport(reference={"source": "ref.gguf", "kind": "gguf"}, rows=[_row()],
                        coverage=Coverage(epsilon=1e-4, min_tokens=16, max_tokens=65536, mean_set_size=420.5,
                                          n_positions=500, vocab_size=262208, cache_bytes=1_700_000,
                                          cache_bytes_per_position=3400.0),
                        slices=[{"spec": "medqa-mini"}], recommendations=[{"budget_gib": 1, "file": "m-Q4_K_M.gguf"}])
    data = json.loads(report.dumps())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION == 2
    data["rows"][0]["note"] = "added by a script"
    back = EvalReport.from_json(data)
    assert back.rows[0].extra == {"note": "added by a script"} and back.coverage == report.coverage
    assert back.to_json() == data
    assert back.row("/elsewhere/m-Q4_K_M.gguf") is back.rows[0] and back.row("other.gguf") is None


def test_a_version_1_report_is_upgraded_with_its_top_k_bounds_as_the_bracket() -> None:
    v1 = {"reference": {"source": "x"}, "top_k": 256, "rows": [
        {"file": "a-Q8_0.gguf", "type": "Q8_0", "bytes": 10, "kld_mean": 0.001, "kld_upper_mean": 0.4,
         "kld_p99": 0.01, "image_kld_mean": 0.002, "image_kld_upper_mean": 0.5, "rms_dp": 0.01,
         "top1_agreement": 0.98, "parts": {"heldout": {"n_positions": 5, "kld_mean": 0.001}},
         "accuracy": {}, "error": None},
        {"file": "b.gguf", "kld_mean": None, "error": "not a GGUF file"}]}
    report = EvalReport.from_json(v1)
    a, b = report.rows
    assert a.kld.mean == 0.001 and a.kld.bracket == (0.001, 0.4) and a.image_kld.bracket == (0.002, 0.5)
    assert a.kld.p99 == 0.01 and a.dp.rms == 0.01 and a.parts["heldout"].kld_mean_low == 0.001
    assert report.coverage.top_k == 256 and report.coverage.epsilon is None
    assert b.error == "not a GGUF file" and b.kld is None
    assert "kld_upper_mean" not in a.extra  # consumed by the upgrade, not carried along
    minimal = EvalReport.from_json({"rows": [{"file": "m.gguf", "kld_mean": 0.02}]})  # what some scripts write
    assert minimal.rows[0].kld.bracket == (0.02, math.inf)  # no bound stated: none assumed
    assert EvalReport.from_json([{"file": "m.gguf", "kld_mean": 0.02}]).rows[0].kld_mean == 0.02


def test_newer_damaged_and_missing_reports_are_clear_errors(tmp_path) -> None:
    with pytest.raises(InputError, match=r"newer medgemma-gguf \(report schema 3.*upgrade medgemma-gguf"):
        EvalReport.from_json({"schema_version": 3, "rows": []})
    with pytest.raises(IntegrityError, match=r"rows\[0\]\.kld_mean is 'high', not a number"):
        EvalReport.from_json({"schema_version": 2, "rows": [{"file": "m.gguf", "kld_mean": "high"}]})
    with pytest.raises(IntegrityError, match="no file name"):
        EvalReport.from_json({"schema_version": 2, "rows": [{"kld_mean": 0.1}]})
    with pytest.raises(IntegrityError, match="no list of rows"):
        EvalReport.from_json({"schema_version": 2})
    with pytest.raises(IntegrityError, match="schema_version"):
        EvalReport.from_json({"schema_version": "2", "rows": []})
    with pytest.raises(IntegrityError, match="accuracy.*has no n"):
        EvalReport.from_json({"rows": [{"file": "m", "accuracy": {"s": {"accuracy": 1, "ci95_low": 0,
                                                                        "ci95_high": 1}}}]})
    path = tmp_path / "report.json"
    path.write_text("{")
    with pytest.raises(IntegrityError, match="not valid JSON; re-run medgemma-gguf eval"):
        EvalReport.load(path)
    with pytest.raises(NotFoundError, match="not found"):
        EvalReport.load(tmp_path / "missing.json")


def test_an_unbounded_bracket_is_written_as_null_and_read_back_unbounded() -> None:
    row = _row(kld=KLStats(mean=0.01, mean_low=0.01, mean_high=math.inf))
    data = json.loads(EvalReport(reference={}, rows=[row]).dumps())
    assert data["rows"][0]["kld_mean_high"] is None
    assert EvalReport.from_json(data).rows[0].kld.bracket == (0.01, math.inf)
