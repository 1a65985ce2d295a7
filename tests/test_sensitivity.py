"""Sensitivity measurement and AUTO quants: calibration parts, the proxy fit, caching, agreement with direct
measurement, and the AUTO output (size within budget, loads and chats, recipe reproduces the types)."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from support import image_text_greedy_tokens

from medgemma_gguf.convert.quantize import sensitivity
from medgemma_gguf.convert.quantize.auto import SensitivityTable, TensorGroup, recipe_tensor_types
from medgemma_gguf.convert.quantize.sensitivity import (
    SensitivityOptions,
    calibration_parts,
    fit_power_law,
    measure_sensitivity,
    model_groups,
    predict,
    proxy_agreement,
)
from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.manifest import Manifest
from medgemma_gguf.quant_eval.metrics import spearman_rank_correlation

T = GGMLQuantizationType
CALIBRATION_ITEMS = ("med-dka", "gen-json", "img-cxr-rll", "img-skin-short")
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q8_0")
PROBES = ("Q3_K",)
THREADS = 1  # llama.cpp spin-waits: one thread is much faster than two on a busy two-core machine


# --- fast: pieces ------------------------------------------------------------------------------------------
def test_calibration_parts_hold_text_and_image_conditioned_prompts():
    chunks, items = calibration_parts()
    assert len(chunks) == 34 and len(items) == 16
    assert all(chunk.text.strip() and chunk.provenance["license"] for chunk in chunks)
    for item in items:
        assert item.image is not None and item.image.encoded_bytes()[:4] == b"\x89PNG"
        assert item.answer_index == 0 and item.options[0] != item.options[1]
        assert all(len(option) <= sensitivity.OPTION_CHARS + 4 for option in item.options)
    bare_chunks, bare_items = calibration_parts(render=False)  # what the plan counts, without drawing images
    assert [c.text for c in bare_chunks] == [c.text for c in chunks]
    assert [(i.id, i.question, i.options) for i in bare_items] == [(i.id, i.question, i.options) for i in items]
    assert all(item.image is None for item in bare_items)
    few_chunks, few_items = calibration_parts(max_text=3, max_images=0)
    assert [c.id for c in few_chunks] == [c.id for c in chunks[:3]] and few_items == []
    with pytest.raises(UserError, match="selection is empty"):
        calibration_parts(max_text=0, max_images=0)
    with pytest.raises(UserError, match="max_text"):
        calibration_parts(max_text=-1)


def test_power_law_fit_recovers_the_exponent_and_clamps():
    errors = [1.0, 10.0, 100.0]
    alpha, beta = fit_power_law(errors, [2e-3 * e**1.5 for e in errors])
    assert beta == pytest.approx(1.5) and predict(alpha, beta, 1000.0) == pytest.approx(2e-3 * 1000**1.5)
    _, one = fit_power_law([4.0], [0.2])  # one probe: ΔKL ∝ error
    assert one == 1.0
    _, steep = fit_power_law([1.0, 2.0], [1e-6, 1.0])
    assert steep == sensitivity.EXPONENT_RANGE[1]
    alpha, beta = fit_power_law([1.0, 2.0], [0.0, 0.0])  # no change at all: floored, finite
    assert math.isfinite(alpha) and predict(alpha, beta, 3.0) <= 1e-9


def test_spearman_rank_correlation_by_hand():
    assert spearman_rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: Pearson of the ranks
    x, y = np.array([1, 2.5, 2.5, 4]) - 2.5, np.array([1, 2, 3, 4]) - 2.5
    assert spearman_rank_correlation([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(x @ y / math.sqrt(x @ x * (y @ y)))
    assert math.isnan(spearman_rank_correlation([1, 1, 1], [1, 2, 3]))


def test_cache_key_changes_with_every_input():
    base = dict(model_sha="m", mmproj_sha="p", imatrix_sha="i", calibration_sha="c", max_text=None, max_images=None,
                candidates=(T.Q2_K, T.Q4_K), probes=(T.Q2_K,), method="proxy")
    key = sensitivity.cache_key(**base)
    for change in (dict(model_sha="m2"), dict(mmproj_sha=None), dict(imatrix_sha="i2"), dict(calibration_sha="c2"),
                   dict(max_text=3), dict(max_images=1), dict(candidates=(T.Q2_K, T.Q5_K)),
                   dict(probes=(T.Q4_K,)), dict(method="measured")):
        assert sensitivity.cache_key(**{**base, **change}) != key, change


def test_groups_of_a_converted_model(converted):
    info = read_gguf_info(converted("mm-k256").text_path)
    groups = dict(model_groups(info))
    assert len(groups) == 6 * 7 + 1 and "token_embd" in groups and "blk.5.ffn_down" in groups
    assert groups["blk.0.ffn_down"] == (("blk.0.ffn_down.weight", (768, 256)),)


# --- fast: AUTO end to end on a synthetic table ------------------------------------------------------------
def _synthetic_result(source: Path, seed: int = 0):
    """A table shaped like the model, ΔKL falling with bits and some groups more sensitive (no measuring)."""
    from medgemma_gguf.convert.quantize.sensitivity import SensitivityResult

    rng = random.Random(seed)
    groups = []
    for name, tensors in model_groups(read_gguf_info(source)):
        weight = rng.uniform(0.2, 3.0)
        delta = {t: weight * 2.0 ** (-1.6 * bits) for t, bits in ((T.Q2_K, 2.6), (T.Q3_K, 3.4), (T.Q4_K, 4.5),
                                                                     (T.Q6_K, 6.6), (T.Q8_0, 8.5))}
        delta[T.F32] = 0.0
        groups.append(TensorGroup(name, tensors, delta))
    meta = {"method": "proxy", "candidates": ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"], "probes": [],
            "cost": {"seconds": 0.0, "quantizations": 0, "evaluations": 0}}
    return SensitivityResult(SensitivityTable(T.F32, tuple(groups)), meta, None)


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    result = converted("mm-k256")
    return Path(shutil.copytree(result.manifest_path.parent, tmp_path / "out"))


@pytest.fixture
def synthetic(monkeypatch, folder):
    source = _source(folder)
    monkeypatch.setattr(sensitivity.SensitivityJob, "run", lambda *a, **k: _synthetic_result(source))
    return folder


def _source(folder: Path) -> Path:
    from medgemma_gguf.convert.quantize.folder import source_entry

    return folder / source_entry(folder, Manifest.load(folder)).path


def _listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def test_auto_size_budget_recipe_reproduces_and_manifest_says_how(synthetic, tmp_path):
    from medgemma_gguf.convert.quantize.folder import AUTO_PREFIX, AutoRequest, auto_quantize_folder, quantize_folder

    folder = synthetic
    source = _source(folder)
    budget = source.stat().st_size // 5
    made = auto_quantize_folder(folder, AutoRequest(target_size=f"{budget}B", imatrix="none",
                                                    sensitivity=SensitivityOptions(n_threads=THREADS)), progress=False)
    result = made.result
    assert result.path.name.startswith(f"{Manifest.load(folder).model}-{AUTO_PREFIX}-")
    assert result.path.stat().st_size == result.bytes <= budget
    assert result.bytes >= 0.97 * budget  # the budget is used, not wasted
    assert result.path.name == made.recipe_path.name.replace(".toml", ".gguf")
    planned = recipe_tensor_types(made.recipe_path.read_text(encoding="utf-8"))
    assert {n: t.name for n, t in planned.items()} == {n: t for n, t in result.actual_types.items() if n in planned}
    assert len(set(planned.values())) > 1 and not result.fallbacks
    row = next(r for r in Manifest.load(folder).find("text") if r.path == result.path.name)
    assert row.auto["budget"].startswith("file size") and row.auto["recipe_file"] == \
        made.recipe_path.name
    assert row.auto["predicted_delta_kl"] == pytest.approx(made.mix.predicted_delta_kl)
    # the recipe file alone reproduces the same per-tensor types in another folder
    other = Path(shutil.copytree(folder, tmp_path / "again", ignore=shutil.ignore_patterns("*AUTO*")))
    [again] = quantize_folder(other, [], recipe_files=[made.recipe_path], progress=False, n_threads=THREADS)
    assert again.actual_types == result.actual_types and again.path.name == result.path.name
    # running AUTO again finds the file up to date
    assert auto_quantize_folder(folder, AutoRequest(target_size=f"{budget}B", imatrix="none"),
                                progress=False).result.skipped


def test_auto_bad_budgets_say_the_feasible_range(synthetic):
    from medgemma_gguf.convert.quantize.folder import AutoRequest, auto_quantize_folder

    folder = synthetic
    before = _listing(folder)
    with pytest.raises(UserError, match=r"below the smallest possible mix; feasible range 2\.6\d+ bpw .* \.\. "
                                        r"32\.000 bpw \(unquantized F32\)"):
        auto_quantize_folder(folder, AutoRequest(target_bpw=2.0, imatrix="none"), progress=False)
    with pytest.raises(UserError, match=r"above the unquantized size; feasible range \d+ MiB \.\. \d+ MiB"):
        auto_quantize_folder(folder, AutoRequest(target_size="10GB", imatrix="none"), progress=False)
    with pytest.raises(UserError, match="exactly one of"):
        auto_quantize_folder(folder, AutoRequest(target_bpw=4.0, target_size="1GB"), progress=False)
    with pytest.raises(UserError, match="vram needs ctx"):
        auto_quantize_folder(folder, AutoRequest(vram="6GiB"), progress=False)
    assert _listing(folder) == before


def test_cli_auto_and_its_errors(synthetic):
    from click.testing import CliRunner

    from medgemma_gguf.convert.quantize.cli import quantize_command

    folder = synthetic
    result = CliRunner().invoke(quantize_command, [str(folder), "--target-bpw", "4.25", "--quiet", "--imatrix", "none",
                                                   "--threads", str(THREADS)])
    assert result.exit_code == 0, result.output
    assert re.search(r"AUTO-4\.\d\d\.gguf", result.output)
    assert "4.25 bits per weight" in result.output and "--recipe" in result.output
    made = list(folder.glob("*AUTO-*.gguf"))
    assert len(made) == 1 and made[0].with_suffix(".toml").is_file()
    mixed = CliRunner().invoke(quantize_command, [str(folder), "--target-bpw", "4", "--quants", "Q8_0"])
    assert mixed.exit_code != 0 and "runs alone" in str(mixed.exception)
    stray = CliRunner().invoke(quantize_command, [str(folder), "--quants", "Q8_0", "--sensitivity", "measured"])
    assert stray.exit_code != 0 and "apply to AUTO" in str(stray.exception)


# --- slow: the real measurement on the fixture --------------------------------------------------------------
@pytest.fixture(scope="module")
def measured_setup(imatrix_folder, tmp_path_factory):
    """The fixture folder with an imatrix, and one proxy table measured on a small calibration subset."""
    root = tmp_path_factory.mktemp("sensitivity")
    setup = imatrix_folder(root, CALIBRATION_ITEMS, n_threads=THREADS)
    options = SensitivityOptions(method="proxy", candidates=CANDIDATES, probes=PROBES,
                                 calibration=setup["calibration"], cache_dir=root / "cache", n_threads=THREADS)
    table = measure_sensitivity(setup["source"], setup["mmproj"], setup["imatrix"], options, progress=False)
    return {**setup, "table": table, "options": options, "cache": root / "cache"}


@pytest.mark.slow  # about 45 quantize + evaluate rounds of the tiny model (~1 min on 2 busy cores)
def test_measured_table_is_complete_cached_and_costed(measured_setup, monkeypatch):
    setup = measured_setup
    result = setup["table"]
    table = result.table
    assert not result.from_cache and len(table.groups) == 43
    cost = result.cost
    assert cost["evaluations"] == 43 and cost["quantizations"] == 43 + len(CANDIDATES) and cost["seconds"] > 0
    assert result.meta["calibration"]["image_positions"] > 0  # image-conditioned prompts were scored
    assert result.meta["calibration"]["positions"] > result.meta["calibration"]["image_positions"]
    for group in table.groups:
        deltas = [group.delta_kl[T[name]] for name in CANDIDATES]
        assert all(d > 0 for d in deltas), group.name
        assert deltas == sorted(deltas, reverse=True), group.name  # more bits, less KL
        assert group.delta_kl[T.Q3_K] == result.probes[group.name]["Q3_K"]  # probes are measured values
    # the second call reads the cache and measures nothing
    monkeypatch.setattr(sensitivity.Measurer, "__init__", lambda *a, **k: pytest.fail("re-measured"))
    again = measure_sensitivity(setup["source"], setup["mmproj"], setup["imatrix"], setup["options"], progress=False)
    assert again.from_cache and again.table == table and again.cost == cost
    assert again.cache_path == result.cache_path and json.loads(again.cache_path.read_text())["meta"]["cost"] == cost


@pytest.mark.slow  # 9 direct measurements
def test_proxy_agrees_with_direct_measurement(measured_setup):
    setup = measured_setup
    agreement = proxy_agreement(setup["table"], setup["source"], setup["mmproj"], setup["imatrix"], setup["options"],
                                n_groups=3, n_types=3, progress=False)
    assert len(agreement.pairs) == 9 and agreement.cost["evaluations"] == 9
    assert agreement.spearman >= 0.8, agreement.pairs
    assert agreement.spearman_within_group == pytest.approx(1.0), agreement.pairs
    predicted = np.array([p[2] for p in agreement.pairs])
    measured = np.array([p[3] for p in agreement.pairs])
    assert np.all(np.abs(np.log(predicted / measured)) < math.log(4)), agreement.pairs  # within 4x each


@pytest.mark.slow  # reuses the cached table: one quantization and a chat
def test_auto_from_measured_table_fits_loads_and_chats(measured_setup):
    from medgemma_gguf.convert.quantize.folder import AutoRequest, auto_quantize_folder

    setup = measured_setup
    made = auto_quantize_folder(setup["folder"], AutoRequest(target_bpw=3.5, imatrix=setup["imatrix"],
                                                             sensitivity=setup["options"]), progress=False)
    assert made.sensitivity.from_cache  # the table measured above
    result = made.result
    info = read_gguf_info(result.path)
    assert info.bits_per_weight <= 3.5
    assert len(image_text_greedy_tokens(result.path, setup["mmproj"], n_threads=THREADS)) == 4


def test_type_ggml_cannot_write_without_imatrix_data_is_refused_not_aborted(folder, tmp_path):
    from medgemma_gguf.convert.quantize.llama_quantize import QuantSpec, quantize_file
    from medgemma_gguf.convert.quantize.recipe import parse_recipe

    recipe = parse_recipe('name = "BARE"\nbase = "Q4_K"\n[[rules]]\ntensors = ["token_embd"]\ntype = "IQ2_XXS"\n')
    with pytest.raises(UserError, match=r"IQ2_XXS on token_embd\.weight, which the importance matrix does not"):
        quantize_file(_source(folder), tmp_path / "bare.gguf", QuantSpec("BARE", recipe=recipe), progress=False)
    assert not list(tmp_path.glob("*bare*"))


def test_auto_vram_budget_counts_what_the_planner_puts_on_the_gpu(synthetic):
    from medgemma_gguf.convert.quantize.auto import VramBudget, model_facts
    from medgemma_gguf.convert.quantize.folder import AutoRequest, auto_quantize_folder
    from medgemma_gguf.runtime.offload import plan_offload

    folder = synthetic
    source = _source(folder)
    mmproj = next(folder.glob("mmproj-*.gguf"))
    table = _synthetic_result(source).table
    overhead = sum(VramBudget(1, 1024, mmproj).breakdown(model_facts(source, table)).values())
    f32 = sum(g.n_bytes(T.F32) for g in table.groups)
    vram = overhead + f32 // 6
    made = auto_quantize_folder(folder, AutoRequest(vram=f"{vram}B", ctx=1024, imatrix="none",
                                                    sensitivity=SensitivityOptions(n_threads=THREADS)), progress=False)
    assert made.how["budget"].startswith("VRAM")
    plan = plan_offload(made.result.path, n_ctx=1024, vram_bytes=vram, mmproj_path=mmproj, gpu_available=True)
    assert plan.fits_fully


@pytest.mark.slow  # 3 groups x 4 types measured directly (~10 s)
def test_measured_method_agrees_with_the_proxy_probes(measured_setup, monkeypatch):
    from medgemma_gguf.convert.quantize.auto import model_facts

    setup = measured_setup
    proxy = setup["table"]
    real_groups = sensitivity.model_groups
    monkeypatch.setattr(sensitivity, "model_groups", lambda info: real_groups(info)[:3])
    measured = measure_sensitivity(setup["source"], setup["mmproj"], setup["imatrix"],
                                   replace(setup["options"], probes=(), method="measured"), progress=False)
    assert measured.meta["method"] == "measured" and measured.cost["evaluations"] == 3 * len(CANDIDATES)
    for group in measured.table.groups:
        # the same deterministic measurement as the proxy's probe, and more bits never cost more KL
        assert group.delta_kl[T.Q3_K] == pytest.approx(proxy.table.group(group.name).delta_kl[T.Q3_K], rel=1e-9)
        deltas = [group.delta_kl[T[name]] for name in CANDIDATES]
        assert deltas == sorted(deltas, reverse=True)
    with pytest.raises(UserError, match="lacks the matrix"):  # a partial table cannot drive the whole model
        model_facts(setup["source"], measured.table)
