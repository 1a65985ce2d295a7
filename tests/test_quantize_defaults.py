"""quantize's defaults: the folder's importance matrix for every type and recipe (said so, ``--no-imatrix`` to
leave it out), saved as ``<model>.imatrix`` (no ``*.gguf`` glob catches it, llama.cpp's GGUF reader reads it),
and ``quantize --list`` without a folder."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from medgemma_gguf.convert.quantize.cli import quantize_command
from medgemma_gguf.convert.quantize.folder import quantize_folder
from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.manifest import Manifest

RECIPE = ('name = "MINE"\nbase = "Q5_K"\n[[rules]]\ntensors = ["token_embd"]\ntype = "Q8_0"\n'
          'why = "the tied embedding makes every logit"\n')


@pytest.fixture(scope="module")
def with_imatrix(converted, calibration_subset, tmp_path_factory) -> Path:
    """mm-k256's folder after `quantize --quants Q4_K_M --imatrix auto` (on two calibration items)."""
    folder = Path(shutil.copytree(converted("mm-k256").manifest_path.parent, tmp_path_factory.mktemp("q") / "out"))
    quantize_folder(folder, "Q4_K_M", imatrix="auto", calibration=calibration_subset(["img-cxr-rll", "med-dka"]),
                    progress=False, n_threads=1)
    return folder


def _rows(folder: Path) -> dict:
    return {row.path: row for row in Manifest.load(folder).files}


def test_the_folders_imatrix_is_used_by_default_and_said_so(with_imatrix, tmp_path):
    folder = Path(shutil.copytree(with_imatrix, tmp_path / "out"))
    model = Manifest.load(folder).model
    imatrix = f"{model}.imatrix"
    assert _rows(folder)[imatrix].role == "imatrix"
    recipe = tmp_path / "mine.toml"
    recipe.write_text(RECIPE, encoding="utf-8")
    result = CliRunner().invoke(quantize_command, [str(folder), "--recipe", str(recipe), "--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert f"importance matrix: {imatrix}, the folder's" in result.output and "--no-imatrix" in result.output
    row = _rows(folder)[f"{model}-MINE.gguf"]
    assert row.imatrix == imatrix and row.inputs["imatrix_sha256"] == _rows(folder)[imatrix].sha256
    assert read_gguf_info(folder / row.path).metadata["quantize.imatrix.file"] == imatrix

    result = CliRunner().invoke(quantize_command, [str(folder), "--quants", "Q5_K_M", "--no-imatrix", "--quiet",
                                                   "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "importance matrix: none (--no-imatrix)" in result.output
    row = _rows(folder)[f"{model}-Q5_K_M.gguf"]
    assert row.imatrix is None and "quantize.imatrix.file" not in read_gguf_info(folder / row.path).metadata

    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(quantize_command, [str(folder), "--quants", "Q8_0", "--no-imatrix", "--imatrix",
                                                   imatrix])
    assert isinstance(result.exception, UserError) and "either --imatrix or --no-imatrix" in str(result.exception)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_the_imatrix_is_no_model_to_globs_and_llama_cpp_reads_it(with_imatrix):
    from medgemma_gguf.convert.quantize.imatrix import read_imatrix

    model = Manifest.load(with_imatrix).model
    path = with_imatrix / f"{model}.imatrix"
    assert path.is_file() and path not in list(with_imatrix.glob("*.gguf"))
    assert read_imatrix(path).tensor_names
    # what llama-quantize --imatrix does first (common_imatrix_load): gguf_init_from_file, whatever the name
    lib = ctypes.CDLL(str(Path(__import__("llama_cpp").__file__).parent / "lib" / "libggml-base.so.0"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    handle = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert handle
    try:
        assert lib.gguf_get_n_tensors(handle) == 2 * len(read_imatrix(path).tensor_names)
        assert lib.gguf_find_key(handle, b"imatrix.chunk_count") >= 0
    finally:
        lib.gguf_free(handle)


def test_quantize_list_needs_no_folder():
    result = CliRunner().invoke(quantize_command, ["--list"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "(main type)" in lines["Q4_K_M"] and "optional" in lines["Q4_K_M"]
    assert "needed" in lines["IQ2_XXS"] and "(MedGemma 4B)" in lines["UD-Q4_K_XL"]
    assert float(lines["UD-Q4_K_XL"].split()[2]) > float(lines["Q4_K_M"].split()[2])  # the recipe's extra bits
    result = CliRunner().invoke(quantize_command, [])
    assert result.exit_code == 2 and "missing OUTDIR" in result.output
