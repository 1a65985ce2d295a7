"""Volumes, slides and longitudinal pairs through the runtime: the prompt is the HF processor's, token for token,
in the notebooks' layouts; a chat with a volume gives HF's greedy reply; the context check counts images and
says how many fit; the CLI and the server take studies (tiny ``mm-deep`` fixture, 112-px images of 4 tokens)."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np
import pytest
from imaging_data import write_series, write_slide
from PIL import Image
from test_runtime_chat import (
    VARIANT,
    hf_generate,
    hf_inputs,
    image_size,
    image_token_id,
    native_image,
    text_of,
    until_end,
)

from medgemma_gguf.errors import ResourceError
from medgemma_gguf.runtime.prompt import load_presets
from medgemma_gguf.runtime.slides import open_slide
from medgemma_gguf.runtime.studies import longitudinal_messages, slide_messages, volume_messages
from medgemma_gguf.runtime.volumes import open_volume

CT = load_presets()["ct-findings"]
CXR = load_presets()["cxr-longitudinal"]
PATHOLOGY = load_presets()["pathology-patches"]


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return tiny_checkpoint(VARIANT)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    path = tmp_path_factory.mktemp("studies") / "ct"
    write_series(path, n=7)
    return path


@pytest.fixture(scope="module")
def long_series(tmp_path_factory):
    path = tmp_path_factory.mktemp("studies") / "ct70"
    write_series(path, n=70, rows=8, cols=8)
    return path


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("studies") / "slide.tiff"
    write_slide(path, 2688, 1792, levels=3)
    return path


def _pil(pixels) -> Image.Image:
    return Image.fromarray(np.asarray(pixels))


def _slices(series, n: int, size: int) -> list[Image.Image]:
    with open_volume(series, slices=n) as volume:
        return [_pil(p) for p in volume.images(size)]


def _hf_volume_messages(images, instruction: str, question: str) -> list[dict]:
    content = [{"type": "text", "text": instruction}]
    for number, img in enumerate(images, 1):
        content += [{"type": "image", "image": img}, {"type": "text", "text": f"SLICE {number}"}]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def test_volume_prompt_is_the_hf_processors_in_the_ct_notebooks_layout(folder, chat_model, series):
    messages = volume_messages({"path": str(series), "slices": 3}, CT.question, instruction=CT.instruction)
    prompt = chat_model.prompt(messages)
    images = _slices(series, 3, image_size(folder))
    reference = hf_inputs(folder, _hf_volume_messages(images, CT.instruction, CT.question))
    assert prompt.flat_ids(image_token_id(folder)) == reference["input_ids"][0].tolist()
    assert prompt.n_images == 3
    for part, img in zip([p for p in prompt.parts if not isinstance(p, list)], images, strict=True):
        np.testing.assert_array_equal(part.pixels, np.asarray(img))
    # the template trims each text: the query's leading blank line goes, so "SLICE 3" and the query touch
    assert ("below carefully.<start_of_image>SLICE 1<start_of_image>SLICE 2<start_of_image>SLICE 3Based on the "
            "visual evidence") in prompt.text


def test_chat_with_a_volume_gives_hfs_greedy_reply(folder, chat_model, hf_model, series):
    messages = volume_messages({"path": str(series), "slices": 4}, "Describe the findings.")
    images = _slices(series, 4, image_size(folder))
    hf_messages = [{"role": "user", "content": _hf_volume_messages(images, "", "Describe the findings.")[0][
        "content"][1:]}]
    chat_model.reset()
    reply = chat_model.chat(messages, max_tokens=12)
    reference = until_end(chat_model, hf_generate(hf_model(folder), hf_inputs(folder, hf_messages), 12))
    assert reply.token_ids == reference and reply.text == text_of(chat_model, reference)
    assert reply.prompt_tokens == chat_model.prompt(messages).n_positions


def test_longitudinal_and_slide_prompts_are_the_hf_processors(folder, chat_model, slide_path):
    size = image_size(folder)
    prior, current = native_image(size, 5), native_image(size, 6)
    prompt = chat_model.prompt(longitudinal_messages(prior, current, CXR.question))
    hf_messages = [{"role": "user", "content": [{"type": "image", "image": prior}, {"type": "image", "image": current},
                                                {"type": "text", "text": CXR.question}]}]
    assert prompt.flat_ids(image_token_id(folder)) == hf_inputs(folder, hf_messages)["input_ids"][0].tolist()
    first, second = (p for p in prompt.parts if not isinstance(p, list))
    assert np.array_equal(first.pixels, np.asarray(prior)) and np.array_equal(second.pixels, np.asarray(current))
    assert "<start_of_turn>user\n<start_of_image><start_of_image>Provide a comparison of these two images and " \
           "include details from\nthe image which students should take note of when reading longitudinal CXR" \
           "<end_of_turn>\n<start_of_turn>model\n" in prompt.text
    instruction = PATHOLOGY.instruction.replace("{prompt}", "colon, biopsy:")
    prompt = chat_model.prompt(slide_messages({"path": str(slide_path), "patches": 2}, instruction))
    with open_slide(slide_path, patches=2) as slide:
        patches = [_pil(p) for p in slide.images(size)]
    hf_messages = [{"role": "user", "content": [{"type": "text", "text": instruction},
                                                *({"type": "image", "image": p} for p in patches)]}]
    assert prompt.flat_ids(image_token_id(folder)) == hf_inputs(folder, hf_messages)["input_ids"][0].tolist()
    assert "descriptive text.\ncolon, biopsy:<start_of_image><start_of_image><end_of_turn>" in prompt.text


def test_context_check_counts_images_before_decoding_and_says_how_many_fit(files, long_series, monkeypatch):
    from medgemma_gguf.runtime import load, volumes

    decoded = []
    real = volumes._DicomReader.values
    monkeypatch.setattr(volumes._DicomReader, "values", lambda self, i: decoded.append(i) or real(self, i))
    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=256, n_threads=1) as model:
        assert (model.image_tokens, model.n_ctx) == (4, 256)
        with pytest.raises(ResourceError) as caught:
            model.prompt(volume_messages({"path": str(long_series)}, "Findings?"))
        assert caught.value.for_cli() == (
            "the volume's 70 slices take 70 x 4 = 280 positions and the context of 256 has room for at most 63 more "
            "images; pass --slices 63 or raise --ctx")
        assert caught.value.for_python().endswith("pass slices 63 or raise n_ctx")
        with pytest.raises(ResourceError, match="no room for even one more image"):
            model.prompt([{"role": "user", "content": [*({"type": "image", "image": native_image(112, i)}
                                                         for i in range(63)),
                                                       {"type": "volume", "path": str(long_series), "slices": 1}]}])
        assert decoded == []  # both refused from the headers alone
        messages = volume_messages({"path": str(long_series), "slices": 3}, " ".join(["hepatic"] * 260))
        prompt = model.prompt(messages)
        with pytest.raises(ResourceError) as caught:
            model.chat(messages)
        text = prompt.n_positions - 12
        fit = max(0, (256 - 1 - text) // 4)
        assert caught.value.for_cli() == (
            f"the conversation needs {prompt.n_positions} positions ({text} of text and 3 images of 4) and the "
            f"context holds 256: with this text {fit} of the 3 images fit; send at most {fit} images "
            f"(a volume: --slices {fit}) or raise --ctx to at least {prompt.n_positions + 1}")
        assert caught.value.http_status == 413 and model.engine.n_past == 0


# --- command line ------------------------------------------------------------------------------------------


@pytest.fixture
def cli_main():
    from medgemma_gguf import cli

    return cli.main


def test_cli_volume_slide_and_prior(folder, files, chat_model, series, long_series, slide_path, tmp_path, cli_main,
                                   capsys):
    base = ["chat", str(files.text_path), "--mmproj", str(files.mmproj_path), "--threads", "1", "--ctx", "1024",
            "--max-tokens", "6"]
    assert cli_main([*base, "--volume", str(series), "--slices", "3", "--preset", "ct-findings", "--json"]) == 0
    captured = capsys.readouterr()
    reply = json.loads(captured.out)
    expected = chat_model.chat(volume_messages({"path": str(series), "slices": 3}, CT.question,
                                               instruction=CT.instruction), max_tokens=6)
    assert reply["text"] == expected.text and reply["prompt_tokens"] == expected.prompt_tokens
    assert "DICOM series: CT, 7 axial slices of 20x24, 2.5 mm apart" in captured.err
    assert "3 sampled uniformly" in captured.err and "windows -1024..1024, -135..215, 0..80 HU" in captured.err

    assert cli_main([*base, "--slide", str(slide_path), "--patches", "2", "--preset", "pathology-patches",
                     "--prompt", "colon, biopsy:", "--save-patches", str(tmp_path / "seen")]) == 0
    captured = capsys.readouterr()
    instruction = PATHOLOGY.instruction.replace("{prompt}", "colon, biopsy:")
    expected = chat_model.chat(slide_messages({"path": str(slide_path), "patches": 2}, instruction), max_tokens=6)
    assert captured.out == expected.text + "\n"
    assert "grid 2 rows x 3 columns" in captured.err and len(list((tmp_path / "seen").glob("patch-*.png"))) == 2

    size = image_size(folder)
    native_image(size, 1).save(tmp_path / "prior.png")
    native_image(size, 2).save(tmp_path / "current.png")
    assert cli_main([*base, "--prior", str(tmp_path / "prior.png"), "--image", str(tmp_path / "current.png"),
                     "--preset", "cxr-longitudinal", "--json"]) == 0
    expected = chat_model.chat(longitudinal_messages(str(tmp_path / "prior.png"), str(tmp_path / "current.png"),
                                                     CXR.question), max_tokens=6)
    assert json.loads(capsys.readouterr().out)["text"] == expected.text

    for args, message in (
            (["--preset", "ct-findings", "--prompt", "x"], "lays out a volume prompt; pass --volume"),
            (["--volume", str(series), "--slide", str(slide_path), "--prompt", "x"], "pass one of --volume, --slide"),
            (["--prior", str(tmp_path / "prior.png"), "--prompt", "x"], "exactly one current --image"),
            (["--volume", str(series), "--preset", "pathology-patches"], "is for a slide input, not --volume"),
            (["--slide", str(slide_path), "--preset", "pathology-patches"], "needs the tissue type and procedure"),
            (["--save-patches", str(tmp_path / "x"), "--prompt", "x"], "pass --slide too"),
            (["--volume", str(series), "--windows", "1:2", "--prompt", "x"], "pass e.g. --windows"),
            (["--volume", str(long_series), "--ctx", "256", "--prompt", "x"], "pass --slices 63 or raise --ctx"),
            (["--image", str(tmp_path / "current.png"), "--max-image-pixels", "100", "--prompt", "x"],
             "more than the limit of 100 (decompression-bomb guard); downscale it or raise --max-image-pixels"),
    ):
        assert cli_main([*base, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (args, err)


def test_cli_repl_puts_the_volume_before_the_first_line(files, chat_model, series):
    from click.testing import CliRunner

    from medgemma_gguf.runtime.cli import chat_command

    result = CliRunner().invoke(chat_command, [str(files.text_path), "--mmproj", str(files.mmproj_path),
                                               "--max-tokens", "5", "--threads", "1", "--ctx", "512", "--volume",
                                               str(series), "--slices", "2"], input="Findings?\nAnd the liver?\n")
    assert result.exit_code == 0, result.output
    turn1 = volume_messages({"path": str(series), "slices": 2}, "Findings?")
    reply1 = chat_model.chat(turn1, max_tokens=5).text
    turn2 = [*turn1, {"role": "assistant", "content": reply1}, {"role": "user", "content": "And the liver?"}]
    reply2 = chat_model.chat(turn2, max_tokens=5).text
    assert result.stdout == f"{reply1}\n{reply2}\n"


# --- server ----------------------------------------------------------------------------------------------------


def _zip_b64(folder) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return base64.b64encode(buffer.getvalue()).decode()


def test_server_takes_volumes_slides_and_pairs_within_its_limits(folder, chat_model, series, slide_path, tmp_path):
    from fastapi.testclient import TestClient

    from medgemma_gguf.runtime.server import ServerLimits, create_app

    question = {"type": "text", "text": "Findings?"}
    volume = {"type": "volume", "data": _zip_b64(series), "slices": 2}
    limits = ServerLimits(max_images=4, max_tokens_limit=8)
    with TestClient(create_app(chat_model, limits=limits, allowed_roots=[series.parent])) as client:
        def ask(content, **extra):
            return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                             "max_tokens": 5, **extra})

        reply = ask([volume, question])
        assert reply.status_code == 200, reply.text
        expected = chat_model.chat(volume_messages({"path": str(series), "slices": 2}, "Findings?"), max_tokens=5)
        assert reply.json()["choices"][0]["message"]["content"] == expected.text
        assert ask([{"type": "volume", "path": str(series), "slices": 2}, question]).status_code == 200
        outside = tmp_path / "elsewhere"
        write_series(outside, n=3)
        refused = ask([{"type": "volume", "path": str(outside), "slices": 2}, question])
        assert refused.status_code == 403 and "outside the allowed folders" in refused.json()["error"]["message"]
        assert "--allow-dir" in refused.json()["error"]["message"]
        too_many = ask([{**volume, "slices": 5}, question])
        assert too_many.status_code == 400 and "accepts at most 4" in too_many.json()["error"]["message"]
        default = ask([{"type": "volume", "data": volume["data"]}, question])  # asks for 85 slices: refused unread
        assert default.status_code == 400 and "has 85 images" in default.json()["error"]["message"]
        slide = ask([{"type": "text", "text": "colon, biopsy:"},
                     {"type": "slide", "data": base64.b64encode(slide_path.read_bytes()).decode(), "patches": 2}])
        assert slide.status_code == 200, slide.text
        size = image_size(folder)
        uris = []
        for seed in (3, 4):
            buffer = io.BytesIO()
            native_image(size, seed).save(buffer, format="PNG")
            uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        pair = ask([{"type": "longitudinal", "prior": uris[0], "current": uris[1]}, question])
        assert pair.status_code == 200
        expected = chat_model.chat(longitudinal_messages(native_image(size, 3), native_image(size, 4), "Findings?"),
                                   max_tokens=5)
        assert pair.json()["choices"][0]["message"]["content"] == expected.text
        for content, status, message in (
                ([{"type": "volume", "data": "not base64!", "slices": 2}, question], 400, "not valid base64"),
                ([{"type": "volume", "data": base64.b64encode(b"PK\x03\x04junk").decode(), "slices": 2}, question],
                 400, "not a readable zip"),
                ([{"type": "volume", "data": volume["data"], "slices": 2, "extra": 1}, question], 400,
                 "unknown field(s) extra"),
                ([{"type": "slide", "path": str(slide_path), "patches": 2}, question], 403, "outside the allowed"),
                ([{"type": "longitudinal", "prior": uris[0]}, question], 400, "needs \"prior\" and \"current\""),
        ):
            answer = ask(content)
            assert answer.status_code == status and message in answer.json()["error"]["message"], answer.text
        assert ask([volume, question]).status_code == 200  # still serving


def test_serve_command_passes_allowed_folders_and_study_sized_defaults(files, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from medgemma_gguf.runtime import server as server_module
    from medgemma_gguf.runtime.cli import serve_command

    calls = []
    monkeypatch.setattr(server_module, "serve", lambda model, **kwargs: calls.append(kwargs))
    base = [str(files.text_path), "--mmproj", str(files.mmproj_path), "--threads", "1", "--ctx", "256"]
    result = CliRunner().invoke(serve_command, [*base, "--allow-dir", str(tmp_path), "--allow-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls[0]["allowed_roots"] == (tmp_path, tmp_path)
    assert calls[0]["limits"].max_images == 128 and calls[0]["limits"].max_body_bytes == 80 * 1024**2
    missing = CliRunner().invoke(serve_command, [*base, "--allow-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
