"""The fast sensitivity method: ggml's per-tensor errors through ctypes (equal to quantizing with llama.cpp and
dequantizing with gguf-py), row sampling, the calibration fit (per kind and per (block, layer)), the plan and its
cost said up front (``--dry-run`` matches the run), resuming an interrupted run from the cache, and AUTO's
importance matrix."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from medgemma_gguf.convert.quantize import ggml_quants, sensitivity
from medgemma_gguf.convert.quantize.fast_sensitivity import (
    BLOCKS,
    KIND_BLOCK,
    LAYER_SAMPLE,
    KindFit,
    fit_fast,
    fit_kind,
    global_layers,
    interpolate_factors,
    plan_points,
    sample_layers,
)
from medgemma_gguf.convert.quantize.tensor_errors import Sampling, TensorErrors, read_rows, weighted_error
from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import GgufInfo, is_quantizable, read_gguf_info
from medgemma_gguf.manifest import Manifest

T = GGMLQuantizationType
THREADS = 1
CALIBRATION_ITEMS = ("med-dka", "gen-json", "img-cxr-rll", "img-skin-short")


def read_imatrix_chunks(path: Path) -> int:
    from medgemma_gguf.convert.quantize.imatrix import read_imatrix

    return read_imatrix(path).chunk_count


def gemma3(**metadata: object) -> GgufInfo:
    """A Gemma 3 header with a sliding window and these ``gemma3.attention.*`` keys (no tensors)."""
    keys = {f"gemma3.attention.{k}": v for k, v in metadata.items()}
    return GgufInfo(Path("model.gguf"), 3, {"general.architecture": "gemma3", "gemma3.attention.sliding_window": 512,
                                            **keys}, ())


# --- unit: the fit and the binding ---------------------------------------------------------------------------
@pytest.mark.unit
def test_calibration_recovers_a_known_linear_relation():
    rng = np.random.default_rng(0)
    c = 3.7e-4
    points = []
    for qtype in ("Q2_K", "Q3_K", "Q4_K"):
        errors = rng.uniform(0.5, 20.0, size=34) * {"Q2_K": 8, "Q3_K": 3, "Q4_K": 1}[qtype]
        points.append((qtype, errors, c * float(errors.sum())))
    fit = fit_kind("ffn_down", points)
    assert fit.beta == pytest.approx(1.0, abs=0.01) and math.exp(fit.log_c) == pytest.approx(c, rel=0.02)
    new = rng.uniform(0.1, 5.0, size=34)
    assert fit.predict(new) == pytest.approx(c * new.sum(), rel=0.05)
    one = fit_kind("attn_v", points[:1])  # one point: linear through it
    assert one.beta == 1.0 and one.predict(points[0][1]) == pytest.approx(points[0][2])
    assert one.predict([0.0, 0.0]) == 0.0


@pytest.mark.unit
def test_calibration_recovers_a_power_law_and_clamps_the_exponent():
    rng = np.random.default_rng(1)
    errors = [rng.uniform(1, 2, size=8) * scale for scale in (1.0, 4.0, 16.0)]
    fit = fit_kind("attn_q", [(str(i), e, 2e-5 * float(np.sum(e ** 1.4))) for i, e in enumerate(errors)])
    assert fit.beta == pytest.approx(1.4, abs=0.02)
    steep = fit_kind("attn_q", [(str(i), e, 1e-9 * float(np.sum(e)) ** 6) for i, e in enumerate(errors)])
    assert steep.beta == 2.0  # clamped to EXPONENT_RANGE
    assert isinstance(steep, KindFit) and json.loads(json.dumps(steep.to_json()))["beta"] == 2.0


def _synthetic_points(n_layers, sampled, factor, seed=0):
    """Kind and (block, layer) points made exactly by ΔKL = c_kind · f_block(layer) · e (token_embd: f = 1)."""
    rng = np.random.default_rng(seed)
    c = {kind: float(rng.uniform(1e-5, 1e-2)) for kind in KIND_BLOCK}
    e = {(kind, layer): float(rng.uniform(0.5, 50.0)) for kind in KIND_BLOCK for layer in range(n_layers)}

    def truth(kind, layer):
        return c[kind] * factor(KIND_BLOCK[kind], layer) * e[kind, layer]

    kind_points = [(kind, "Q3_K", [(layer, e[kind, layer]) for layer in range(n_layers)],
                    sum(truth(kind, layer) for layer in range(n_layers))) for kind in KIND_BLOCK]
    kind_points.append(("token_embd", "Q3_K", [(None, 7.0)], 3e-4 * 7.0))
    layer_points = [(block, layer, "Q3_K", [(kind, e[kind, layer]) for kind in kinds],
                     sum(truth(kind, layer) for kind in kinds)) for block, kinds in BLOCKS.items() for layer in sampled]
    return kind_points, layer_points, e, truth


@pytest.mark.unit
def test_layer_fit_recovers_known_kind_and_layer_factors_when_every_layer_is_sampled():
    rng = np.random.default_rng(5)
    true_f = {block: np.exp(rng.normal(0.0, 2.0, 6)) for block in BLOCKS}  # orders of magnitude, as measured
    kind_points, layer_points, e, truth = _synthetic_points(6, range(6), lambda b, layer: true_f[b][layer])
    fit = fit_fast(kind_points, layer_points, 6, {5})
    assert 1 < fit.iterations < 50
    for kind in KIND_BLOCK:
        for layer in range(6):
            assert fit.predict(kind, layer, [e[kind, layer]]) == pytest.approx(truth(kind, layer), rel=1e-5)
    assert fit.predict("token_embd", None, [2.0]) == pytest.approx(3e-4 * 2.0)
    for block, layers in fit.layers.items():  # identifiable: geometric mean 1 over the sampled layers
        assert math.exp(np.mean(np.log(layers.factors))) == pytest.approx(1.0)
        ratio = np.asarray(layers.factors) / true_f[block]
        assert np.allclose(ratio, ratio[0], rtol=1e-5)
    meta = json.loads(json.dumps(fit.to_json()))
    assert set(meta["layers"]) == {"attention", "ffn"} and meta["layers"]["ffn"]["sampled"] == list(range(6))
    assert len(meta["layers"]["ffn"]["factors"]) == 6 and "token_embd" in meta["kinds"]
    # without layer points the model is the per-kind one (f = 1)
    flat = fit_fast(kind_points, [], 6)
    assert flat.layers == {} and flat.factor("attn_k", 3) == 1.0
    assert flat.predict("attn_k", 3, [1.0]) == pytest.approx(flat.kinds["attn_k"].predict([1.0]))


@pytest.mark.unit
def test_layer_fit_interpolates_unsampled_layers_global_and_local_apart():
    n, globals_ = 12, global_layers(gemma3(), 12)
    sampled = sample_layers(n, globals_, count=6)
    assert globals_ == {5, 11} and set(sampled) & globals_ and len(sampled) == 6

    assert sampled == (0, 1, 3, 6, 8, 11)

    def factor(block, layer):  # log-linear over the local layers (constant after the last, 8), a level at the global
        if layer in globals_:
            return {"attention": 40.0, "ffn": 0.1}[block]
        return math.exp({"attention": -0.5, "ffn": 0.3}[block] * min(layer, 8))

    kind_points, layer_points, e, truth = _synthetic_points(n, sampled, factor, seed=3)
    fit = fit_fast(kind_points, layer_points, n, globals_)
    for kind in KIND_BLOCK:
        for layer in range(n):  # exact: the truth is what the interpolation assumes
            assert fit.predict(kind, layer, [e[kind, layer]]) == pytest.approx(truth(kind, layer), rel=1e-4)
    # log-linear between samples, constant beyond the ends, one class from the other's samples when alone
    assert interpolate_factors({2: 1.0, 4: 100.0}, 7) == pytest.approx((1, 1, 1, 10, 100, 100, 100))
    both = interpolate_factors({0: 1.0, 4: 16.0, 5: 0.5}, 7, {5})
    assert both == pytest.approx((1, 2, 4, 8, 16, 0.5, 16))
    assert interpolate_factors({0: 1.0, 4: 16.0}, 6, {5}) == pytest.approx((1, 2, 4, 8, 16, 16))
    assert interpolate_factors({}, 3) == (1.0, 1.0, 1.0)


@pytest.mark.unit
def test_layer_sampling_and_global_layers():
    assert sample_layers(4) == (0, 1, 2, 3) and sample_layers(6, {5}, count=6) == tuple(range(6))
    assert sample_layers(5) == (0, 1, 2, 4)
    four_b = global_layers(gemma3(), 34)  # MedGemma 4B: 34 layers, global every 6th
    picked = sample_layers(34, four_b)
    assert LAYER_SAMPLE == 4 and picked == (0, 1, 17, 33) and set(picked) & four_b  # 17 is global
    assert len(sample_layers(34, four_b, count=6)) == 6
    deep = sample_layers(62, global_layers(gemma3(), 62))  # 27B: the even spread (31) misses the globals
    assert deep == (0, 1, 29, 61) and 29 % 6 == 5
    assert sample_layers(7, {5}) == (0, 1, 5, 6) and sample_layers(7, {5}, count=6) == (0, 1, 2, 3, 5, 6)
    # the planner's reader (runtime.offload.sliding_layers): the per-layer array, a period, none without a window
    assert global_layers(gemma3(sliding_window_pattern=[True, True, False, True]), 4) == {2}
    assert global_layers(gemma3(sliding_window_pattern=3), 7) == {2, 5}
    assert global_layers(GgufInfo(Path("m.gguf"), 3, {"general.architecture": "gemma3"}, ()), 3) == {0, 1, 2}
    with pytest.raises(UserError, match="sliding_window_pattern has 3 entries for 4 layers; the file is corrupt"):
        global_layers(gemma3(sliding_window_pattern=[True, True, False]), 4)
    # the points: one per kind and probe, one per block and sampled layer
    kinds = {kind: [f"blk.{layer}.{kind}.weight" for layer in range(34)] for kind in KIND_BLOCK}
    kinds["token_embd"] = ["token_embd.weight"]
    allowed = {t: (T.Q3_K,) for tensors in kinds.values() for t in tensors}
    points = plan_points(kinds, allowed, (T.Q3_K,), picked)
    assert len(points) == 8 + 2 * LAYER_SAMPLE == len({p.label for p in points})
    attention = next(p for p in points if p.layer == 17 and p.kind == "attention")
    assert attention.tensors == tuple(f"blk.17.{k}.weight" for k in BLOCKS["attention"])
    assert attention.label == "layer-attention-17-Q3_K"


@pytest.mark.unit
def test_row_sampling_is_deterministic_strided_and_bounded():
    sampling = Sampling(sample_elements=4096, min_rows=8)
    rows = sampling.rows("blk.0.ffn_up.weight", 10_000, 256)
    assert len(rows) == 16 and np.all(np.diff(rows) > 0) and rows.max() < 10_000
    assert np.array_equal(rows, sampling.rows("blk.0.ffn_up.weight", 10_000, 256))
    assert not np.array_equal(rows, sampling.rows("blk.1.ffn_up.weight", 10_000, 256))  # per-tensor offset
    assert len(sampling.rows("x", 20, 256)) == 20  # few rows: all of them
    assert len(Sampling(None).rows("x", 10_000, 256)) == 10_000


@pytest.mark.unit
def test_ggml_binding_refuses_what_ggml_would_abort_on():
    rows = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="only with importance weights"):
        ggml_quants.roundtrip(rows, T.IQ2_XXS)
    with pytest.raises(ValueError, match="not a multiple of Q4_K's block of 256"):
        ggml_quants.roundtrip(rows[:, :96], T.Q4_K)
    out = ggml_quants.roundtrip(rows, T.IQ2_XXS, np.ones(256, dtype=np.float32))
    assert out.shape == rows.shape and 0 < float(np.mean((out - rows) ** 2)) < 1
    assert re.match(r"\d+\.\d+\.\d+\+", ggml_quants.version())


# --- integration: errors against llama.cpp's own quantization -------------------------------------------------
@pytest.fixture(scope="module")
def model(imatrix_folder, tmp_path_factory):
    """The converted mm-k256 fixture with an importance matrix on a small calibration subset."""
    root = tmp_path_factory.mktemp("fast")
    return {**imatrix_folder(root, CALIBRATION_ITEMS, n_threads=THREADS), "root": root}


def test_per_tensor_errors_equal_quantizing_with_llama_cpp(model, tmp_path):
    """ggml through ctypes = llama.cpp's quantizer + gguf-py's dequantize, for k-, i-quants and Q8_0."""
    from medgemma_gguf.convert.quantize.imatrix import read_imatrix
    from medgemma_gguf.convert.quantize.llama_quantize import QuantSpec, quantize_file
    from medgemma_gguf.convert.quantize.recipe import parse_recipe

    imatrix = read_imatrix(model["imatrix"])
    info = read_gguf_info(model["source"])
    layers = [t for t in info.tensors if is_quantizable(t.name, t.shape) and t.name.startswith("blk.")]
    types = (T.Q4_K, T.Q3_K, T.IQ4_XS, T.IQ2_XXS, T.Q8_0)
    errors = TensorErrors(model["source"], layers, {t.name: types for t in layers}, imatrix=imatrix, model_sha="m",
                          imatrix_sha="i", cache_root=None, sampling=Sampling(None))
    assert errors.measure(workers=2) == len(layers) * len(types)
    ours = errors.errors()
    source = {t.name: t for t in GGUFReader(model["source"]).tensors}
    for qtype in types:
        recipe = parse_recipe(f'name = "ALL-{qtype.name}"\nbase = "F32"\n[[rules]]\npattern = "^blk\\\\."\n'
                              f'type = "{qtype.name}"\n')
        path = tmp_path / f"{qtype.name}.gguf"
        quantize_file(model["source"], path, QuantSpec(recipe.name, recipe=recipe), imatrix=imatrix,
                      n_threads=THREADS, progress=False)
        written = {t.name: t for t in GGUFReader(path).tensors}
        for tensor in layers:
            assert written[tensor.name].tensor_type == qtype
            row = tensor.shape[0]
            w = dequantize(source[tensor.name].data, source[tensor.name].tensor_type).reshape(-1, row)
            q = dequantize(written[tensor.name].data, qtype).reshape(-1, row)
            direct = weighted_error(w, q, imatrix.mean_squares(tensor.name).astype(np.float64))
            assert ours[tensor.name][qtype] == pytest.approx(direct, rel=1e-9), (tensor.name, qtype.name)


def test_sampled_rows_are_the_direct_error_of_those_rows_scaled(model):
    info = read_gguf_info(model["source"])
    embedding = info.tensor("token_embd.weight")
    sampling = Sampling(sample_elements=16 * embedding.shape[0], min_rows=4)
    n_rows = embedding.shape[1]
    rows = sampling.rows(embedding.name, n_rows, embedding.shape[0])
    assert 4 <= len(rows) < n_rows
    errors = TensorErrors(model["source"], [embedding], {embedding.name: (T.Q4_K,)}, imatrix=None, model_sha="m",
                          imatrix_sha=None, cache_root=None, sampling=sampling)
    errors.measure()
    picked = read_rows(model["source"], embedding, rows)
    direct = weighted_error(picked, ggml_quants.roundtrip(picked, T.Q4_K), np.ones(embedding.shape[0]))
    assert errors.errors()[embedding.name][T.Q4_K] == pytest.approx(direct * n_rows / len(rows), rel=1e-12)
    # the header's data offsets read the same weights gguf-py's reader does, for every tensor
    for tensor in GGUFReader(model["source"]).tensors:
        ours = read_gguf_info(model["source"]).tensor(tensor.name)
        rows = int(np.prod(ours.shape[1:]))
        got = read_rows(model["source"], ours, np.arange(rows)) if ours.ggml_type in (T.F32, T.BF16, T.F16) else None
        assert got is None or np.array_equal(got, np.asarray(tensor.data, dtype=np.float32).reshape(rows, -1))


def test_interrupted_error_measurement_resumes_from_the_cache(model, tmp_path):
    info = read_gguf_info(model["source"])
    tensors = [t for t in info.tensors if is_quantizable(t.name, t.shape)]
    types = (T.Q2_K, T.Q4_K, T.Q6_K)
    allowed = {t.name: types for t in tensors}

    def make() -> TensorErrors:
        return TensorErrors(model["source"], tensors, allowed, imatrix=None, model_sha="m" * 64, imatrix_sha=None,
                            cache_root=tmp_path / "errors", sampling=Sampling(None))

    seen = []

    def stop_after_five(name: str, n_types: int) -> None:
        seen.append(name)
        if len(seen) == 5:
            raise KeyboardInterrupt

    first = make()
    with pytest.raises(KeyboardInterrupt):
        first.measure(workers=1, on_tensor=stop_after_five)
    assert len(list((tmp_path / "errors").glob("*.json"))) == len(types)  # written on the interruption
    again = make()
    assert again.work().n_items == (len(tensors) - 5) * len(types)
    assert again.measure(workers=2) == (len(tensors) - 5) * len(types)
    fresh = TensorErrors(model["source"], tensors, allowed, imatrix=None, model_sha="m" * 64, imatrix_sha=None,
                         cache_root=None, sampling=Sampling(None))
    fresh.measure(workers=1)
    assert again.errors() == fresh.errors()
    assert make().work().n_items == 0  # a third run finds everything cached


# --- e2e: the plan, the run, the resume of calibration points -------------------------------------------------
def _plan_numbers(text: str) -> dict[str, int]:
    errors = re.search(r"(\d+) \(tensor, type\) pairs, (\d+) cached, (\d+) to measure", text)
    whole = re.search(r"(\d+) quantizations \((\d+) cached\) and (\d+) evaluations \((\d+) cached\)", text)
    assert errors and whole, text
    return {"errors": int(errors.group(1)), "errors_cached": int(errors.group(2)), "errors_todo": int(errors.group(3)),
            "quantizations": int(whole.group(1)), "evaluations": int(whole.group(3)),
            "evaluations_cached": int(whole.group(4))}


@pytest.mark.e2e
def test_dry_run_plan_matches_the_run_and_a_rerun_is_cached(model, tmp_path):
    from click.testing import CliRunner

    from medgemma_gguf.convert.quantize.cli import quantize_command

    folder = Path(shutil.copytree(model["folder"], tmp_path / "out"))
    cache = tmp_path / "cache"
    args = [str(folder), "--target-bpw", "4.5", "--imatrix", str(folder / "imatrix.gguf"), "--threads", str(THREADS),
            "--cache-dir", str(cache), "--sensitivity-sample", "2", "--quiet"]
    before = sorted(p.name for p in folder.iterdir())
    dry = CliRunner().invoke(quantize_command, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "estimated time:" in dry.output and "dry run: nothing measured or written" in dry.output
    assert sorted(p.name for p in folder.iterdir()) == before and not (cache / "sensitivity").exists()
    planned = _plan_numbers(dry.output)
    assert planned["errors_cached"] == 0 and planned["errors"] == planned["errors_todo"]
    # one point per tensor kind (Gemma 3 ties the output to token_embd) + attention and FFN of 4 of the 7 layers
    assert planned["evaluations"] == 8 + 2 * 4
    assert "calibration points: 8 per tensor kind + 8 per (block, layer)" in dry.output

    run = CliRunner().invoke(quantize_command, args)
    assert run.exit_code == 0, run.output
    assert _plan_numbers(run.output) == planned  # the run prints the same plan first ...
    row = next(r for r in Manifest.load(folder).find("text") if "AUTO" in r.path)
    cost = row.auto["sensitivity_cost"]
    # ... and does what it said
    assert cost["error_items"] == planned["errors_todo"]
    assert cost["evaluations"] == planned["evaluations"] and cost["quantizations"] == planned["quantizations"]
    assert row.auto["sensitivity_method"] == "fast"
    assert read_gguf_info(folder / row.path).bits_per_weight <= 4.5

    again = CliRunner().invoke(quantize_command, [*args, "--dry-run"])
    assert "nothing to measure" in again.output  # the table is cached


@pytest.mark.e2e
def test_interrupted_calibration_points_resume_from_the_cache(model, tmp_path, monkeypatch):
    options = sensitivity.SensitivityOptions(method="fast", calibration=model["calibration"], max_text=2, max_images=2,
                                             cache_dir=tmp_path, n_threads=THREADS,
                                             candidates=("Q2_K", "Q3_K", "Q4_K", "Q8_0"))
    job = sensitivity.plan_sensitivity(model["source"], model["mmproj"], model["imatrix"], options, timing=False)
    assert job.plan.evaluations == 16 and job.plan.evaluations_cached == 0
    planned = {p.label for p in job.points}
    assert len(planned) == 16 and sum(p.layer is not None for p in job.points) == 8
    real = sensitivity.Measurer.measure
    calls = []

    def measure_then_stop(self, tensors, qtype, label):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(label)
        return real(self, tensors, qtype, label)

    monkeypatch.setattr(sensitivity.Measurer, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        job.run(progress=False)
    def record(self, tensors, qtype, label):
        calls.append(label)
        return real(self, tensors, qtype, label)

    monkeypatch.setattr(sensitivity.Measurer, "measure", record)
    job = sensitivity.plan_sensitivity(model["source"], model["mmproj"], model["imatrix"], options, timing=False)
    assert job.plan.evaluations_cached == 3 and job.plan.error_items_cached == job.plan.error_items
    result = job.run(progress=False)
    assert result.cost["evaluations"] == 16 - 3 and result.cost["error_items"] == 0
    assert sorted(calls) == sorted(planned)  # the run measured exactly the planned points, each once
    fast = result.meta["fast"]
    assert set(fast["kinds"]) == {"token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                  "ffn_down"}
    # two layers of one kind: the table's ΔKL per unit error differs by the fitted layer factor, which is the
    # measured (block, layer) point over the kind fits' prediction for that block
    factors = fast["layers"]["attention"]["factors"]
    assert fast["layers"]["attention"]["sampled"] == [0, 1, 3, 5] and len(fast["layers"]["ffn"]["factors"]) == 6
    groups = {g.name: g for g in result.table.groups}

    def per_error(layer):
        name = f"blk.{layer}.attn_k"
        return groups[name].delta_kl[T.Q3_K] / result.errors[name]["Q3_K"]

    def measured_factor(layer):
        base = sum(fast["kinds"][kind]["c"] * result.errors[f"blk.{layer}.{kind}"]["Q3_K"]
                   for kind in ("attn_q", "attn_k", "attn_v", "attn_output"))
        return result.probes[f"layer-attention-{layer}-Q3_K"]["kl_mean"] / base

    assert per_error(0) / per_error(3) == pytest.approx(factors[0] / factors[3], rel=1e-9)
    assert factors[0] / factors[3] == pytest.approx(measured_factor(0) / measured_factor(3), rel=1e-4)
    assert abs(math.log(factors[0] / factors[3])) > 1.0, factors  # the sampled layers do differ
    for group in result.table.groups:
        deltas = [group.delta_kl[t] for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q8_0)]
        assert deltas == sorted(deltas, reverse=True) and deltas[-1] >= 0, group.name
    again = sensitivity.plan_sensitivity(model["source"], model["mmproj"], model["imatrix"], options, timing=False)
    assert again.cached is not None and again.run() is again.cached


# --- AUTO: the folder's importance matrix, and budgets refused before any work -------------------------------
def test_auto_uses_the_folders_imatrix_or_computes_one(model, tmp_path):
    from medgemma_gguf.convert.quantize.folder import IMATRIX_AUTO, AutoRequest, folder_default_imatrix, plan_auto
    from medgemma_gguf.convert.quantize.imatrix import compute_imatrix, write_imatrix_gguf
    from medgemma_gguf.manifest import entry_for

    folder = Path(shutil.copytree(model["folder"], tmp_path / "out", ignore=shutil.ignore_patterns("imatrix*")))
    manifest = Manifest.load(folder)
    source = next(r for r in manifest.find("text"))
    assert folder_default_imatrix(folder, manifest, source) is None
    options = sensitivity.SensitivityOptions(cache_dir=tmp_path / "cache")
    plan = plan_auto(folder, AutoRequest(target_bpw=4.0, sensitivity=options), timing=False)
    assert plan.imatrix == IMATRIX_AUTO and plan.job.imatrix_pending
    assert f"computing {manifest.model}.imatrix" in "\n".join(plan.lines())
    assert "IQ2_XXS" in plan.job.plan.types  # planned with the matrix it is about to compute
    # a matrix recorded for this source is the folder's default
    path = write_imatrix_gguf(compute_imatrix(folder / source.path, calibration=model["calibration"], max_chunks=1,
                                              progress=False, n_threads=THREADS), folder / "imatrix-x.gguf")
    manifest.upsert(entry_for(folder, path, "imatrix", "F32", source=source.path, source_sha256=source.sha256))
    manifest.save(folder)
    assert folder_default_imatrix(folder, Manifest.load(folder), source) == path
    plan = plan_auto(folder, AutoRequest(target_bpw=4.0, sensitivity=options), timing=False)
    assert plan.imatrix == path and not plan.job.imatrix_pending and "imatrix-x.gguf, the folder's" in plan.lines()[1]
    none = plan_auto(folder, AutoRequest(target_bpw=4.0, imatrix="none", sensitivity=options), timing=False)
    assert none.imatrix is None and "IQ2_XXS" not in none.job.plan.types


def test_auto_computes_its_importance_matrix_on_the_first_chunks(model, tmp_path):
    from medgemma_gguf.convert.quantize.fast_sensitivity import ModelTiming
    from medgemma_gguf.convert.quantize.folder import AUTO_IMATRIX_CHUNKS, AutoRequest, plan_auto, quantize_folder

    folder = Path(shutil.copytree(model["folder"], tmp_path / "out", ignore=shutil.ignore_patterns("imatrix*")))
    options = sensitivity.SensitivityOptions(cache_dir=tmp_path / "cache")
    lines = "\n".join(plan_auto(folder, AutoRequest(target_bpw=4.0, sensitivity=options), timing=False).lines())
    assert f"on the first {AUTO_IMATRIX_CHUNKS} chunks of 512 positions of the calibration set first" in lines
    assert "(imatrix_chunks for more)" in lines and f"first {AUTO_IMATRIX_CHUNKS} chunks of 512 positions" in lines
    every = plan_auto(folder, AutoRequest(target_bpw=4.0, imatrix_chunks=None, sensitivity=options), timing=False)
    assert "on all of the calibration set first" in "\n".join(every.lines())
    for bad in (0, -2, 1.5, True):
        with pytest.raises(UserError, match="imatrix_chunks must be a whole number of at least 1"):
            AutoRequest(target_bpw=4.0, imatrix_chunks=bad)
    # the estimate: that share of the whole set's positions and images (the load once)
    timing = ModelTiming(load_seconds=2.0, seconds_per_position=0.01, seconds_per_image=1.0, positions=100, images=1,
                         all_positions=4096, all_images=8)
    assert timing.imatrix_seconds(None) == pytest.approx(timing.whole_set_seconds) == pytest.approx(2 + 40.96 + 8)
    assert timing.imatrix_seconds(2) == pytest.approx(2 + 0.25 * (40.96 + 8))
    assert timing.imatrix_seconds(100) == pytest.approx(timing.whole_set_seconds)
    # a matrix computed into the folder reads only that many chunks of the bundled set (26), and its row says so
    quantize_folder(folder, "Q8_0", imatrix="auto", imatrix_chunks=1, progress=False, n_threads=THREADS)
    [row] = Manifest.load(folder).find("imatrix")
    assert row.chunks == 1 and read_imatrix_chunks(folder / row.path) == 1
    with pytest.raises(UserError, match="imatrix_chunks must be a whole number"):
        quantize_folder(folder, "Q8_0", imatrix="auto", imatrix_chunks=0)


@pytest.mark.e2e
def test_auto_without_a_matrix_computes_one_records_it_and_plans_again_with_it(model, tmp_path):
    """A folder without an importance matrix: AUTO computes one (its first chunk here), records it in the
    manifest, plans again with it — the sensitivity table's cache key and meta carry its sha256 — and the AUTO
    quant is written with it (``auto_quantize_folder``'s ``imatrix_pending`` path, with the CLI's timings on)."""
    from medgemma_gguf.convert.quantize.folder import AutoRequest, auto_quantize_folder, imatrix_file
    from medgemma_gguf.hashing import sha256_of

    folder = Path(shutil.copytree(model["folder"], tmp_path / "out", ignore=shutil.ignore_patterns("imatrix*")))
    assert not Manifest.load(folder).find("imatrix")
    options = sensitivity.SensitivityOptions(calibration=model["calibration"], max_text=1, max_images=1,
                                             cache_dir=tmp_path / "cache", n_threads=THREADS,
                                             candidates=("Q2_K", "Q3_K", "Q4_K", "IQ2_XS", "Q8_0"))
    lines: list[str] = []
    made = auto_quantize_folder(folder, AutoRequest(target_bpw=4.0, imatrix_chunks=1, sensitivity=options),
                                progress=False, report=lines.append)
    manifest = Manifest.load(folder)
    matrix = imatrix_file(folder, manifest.model)
    text = "\n".join(lines)
    assert f"computing {matrix.name} on the first 1 chunks of 512 positions of the calibration set first" in text
    assert lines[-1] == f"  importance matrix ready: {matrix.name}"
    # computed on that chunk and recorded for the source model and calibration set
    [row] = manifest.find("imatrix")
    assert folder / row.path == matrix and row.sha256 == sha256_of(matrix) and row.chunks == 1
    assert read_imatrix_chunks(matrix) == 1
    assert row.source_sha256 == next(r for r in manifest.find("text") if r.path == model["source"].name).sha256
    # the table was measured with it: its hash keys the cache (a plan with the matrix finds the table) ...
    meta = made.sensitivity.meta
    assert meta["imatrix"] == str(matrix) and meta["imatrix_sha256"] == row.sha256
    again = sensitivity.plan_sensitivity(model["source"], model["mmproj"], matrix, options, timing=False)
    assert again.cached is not None and again.path == made.sensitivity.cache_path
    assert json.loads(made.sensitivity.cache_path.read_text())["key"] == again.key
    # types llama.cpp quantizes only with a matrix stayed candidates
    assert "IQ2_XS" in meta["candidates"]
    # the AUTO quant: written with the matrix, its row naming it
    [auto] = [r for r in manifest.find("text") if r.auto]
    assert auto.auto["imatrix"] == matrix.name and auto.imatrix == matrix.name
    assert auto.inputs is not None and auto.inputs["imatrix_sha256"] == row.sha256
    assert (folder / auto.path).is_file() and folder / auto.path == made.result.path
    assert read_gguf_info(folder / auto.path).bits_per_weight <= 4.0


def test_infeasible_budgets_are_refused_before_any_work(model, tmp_path, monkeypatch):
    from medgemma_gguf.convert.quantize.folder import AutoRequest, auto_quantize_folder

    folder = Path(shutil.copytree(model["folder"], tmp_path / "out"))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setattr(sensitivity.SensitivityJob, "run", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(sensitivity, "time_model", lambda *a, **k: pytest.fail("timed"))
    options = sensitivity.SensitivityOptions(cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match=r"below the smallest possible mix; feasible range 2\.0\d+ bpw .*"
                                        r"\.\. 32\.000 bpw \(unquantized F32\)"):
        auto_quantize_folder(folder, AutoRequest(target_bpw=1.5, imatrix=folder / "imatrix.gguf", sensitivity=options),
                             progress=False)
    with pytest.raises(UserError, match=r"above the unquantized size; feasible range"):
        auto_quantize_folder(folder, AutoRequest(target_size="10GB", sensitivity=options), progress=False)
    with pytest.raises(UserError, match=r"below the smallest possible mix; feasible range 2\.6\d+ bpw"):
        auto_quantize_folder(folder, AutoRequest(target_bpw=2.2, imatrix="none", sensitivity=options), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert not (tmp_path / "c" / "sensitivity").exists()


def test_the_cli_refuses_infeasible_budgets_before_timing_hashing_or_measuring(model, tmp_path, monkeypatch):
    """``quantize FOLDER --target-bpw 1`` (also --dry-run, --target-size, --vram; with the folder's matrix or one
    still to compute): refused from the GGUF's header, before the plan's quick timings, any hash or cache, naming
    the flag the user gave, with the feasible range and the fix in one line; the Python API names its argument."""
    from click.testing import CliRunner

    from medgemma_gguf.convert.quantize import folder as folder_module
    from medgemma_gguf.convert.quantize.cli import quantize_command
    from medgemma_gguf.convert.quantize.folder import AutoRequest, auto_quantize_folder

    folder = Path(shutil.copytree(model["folder"], tmp_path / "out"))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def work(what):
        return lambda *a, **k: pytest.fail(f"{what} before the budget was checked")

    monkeypatch.setattr(sensitivity, "time_model", work("timed the model"))
    monkeypatch.setattr(TensorErrors, "time_types", work("timed the types"))
    monkeypatch.setattr(sensitivity, "cached_file_sha256", work("hashed"))
    monkeypatch.setattr(sensitivity.SensitivityJob, "run", work("measured"))
    monkeypatch.setattr(folder_module, "compute_imatrix", work("computed an importance matrix"))
    monkeypatch.setattr(folder_module, "quantize_file", work("quantized"))
    cache = tmp_path / "c"
    below = r"is below the smallest possible mix; feasible range \d\.\d+ bpw \(every tensor at its smallest candidate\)"
    cases = [
        (["--target-bpw", "1.0"], rf"^--target-bpw 1 {below} \.\. 32\.000 bpw \(unquantized F32\); "
                                  r"raise --target-bpw$"),
        (["--target-bpw", "1.0", "--dry-run"], r"^--target-bpw 1 is below .*; raise --target-bpw$"),
        (["--target-size", "10GB"], r"^--target-size 9\.31 GiB is above the unquantized size; feasible range "
                                    r"\d+ MiB \.\. \d+ MiB \(unquantized F32\); lower --target-size or use the "
                                    r"unquantized file$"),
        (["--target-size", "10GB", "--dry-run"], r"^--target-size 9\.31 GiB is above the unquantized size; feasible "
                                                 r"range \d+ MiB \.\. \d+ MiB .*; lower --target-size or use"),
        (["--vram", "1MB", "--ctx", "256"], r"^--vram 1 MiB at --ctx 256 is below .*; raise --vram$"),
    ]
    for flags, message in cases:
        for imatrix in (["--imatrix", str(model["imatrix"])], []):  # the folder's matrix, or one to compute first
            run = CliRunner().invoke(quantize_command, [str(folder), *flags, *imatrix, "--threads", "1",
                                                        "--cache-dir", str(cache)])
            assert isinstance(run.exception, UserError), (flags, imatrix, run.output, run.exception)
            assert re.search(message, run.exception.for_cli()), run.exception.for_cli()
            assert "\n" not in run.exception.for_cli() and "AUTO:" not in run.output  # nothing planned or printed
    options = sensitivity.SensitivityOptions(cache_dir=cache, n_threads=THREADS)
    with pytest.raises(UserError, match=r"^target_bpw 1 is below .*; raise target_bpw$"):
        auto_quantize_folder(folder, AutoRequest(target_bpw=1.0, sensitivity=options), progress=False,
                             report=lambda line: pytest.fail(f"printed {line!r} before the budget was checked"))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert not cache.exists()
