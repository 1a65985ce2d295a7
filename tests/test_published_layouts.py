"""Any folder or file: chat (with an image), fit, eval and load() on folders laid out as Unsloth, ggml-org and
bartowski publish MedGemma (no manifest.json), quant types read from the headers, the mmproj found beside
the model (F16 preferred, another model's passed over with the reason), the default choice rule, and errors
worded for the interface they reach."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from published import LAYOUTS, MODEL, QuantStore, make_layout, native_pixels, save_png

from medgemma_gguf.errors import InputError, MismatchError, UserError

VARIANT = "mm-k256"
IMAGE_SIZE = 224


@pytest.fixture(scope="module")
def store(converted, tmp_path_factory) -> QuantStore:
    mmprojs = {label: converted(VARIANT, "f32", label.lower()).mmproj_path for label in ("F16", "BF16", "F32")}
    return QuantStore(tmp_path_factory.mktemp("quants"), converted(VARIANT).text_path, mmprojs)


@pytest.fixture(scope="module")
def layout(store, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_layout(kind, tmp_path_factory.mktemp(kind) / f"{kind}-GGUF", store)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return save_png(native_pixels(IMAGE_SIZE, 3), tmp_path_factory.mktemp("img") / "cxr.png")


@pytest.fixture
def cli_main():
    from medgemma_gguf import cli

    return cli.main


EXPECTED = {  # file -> type read from the header (general.file_type), never from the name
    "unsloth": {f"{MODEL}-Q8_0.gguf": "Q8_0", f"{MODEL}-UD-Q4_K_XL.gguf": "Q4_K_M", f"{MODEL}-Q4_K_M.gguf": "Q4_K_M"},
    "ggml-org": {f"{MODEL}-f16.gguf": "F16", f"{MODEL}-Q8_0.gguf": "Q8_0", f"{MODEL}-Q4_K_M.gguf": "Q4_K_M"},
    "bartowski": {f"google_{MODEL}-Q6_K.gguf": "Q6_K", f"google_{MODEL}-Q4_K_M.gguf": "Q4_K_M"},
}
MMPROJ = {"unsloth": "mmproj-F16.gguf", "ggml-org": "mmproj-model-f16.gguf",
          "bartowski": f"mmproj-google_{MODEL}-f16.gguf"}


@pytest.mark.parametrize("kind", LAYOUTS)
def test_fit_ranks_a_published_folder_by_bits_per_weight(kind, layout, cli_main, capsys):
    folder = layout(kind)
    assert not (folder / "manifest.json").exists()
    assert cli_main(["fit", str(folder), "--vram", "8GiB", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)["quants"]
    assert {q["file"]: q["type"] for q in ranked} == EXPECTED[kind]  # no mmproj, no imatrix among the quants
    assert [q["bpw"] for q in ranked] == sorted((q["bpw"] for q in ranked), reverse=True)
    assert all(q["fits"] and q["mmproj"] == MMPROJ[kind] for q in ranked)
    assert cli_main(["fit", str(folder), "--vram", "8GiB"]) == 0
    text = capsys.readouterr().out
    assert "ranked by bits per weight" in text and all(name in text for name in EXPECTED[kind])


def _greedy_reply(model_path: Path, mmproj: Path, image: Path, n_tokens: int) -> str:
    from medgemma_gguf.runtime.chat import load

    with load(model_path, mmproj, n_gpu_layers=0, n_ctx=512, n_threads=1) as model:
        messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                                 {"type": "image", "path": str(image)}]}]
        return model.chat(messages, max_tokens=n_tokens).text


@pytest.mark.parametrize("kind", LAYOUTS)
def test_chat_with_an_image_on_a_published_folder(kind, layout, image, cli_main, capsys):
    from medgemma_gguf.runtime.quant_choice import CPU_MAX_BPW, choose_quant

    folder = layout(kind)
    choice = choose_quant(folder, n_ctx=512, gpu=False)
    assert choice.bpw <= CPU_MAX_BPW and choice.mmproj == folder / MMPROJ[kind]
    expected = _greedy_reply(choice.path, folder / MMPROJ[kind], image, 6)
    args = ["--image", str(image), "--prompt", "Describe this X-ray", "--max-tokens", "6", "--threads", "1",
            "--ctx", "512", "--n-gpu-layers", "0"]
    assert cli_main(["chat", str(folder), *args]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert f"loaded {choice.path.name} + {MMPROJ[kind]}" in captured.err
    assert f"at most {CPU_MAX_BPW} bits per weight" in captured.err
    if kind == "unsloth":  # three mmprojs: F16 taken, and said so
        assert "mmproj: mmproj-F16.gguf (F16; preferred to mmproj-BF16.gguf (BF16), mmproj-F32.gguf (F32))" \
            in captured.err
    # one GGUF file given alone: the mmproj beside it is found (the README's examples)
    assert cli_main(["chat", str(choice.path), *args]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and f"mmproj: found beside it: {MMPROJ[kind]}" in captured.err


def test_load_a_file_finds_the_mmproj_beside_it(layout):
    from medgemma_gguf.runtime.chat import load

    folder = layout("ggml-org")
    with load(folder / f"{MODEL}-Q8_0.gguf", n_gpu_layers=0, n_ctx=512, n_threads=1) as model:
        assert model.mmproj_path == folder / "mmproj-model-f16.gguf" and model.has_vision
        assert "found beside it" in model.mmproj_note


def test_eval_on_a_folder_without_manifest(layout, store, tmp_path):
    from medgemma_gguf.quant_eval.evaluate import EvalOptions, run_eval

    folder = layout("unsloth")
    report = run_eval([folder], str(store.text_f32), tmp_path / "report",
                      EvalOptions(slices=["vqa-mini:2", "medqa-mini:2"], reference_mmproj=store.mmprojs["F32"],
                                  heldout=False, cache_dir=tmp_path / "cache", measure_speed=False, progress=False,
                                  n_threads=1))
    rows = {row.file: row for row in report.rows}
    assert {name: row.type for name, row in rows.items()} == EXPECTED["unsloth"]
    assert all(row.ok and row.kld is not None and row.mmproj == "mmproj-F32.gguf" for row in rows.values())
    assert rows[f"{MODEL}-Q8_0.gguf"].kld.mean < rows[f"{MODEL}-Q4_K_M.gguf"].kld.mean


def test_fit_ranks_by_kl_when_the_folder_has_a_report(layout, tmp_path, cli_main, capsys):
    folder = tmp_path / "with-report"
    shutil.copytree(layout("ggml-org"), folder, copy_function=shutil.copy)
    (folder / "report").mkdir()
    (folder / "report" / "report.json").write_text(json.dumps({"rows": [
        {"file": f"{MODEL}-Q4_K_M.gguf", "kld_mean": 0.001}, {"file": f"{MODEL}-Q8_0.gguf", "kld_mean": 0.01}]}))
    assert cli_main(["fit", str(folder), "--vram", "8GiB", "--json"]) == 0
    ranked = [q["file"] for q in json.loads(capsys.readouterr().out)["quants"]]
    assert ranked == [f"{MODEL}-Q4_K_M.gguf", f"{MODEL}-Q8_0.gguf", f"{MODEL}-f16.gguf"]  # measured first, by KL


def test_default_choice_rule_and_quant_override(layout):
    from medgemma_gguf.runtime.quant_choice import choose_quant

    folder = layout("unsloth")
    cpu = choose_quant(folder, n_ctx=512, gpu=False)
    assert cpu.path.name == f"{MODEL}-UD-Q4_K_XL.gguf"  # the most bits per weight at or under 5.5
    assert "no GPU" in cpu.why
    gpu = choose_quant(folder, n_ctx=512, vram_bytes=8 << 30)
    assert gpu.path.name == f"{MODEL}-Q8_0.gguf" and "fits the GPU" in gpu.why
    assert choose_quant(folder, n_ctx=512, gpu=False, quant="Q8_0").path.name == f"{MODEL}-Q8_0.gguf"
    named = choose_quant(folder, n_ctx=512, gpu=False, quant="ud-q4_k_xl")  # a name, as the repo lists it
    assert named.path.name == f"{MODEL}-UD-Q4_K_XL.gguf" and named.type == "Q4_K_M"
    by_type = choose_quant(folder, n_ctx=512, gpu=False, quant="Q4_K_M")  # the file named so before the type
    assert by_type.path.name == f"{MODEL}-Q4_K_M.gguf"
    with pytest.raises(UserError, match=r"has no quant 'Q2_K'; it has .*Q8_0 \(medgemma-4b-it-Q8_0.gguf\)") as caught:
        choose_quant(folder, n_ctx=512, quant="Q2_K")
    assert "pick one with quant" in str(caught.value) and "pick one with --quant" in caught.value.for_cli()


def test_types_come_from_the_header_not_the_name(layout, tmp_path):
    from medgemma_gguf.manifest import Manifest

    shutil.copy(layout("ggml-org") / f"{MODEL}-Q4_K_M.gguf", tmp_path / "model-Q8_0.gguf")
    (row,) = Manifest.discover(tmp_path).files
    assert (row.role, row.type) == ("text", "Q4_K_M")


@pytest.fixture
def foreign_folder(layout, converted, tmp_path) -> Path:
    """A text model with another model's (mm-deep's) mmproj beside it."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(layout("ggml-org") / f"{MODEL}-Q4_K_M.gguf", folder)
    shutil.copy(converted("mm-deep", "f32", "f16").mmproj_path, folder / "mmproj-F16.gguf")
    return folder


