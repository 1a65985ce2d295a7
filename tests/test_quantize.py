"""llama.cpp quantization of the tiny MedGemma fixture: every type and recipe loads and generates, the types
read back are the ones asked for, quality orders by bits, imatrix use, the output folder, and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import image_text_greedy_tokens

from medgemma_gguf.convert.quantize.folder import quantize_folder
from medgemma_gguf.convert.quantize.imatrix import compute_imatrix, read_imatrix, write_imatrix_gguf
from medgemma_gguf.convert.quantize.llama_quantize import quantize_file, resolve_quants
from medgemma_gguf.convert.quantize.recipe import builtin_recipe_names
from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.manifest import Manifest
from medgemma_gguf.quant_eval.metrics import kl_divergence_full
from medgemma_gguf.quant_types import FILE_TYPE
from medgemma_gguf.runtime.engine import Engine

CALIBRATION_ITEMS = ("img-cxr-rll", "med-dka")
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_M", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "UD-IQ2_XXS", "UD-IQ3_XXS"}
TEXT = ("The patient was admitted with shortness of breath and a productive cough. The chest radiograph "
        "showed a right lower lobe consolidation. Treatment with antibiotics was started and the fever resolved.")


@pytest.fixture(scope="module")
def calibration(calibration_subset) -> Path:
    return calibration_subset(CALIBRATION_ITEMS)


def _copy_folder(result, target: Path) -> Path:
    shutil.copytree(result.manifest_path.parent, target)
    return target


@pytest.fixture(scope="module")
def k256(converted, tmp_path_factory):
    return converted("mm-k256")


@pytest.fixture(scope="module")
def k256_imatrix(k256, calibration, tmp_path_factory):
    imatrix = compute_imatrix(k256.text_path, k256.mmproj_path, calibration=calibration, progress=False)
    path = write_imatrix_gguf(imatrix, tmp_path_factory.mktemp("imatrix") / "k256.imatrix.gguf")
    return read_imatrix(path)


@pytest.fixture(scope="module")
def quantized(k256, k256_imatrix, tmp_path_factory):
    """``quantized(name, with_imatrix=None) -> QuantResult``, made once (imatrix by default where needed)."""
    folder = tmp_path_factory.mktemp("quants")
    done = {}

    def get(name: str, with_imatrix: bool | None = None):
        with_imatrix = name in NEEDS_IMATRIX if with_imatrix is None else with_imatrix
        key = (name, with_imatrix)
        if key not in done:
            spec = resolve_quants([name])[0]
            out = folder / f"tiny-{name}{'-imat' if with_imatrix else ''}.gguf"
            done[key] = quantize_file(k256.text_path, out, spec, imatrix=k256_imatrix if with_imatrix else None,
                                      imatrix_name="k256.imatrix.gguf", progress=False, n_threads=2)
        return done[key]

    return get


def _text_ids(engine: Engine) -> list[int]:
    return [engine.bos_token, *engine.tokenize(TEXT)]


def _logits(path: Path) -> np.ndarray:
    with Engine(path, n_ctx=256, n_threads=2) as engine:
        return engine.eval_tokens(_text_ids(engine), logits="all")


ALL_QUANTS = [*FILE_TYPE, *builtin_recipe_names()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_QUANTS)
def test_every_type_loads_and_generates_with_the_types_asked_for(name, quantized, k256):
    result = quantized(name)
    header = read_gguf_info(result.path)
    assert result.actual_types == {t.name: t.ggml_type.name for t in header.tensors}  # read back, not assumed
    assert sum(result.tensor_type_counts.values()) == 1 + 7 * 6
    assert header.metadata["medgemma_gguf.quant"] == name
    if result.planned_types:  # a recipe: every planned type is in the file (all k256 widths fit every block)
        assert {k: result.actual_types[k] for k in result.planned_types} == result.planned_types
    else:
        assert name in FILE_TYPE
    assert result.fallbacks == []
    if name in NEEDS_IMATRIX:
        assert header.metadata["quantize.imatrix.entries_count"] == 6 * 7
    image_text_greedy_tokens(result.path, k256.mmproj_path)


@pytest.mark.slow
def test_kl_divergence_orders_by_bits_and_ud_q4_k_xl_beats_q4_k_m(quantized, k256):
    reference = _logits(k256.text_path)
    kl = {name: float(kl_divergence_full(reference, _logits(quantized(name).path)).mean())
          for name in ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K", "UD-Q4_K_XL")}
    assert kl["Q8_0"] < kl["Q6_K"] < kl["Q4_K_M"] < kl["Q2_K"], kl
    assert kl["UD-Q4_K_XL"] < kl["Q4_K_M"], kl
    assert quantized("UD-Q4_K_XL").bytes <= 1.15 * quantized("Q4_K_M").bytes


def test_imatrix_changes_the_output(quantized, k256):
    plain, weighted = quantized("Q4_K_M", with_imatrix=False), quantized("Q4_K_M", with_imatrix=True)
    assert plain.actual_types == weighted.actual_types
    assert sha256_of(plain.path) != sha256_of(weighted.path)
    assert not np.array_equal(_logits(plain.path), _logits(weighted.path))
    assert "quantize.imatrix.file" in read_gguf_info(weighted.path).metadata
    assert "quantize.imatrix.file" not in read_gguf_info(plain.path).metadata


def test_fallbacks_are_read_back_from_the_file(converted, tmp_path):
    deep = converted("mm-deep")  # widths 64 / 128: no 256-element k-quant block fits
    result = quantize_file(deep.text_path, tmp_path / "deep-UD-Q4_K_XL.gguf", resolve_quants(["UD-Q4_K_XL"])[0],
                           progress=False, n_threads=2)
    header = {t.name: t.ggml_type.name for t in read_gguf_info(result.path).tensors}
    assert result.fallbacks and {f.tensor for f in result.fallbacks} == {
        name for name, wanted in result.planned_types.items() if header[name] != wanted}
    for fallback in result.fallbacks:
        assert header[fallback.tensor] == fallback.actual != fallback.wanted
        assert "not a multiple of" in fallback.reason
    standard = quantize_file(deep.text_path, tmp_path / "deep-Q4_K_M.gguf", resolve_quants(["Q4_K_M"])[0],
                             progress=False, n_threads=2)
    assert standard.fallbacks and all(header_type != "Q4_K" for header_type in standard.tensor_type_counts)
    image_text_greedy_tokens(result.path, deep.mmproj_path)


def _listing(folder: Path) -> dict[str, str]:
    return {p.name: sha256_of(p) for p in folder.iterdir()}


def test_folder_quantize_manifest_card_skip_and_force(k256, calibration, tmp_path):
    folder = _copy_folder(k256, tmp_path / "out")
    results = quantize_folder(folder, "Q4_K_M,UD-Q4_K_XL", imatrix="auto", calibration=calibration,
                              progress=False, n_threads=2)
    model = k256.name
    assert [r.path.name for r in results] == [f"{model}-Q4_K_M.gguf", f"{model}-UD-Q4_K_XL.gguf"]
    manifest = Manifest.load(folder)
    rows = {row.path: row for row in manifest.files}
    imatrix_row = rows[f"{model}.imatrix"]
    assert imatrix_row.role == "imatrix" and imatrix_row.source == k256.text_path.name
    for result in results:
        row = rows[result.path.name]
        assert row.role == "text" and row.type == result.type_name and row.bytes == result.path.stat().st_size
        assert row.sha256 == sha256_of(result.path) and row.tensor_types == result.tensor_type_counts
        assert row.bits_per_weight == pytest.approx(result.bpw, abs=1e-4)
        assert row.imatrix == f"{model}.imatrix" and row.mmproj == k256.mmproj_path.name
    # bpw: 8 x bytes / weights of the 2-D tensors, from the header
    header = read_gguf_info(results[0].path)
    matrices = [t for t in header.tensors if len(t.shape) >= 2]
    assert results[0].bpw == pytest.approx(8 * sum(t.n_bytes for t in matrices) / sum(t.n_elements for t in matrices))
    card = (folder / "README.md").read_text(encoding="utf-8")
    for text in (f"{model}-Q4_K_M.gguf", f"{model}-UD-Q4_K_XL.gguf", "llama-mtmd-cli -m", "--mmproj",
                 "medgemma-gguf chat", "License", f"{results[1].bpw:.2f}"):
        assert text in card

    before = _listing(folder)
    again = quantize_folder(folder, ["Q4_K_M", "UD-Q4_K_XL"], imatrix="auto", calibration=calibration,
                            progress=False)
    assert all(r.skipped for r in again) and _listing(folder) == before
    assert [r.tensor_type_counts for r in again] == [r.tensor_type_counts for r in results]

    with open(results[0].path, "r+b") as handle:  # a changed file is not skipped, nor silently replaced
        handle.seek(-1, 2)
        handle.write(b"\x01")
    with pytest.raises(UserError, match="pass force=True to rebuild it") as caught:
        quantize_folder(folder, "Q4_K_M", imatrix="auto", calibration=calibration, progress=False)
    assert "pass --force to rebuild it" in caught.value.for_cli()
    rebuilt = quantize_folder(folder, "Q4_K_M", imatrix="auto", calibration=calibration, force=True, progress=False)
    assert not rebuilt[0].skipped and sha256_of(rebuilt[0].path) == before[results[0].path.name]


def test_cli_quantize_and_list(k256, tmp_path):
    from click.testing import CliRunner

    from medgemma_gguf.convert.quantize.cli import quantize_command

    folder = _copy_folder(k256, tmp_path / "out")
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "MINE"\nbase = "Q5_K"\n[[rules]]\ntensors = ["token_embd"]\ntype = "Q8_0"\n'
                      'why = "the tied embedding makes every logit"\n', encoding="utf-8")
    result = CliRunner().invoke(quantize_command, [str(folder), "--quants", "Q8_0", "--recipe", str(recipe),
                                                   "--quiet", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert f"wrote {k256.name}-Q8_0.gguf" in result.output and f"wrote {k256.name}-MINE.gguf" in result.output
    counts = Manifest.load(folder)
    assert {row.path: row.tensor_types for row in counts.find("text")}[f"{k256.name}-MINE.gguf"] == {
        "Q5_K": 42, "Q8_0": 1}
    listed = CliRunner().invoke(quantize_command, ["--list"])
    assert listed.exit_code == 0 and "Q4_K_M" in listed.output and "UD-Q4_K_XL" in listed.output


# --- bad inputs: a clear error, and the folder unchanged ---------------------------------------------------
@pytest.fixture
def folder(k256, tmp_path) -> Path:
    return _copy_folder(k256, tmp_path / "out")


def test_unknown_type_is_refused(folder):
    before = _listing(folder)
    with pytest.raises(UserError, match=r"unknown quant type 'Q4_K_X'; valid: .*Q4_K_M.*UD-Q4_K_XL"):
        quantize_folder(folder, "Q8_0,Q4_K_X", progress=False)
    assert _listing(folder) == before


@pytest.mark.parametrize("name", ["IQ2_XXS", "UD-IQ3_XXS"])
def test_imatrix_type_without_imatrix_says_how_to_make_one(folder, name):
    before = _listing(folder)
    with pytest.raises(UserError) as caught:
        quantize_folder(folder, f"Q8_0,{name}", progress=False)
    message = str(caught.value)
    assert f"{name} needs an importance matrix" in message
    assert "pass imatrix auto" in message and "medgemma-gguf imatrix" in message and "--mmproj" in message
    assert "pass --imatrix auto" in caught.value.for_cli()
    assert _listing(folder) == before


def test_imatrix_of_another_model_is_refused(folder, converted, calibration, tmp_path):
    deep = converted("mm-deep")
    other = write_imatrix_gguf(compute_imatrix(deep.text_path, calibration=calibration, progress=False),
                               tmp_path / "deep.imatrix.gguf")
    before = _listing(folder)
    with pytest.raises(UserError, match="the imatrix does not belong to"):
        quantize_folder(folder, "IQ2_XXS", imatrix=other, progress=False)
    assert _listing(folder) == before


def test_bad_recipe_file_is_refused_before_anything_is_written(folder, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('name = "BAD"\nbase = "Q4_K"\n\n[[rules]]\ntensors = ["ffn_down"]\ntype = "Q5_Z"\n')
    before = _listing(folder)
    with pytest.raises(UserError, match=rf"{recipe}:6: rule 1: type 'Q5_Z'"):
        quantize_folder(folder, "Q8_0", recipe_files=[recipe], progress=False)
    assert _listing(folder) == before


def test_llama_cpp_failure_leaves_nothing(k256, tmp_path):
    truncated = tmp_path / "truncated-F32.gguf"
    truncated.write_bytes(k256.text_path.read_bytes()[: k256.text_path.stat().st_size // 2])
    with pytest.raises(UserError, match="llama.cpp could not quantize truncated-F32.gguf"):
        quantize_file(truncated, tmp_path / "out.gguf", resolve_quants(["Q4_K_M"])[0], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated-F32.gguf"]


def test_quantized_or_vision_sources_are_refused(quantized, k256, tmp_path):
    with pytest.raises(UserError, match="already quantized"):
        quantize_file(quantized("Q8_0").path, tmp_path / "x.gguf", resolve_quants(["Q4_K_M"])[0], progress=False)
    with pytest.raises(UserError, match="is an mmproj"):
        quantize_file(k256.mmproj_path, tmp_path / "x.gguf", resolve_quants(["Q4_K_M"])[0], progress=False)
    assert not list(tmp_path.iterdir())


def test_folder_without_unquantized_model_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "m", "source": {}, "files": []}))
    with pytest.raises(UserError, match="no unquantized .* text GGUF"):
        quantize_folder(tmp_path, "Q8_0", progress=False)
