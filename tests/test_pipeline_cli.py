"""The top-level command line: every subcommand is reachable, convert chains into quantize, and the demo
runs the whole pipeline (build, convert, imatrix, quantize, chat with an image, evaluate)."""

from __future__ import annotations

import json

import gguf
import pytest
from PIL import Image

from medgemma_gguf.cli import SUBCOMMANDS, main


def _run(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_subcommand_is_listed_and_has_help(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert set(SUBCOMMANDS) >= {"convert", "imatrix", "quantize", "chat", "serve", "fit", "eval", "demo", "check",
                                "pull", "push", "export"}
    for name in SUBCOMMANDS:
        assert f"  {name}" in out
        code, sub_help, _ = _run(capsys, name, "--help")
        assert code == 0 and "Usage:" in sub_help, name
        assert "%%" not in sub_help, f"{name} --help: click prints help text as written, so '%%' shows doubled"
    assert "%%" not in out


def test_convert_then_quantize_in_one_command(tiny_checkpoint, tmp_path, capsys):
    code, out, err = _run(capsys, "convert", tiny_checkpoint("mm-k256"), "--outdir", tmp_path, "--name", "m",
                          "--quants", "Q8_0,Q4_K_M", "--quiet")
    assert code == 0, err
    assert "wrote m-Q4_K_M.gguf" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    roles = {row["path"]: (row["role"], row["type"]) for row in manifest["files"]}
    assert roles["m-Q8_0.gguf"] == ("text", "Q8_0") and roles["m-Q4_K_M.gguf"] == ("text", "Q4_K_M")
    assert roles["mmproj-m-F16.gguf"][0] == "mmproj"
    reader = gguf.GGUFReader(tmp_path / "m-Q8_0.gguf")
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors)
    assert (tmp_path / "README.md").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--quants", "Q9_9"], "unknown quant type 'Q9_9'"),
    (["--quants", "IQ2_XXS"], "IQ2_XXS need an importance matrix; add --imatrix auto"),
    (["--quants", "Q4_K_M", "--imatrix", "missing.gguf"], "imatrix file missing.gguf not found"),
    (["--imatrix", "auto"], "--imatrix only applies with --quants"),
])
def test_bad_quant_requests_fail_before_converting(tiny_checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "convert", tiny_checkpoint("text"), "--outdir", out, "--quiet", *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    demo = tmp_path / "demo"
    code, out, err = _run(capsys, "demo", "--outdir", demo)
    assert code == 0, err
    assert (demo / "checkpoint" / "model.safetensors.index.json").is_file()
    gguf_dir = demo / "gguf"
    names = {p.name for p in gguf_dir.iterdir()}
    assert {"tiny-medgemma-BF16.gguf", "mmproj-tiny-medgemma-F16.gguf", "tiny-medgemma-Q8_0.gguf",
            "tiny-medgemma-Q4_K_M.gguf", "tiny-medgemma-UD-Q4_K_XL.gguf", "tiny-medgemma.imatrix",
            "manifest.json", "README.md"} <= names
    with Image.open(demo / "images" / "demo-xray.png") as image:
        assert image.mode == "L" and image.size == (256, 256)
    assert "reply (random weights, so gibberish)" in out and "16 generated" in out
    report = json.loads((gguf_dir / "report" / "report.json").read_text())
    rows = {row["type"]: row for row in report["rows"]}
    assert not any(row.get("error") for row in rows.values())
    assert rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"]
    assert rows["UD-Q4_K_XL"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"]
    assert (gguf_dir / "report" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses everything that is up to date and still succeeds
    code, out, err = _run(capsys, "demo", "--outdir", demo, "--no-eval")
    assert code == 0, err
    assert "up to date tiny-medgemma-Q4_K_M.gguf" in out
    # --force (as scripts/demo.sh passes) rebuilds everything over the earlier run's outputs
    before = (demo / "checkpoint" / "config.json").read_bytes()
    code, out, err = _run(capsys, "demo", "--outdir", demo, "--force", "--no-eval")
    assert code == 0, err
    assert "building tiny mm-k256 checkpoint" in out and "wrote tiny-medgemma-Q4_K_M.gguf" in out
    assert (demo / "checkpoint" / "config.json").read_bytes() == before
    assert sorted(p.name for p in demo.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


@pytest.mark.slow
def test_demo_on_the_text_only_variant_runs_twice(tmp_path, capsys):
    demo = tmp_path / "demo"
    for expected in ("wrote tiny-medgemma-Q4_K_M.gguf", "up to date tiny-medgemma-Q4_K_M.gguf"):
        code, out, err = _run(capsys, "demo", "--outdir", demo, "--variant", "text", "--no-eval")
        assert code == 0, err
        assert expected in out and "chat (" not in out  # no mmproj, so no image chat
    assert not (demo / "gguf" / "mmproj-tiny-medgemma-F16.gguf").exists()


def test_unknown_demo_variant_is_refused_before_writing(tmp_path, capsys):
    code, _, err = _run(capsys, "demo", "--outdir", tmp_path / "demo", "--variant", "huge")
    assert code == 2 and err.startswith("error: unknown demo variant 'huge'; choose one of mm-k256")
    assert not (tmp_path / "demo").exists()