def test_another_models_mmproj_is_passed_over_and_images_are_refused_with_the_reason(foreign_folder, image,
                                                                                    cli_main, capsys):
    from medgemma_gguf.runtime.chat import load

    before = sorted(p.name for p in foreign_folder.iterdir())
    with load(foreign_folder, n_gpu_layers=0, n_ctx=512, n_threads=1) as model:
        assert model.mmproj_path is None and "belongs to another model" in model.mmproj_note
        with pytest.raises(InputError) as caught:
            model.chat([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                     {"type": "image", "path": str(image)}]}])
        message = str(caught.value)
        assert "mmproj-F16.gguf projects images to width 64" in message and "pass one with mmproj" in message
        assert "--mmproj" not in message and "pass one with --mmproj" in caught.value.for_cli()
        assert "the server's mmproj (serve --mmproj)" in caught.value.for_http()
        assert model.chat([{"role": "user", "content": "Hello"}], max_tokens=2).completion_tokens >= 1
    assert cli_main(["chat", str(foreign_folder), "--image", str(image), "--prompt", "x", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: this model was loaded without an mmproj (mmproj-F16.gguf projects images")
    assert err[-1].endswith("pass one with --mmproj to send images")
    with pytest.raises(MismatchError, match="belongs to another model"):
        load(foreign_folder / f"{MODEL}-Q4_K_M.gguf", foreign_folder / "mmproj-F16.gguf", n_threads=1)
    assert sorted(p.name for p in foreign_folder.iterdir()) == before  # nothing written


def test_a_folder_without_ggufs_or_a_text_model_is_a_clear_error(tmp_path, layout, cli_main, capsys):
    assert cli_main(["fit", str(tmp_path)]) == 2
    assert "has no manifest.json and no .gguf files" in capsys.readouterr().err
    shutil.copy(layout("ggml-org") / "mmproj-model-f16.gguf", tmp_path)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert cli_main(["chat", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no readable Gemma 3 text GGUF" in err[0] and "broken.gguf" in err[0]
