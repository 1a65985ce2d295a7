"""Exports for other tools: the Ollama Modelfile (FROM model + mmproj, Gemma 3's template, the stop string,
the model's sampling defaults from general.sampling.*, the license) and the stock llama-quantize command that
reproduces a recipe — its --tensor-type flags, applied as llama-quantize applies them (lower-cased, first
match), give every tensor the recipe's type through llama.cpp's own quantizer."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from medgemma_gguf.errors import ExistsError, UserError
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.manifest import Manifest

VARIANT = "mm-k256"


@pytest.fixture(scope="module")
def folder(converted, tmp_path_factory) -> Path:
    from medgemma_gguf.convert.quantize.folder import quantize_folder

    out = Path(shutil.copytree(converted(VARIANT).manifest_path.parent, tmp_path_factory.mktemp("x") / "out"))
    quantize_folder(out, "Q4_K_M", imatrix="none", progress=False, n_threads=1)
    return out


def test_ollama_modelfile(folder, tmp_path):
    from medgemma_gguf.convert.quantize.cli import export_group

    work = Path(shutil.copytree(folder, tmp_path / "out"))
    result = CliRunner().invoke(export_group, ["ollama", str(work), "--quant", "Q4_K_M"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(work)
    model = next(r.path for r in manifest.find("text") if r.type == "Q4_K_M")
    mmproj = manifest.find("mmproj")[0].path
    text = (work / "Modelfile").read_text()
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("FROM ")] == [f"FROM ./{model}", f"FROM ./{mmproj}"]
    assert "REQUIRES 0.30.4" in lines and 'PARAMETER stop "<end_of_turn>"' in lines
    metadata = read_gguf_info(work / model).metadata
    assert f"PARAMETER top_k {metadata['general.sampling.top_k']}" in lines
    assert f"PARAMETER top_p {metadata['general.sampling.top_p']:g}" in lines
    assert 'TEMPLATE """' in text and "<start_of_turn>user" in text and "<start_of_turn>model" in text
    assert "LICENSE" in text and "not a medical device" in text
    assert "ollama create" in result.output
    # a Modelfile someone else wrote is not replaced without --force
    (work / "Modelfile").write_text("FROM llama3\n")
    again = CliRunner().invoke(export_group, ["ollama", str(work)])
    assert isinstance(again.exception, ExistsError) and (work / "Modelfile").read_text() == "FROM llama3\n"


def _run_exported(argv: list[str], tmp_path: Path) -> Path:
    """Run an exported llama-quantize command line the way llama-quantize reads it (tools/quantize/quantize.cpp:
    --tensor-type PATTERN=TYPE with PATTERN lower-cased, --override-kv KEY=int:N|str:S, then IN OUT TYPE),
    through llama.cpp's quantizer (llama_model_quantize)."""
    import llama_cpp
    from gguf import GGMLQuantizationType

    from medgemma_gguf.convert.quantize.imatrix import read_imatrix
    from medgemma_gguf.convert.quantize.llama_quantize import run_llama_quantize

    assert argv[0] == "llama-quantize"
    args = argv[1:]
    overrides, metadata, imatrix = [], {}, None
    while args[0].startswith("--"):
        flag, value, args = args[0], args[1], args[2:]
        if flag == "--tensor-type":
            pattern, _, type_name = value.rpartition("=")
            overrides.append((pattern.lower(), GGMLQuantizationType[type_name.upper()]))
        elif flag == "--override-kv":
            key, _, typed = value.partition("=")
            kind, _, raw = typed.partition(":")
            metadata[key] = int(raw) if kind == "int" else raw
        elif flag == "--imatrix":
            imatrix = read_imatrix(Path(value))
        else:
            raise AssertionError(f"unexpected flag {flag}")
    source, _, type_name = args
    out = tmp_path / "reproduced.gguf"
    run_llama_quantize(Path(source), out, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}"), imatrix=imatrix,
                       overrides=overrides, metadata=metadata, n_threads=1)
    return out


@pytest.mark.parametrize("recipe", ["UD-Q4_K_XL", "UD-Q8_K_XL"])
def test_llama_quantize_command_reproduces_the_recipe(folder, tmp_path, recipe):
    from medgemma_gguf.convert.quantize.cli import export_group
    from medgemma_gguf.convert.quantize.folder import quantize_folder

    work = Path(shutil.copytree(folder, tmp_path / "out"))
    result = CliRunner().invoke(export_group, ["llama-quantize", str(work), "--recipe", recipe])
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    flags = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--tensor-type"]
    assert flags and all(re.fullmatch(r"[^=]+=[a-z0-9_]+", flag) for flag in flags)
    assert len(flags) < 40  # grouped by tensor kind and type, not one per tensor
    reproduced = read_gguf_info(_run_exported(argv, tmp_path))
    [ours] = quantize_folder(work, recipe, imatrix="none", progress=False, n_threads=1)
    assert {t.name: t.ggml_type for t in reproduced.tensors} == {t.name: t.ggml_type
                                                                 for t in read_gguf_info(ours.path).tensors}
    assert reproduced.metadata["general.file_type"] == read_gguf_info(ours.path).metadata["general.file_type"]


def test_llama_quantize_command_of_a_recipe_file_and_bad_inputs(folder, tmp_path):
    from medgemma_gguf.convert.quantize.export import llama_quantize_command

    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "MINE"\nbase = "Q5_K"\n[[rules]]\ntensors = ["token_embd"]\ntype = "Q8_0"\n'
                      'why = "the tied embedding makes every logit"\n[[rules]]\ntensors = ["ffn_down"]\n'
                      'layers = "0"\ntype = "Q6_K"\nwhy = "the first layer"\n')
    command = llama_quantize_command(folder, recipe)
    assert command.argv[-1] == "Q5_K_M" and command.imatrix is None
    assert r"^blk\.(0)\.ffn_down\.weight$=q6_k" in command.argv and r"^token_embd\.weight$=q8_0" in command.argv
    with pytest.raises(UserError, match="needs an importance matrix"):
        llama_quantize_command(folder, "UD-IQ2_XXS")
    with pytest.raises(UserError):
        llama_quantize_command(folder, "NO-SUCH-RECIPE")
