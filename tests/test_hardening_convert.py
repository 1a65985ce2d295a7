"""The converter under hostile checkpoints (issue 11): safetensors index and shard paths stay inside the
checkpoint, and chat templates render under a time and output-size limit — refused at convert time, and a
clear error (CLI exit 2, HTTP 413) when a GGUF from elsewhere carries such a template."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from medgemma_gguf.cli import main

LOOP_FOREVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
WRITE_10M = "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}"
BOMBS = [
    (LOOP_FOREVER, "ran for more than 5 s"),
    (WRITE_10M, "wrote more than 8388608 characters"),
    ("{{ 'x' * 1000000000 }}", "builds a sequence of 1000000000 items"),
    ("{{ 10 ** (10 ** 10) }}", "raises a number to the power 10000000000"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "failed (RecursionError)"),
]


def _run(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _copy(tiny_checkpoint, tmp_path: Path, variant: str = "text") -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(variant), folder)
    return folder


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors",
                                   "C:/weights.safetensors"])
def test_index_shards_must_stay_inside_the_checkpoint(tiny_checkpoint, tmp_path, capsys, shard):
    folder = _copy(tiny_checkpoint, tmp_path, "mm-k256")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    code, _, err = _run(capsys, "convert", folder, "--outdir", tmp_path / "out")
    assert code == 2 and "outside the checkpoint folder" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,words", [
    ('["model-00001-of-00002.safetensors"]', "no 'weight_map'"),
    ('{"weight_map": ["a", "b"]}', "no 'weight_map'"),
    ('{"weight_map": {"x": 5}}', "no 'weight_map'"),
    ('{"weight_map": {"x": ""}}', "no 'weight_map'"),
    ("{not json", "not JSON"),
    ("[" * 100_000, "not JSON"),
])
def test_malformed_indexes_are_refused(tiny_checkpoint, tmp_path, capsys, content, words):
    folder = _copy(tiny_checkpoint, tmp_path, "mm-k256")
    (folder / "model.safetensors.index.json").write_text(content)
    code, _, err = _run(capsys, "convert", folder, "--outdir", tmp_path / "out")
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template,words", BOMBS, ids=["loop", "10M", "repeat", "power", "recursion"])
def test_convert_refuses_templates_past_the_limits(tiny_checkpoint, tmp_path, capsys, template, words):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "chat_template.jinja").write_text(template)
    started = time.monotonic()
    code, _, err = _run(capsys, "convert", folder, "--outdir", tmp_path / "out")
    assert code == 2 and words in err and "fix the checkpoint's chat_template" in err, err
    assert err.count("\n") == 1 and time.monotonic() - started < 120
    assert not (tmp_path / "out").exists()


def test_a_template_that_rejects_the_standard_conversation_is_kept(tiny_checkpoint, tmp_path, capsys, caplog):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}{{ m.role }}{% endfor %}")
    code, _, err = _run(capsys, "convert", folder, "--outdir", tmp_path / "out")
    assert code == 0, err
    assert "does not render a standard conversation" in caplog.text


@pytest.fixture(scope="module")
def bad_template_gguf(tiny_checkpoint, tmp_path_factory):
    """A GGUF whose template writes 10M characters (as a GGUF converted by another tool might carry)."""
    import pytest as _pytest

    from medgemma_gguf.convert import converter
    from medgemma_gguf.convert.converter import convert_checkpoint

    root = tmp_path_factory.mktemp("bad-template")
    folder = root / "ckpt"
    shutil.copytree(tiny_checkpoint("text"), folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% set text = m.content if m.content is string else "
        "m.content | map(attribute='text') | join %}{{ text }}"
        "{% if 'explode' in text %}" + WRITE_10M + "{% endif %}{% endfor %}")
    with _pytest.MonkeyPatch.context() as patch:
        patch.setattr(converter, "_check_chat_template", lambda *_args: None)
        result = convert_checkpoint(str(folder), root / "out", outtype="f32", progress=False)
    return result.text_path


def test_runtime_limits_a_template_from_elsewhere(bad_template_gguf, capsys):
    from fastapi.testclient import TestClient

    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import create_app

    code, _, err = _run(capsys, "chat", bad_template_gguf, "--prompt", "please explode", "--threads", "1",
                        "--max-tokens", "1")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "wrote more than 8388608 characters" in errors[0], err
    assert "Traceback" not in err
    model = load(bad_template_gguf, n_gpu_layers=0, n_ctx=256, n_threads=1)
    try:
        with TestClient(create_app(model)) as client:
            response = client.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": "explode now"}], "max_tokens": 1})
            assert response.status_code == 413
            assert "chat template wrote more than 8388608 characters" in response.json()["error"]["message"]
            fine = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 1})
            assert fine.status_code == 200, fine.text
    finally:
        model.close()


@pytest.mark.unit
def test_time_limit_stops_a_silent_loop_and_restores_the_trace():
    import sys

    from medgemma_gguf.errors import ResourceError
    from medgemma_gguf.runtime import prompt

    def tracer(*_args):
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        started = time.monotonic()
        with pytest.raises(ResourceError, match="ran for more than 5 s"):
            prompt.render_template(LOOP_FOREVER, [{"role": "user", "content": "hi"}], bos_token="<bos>")
        assert time.monotonic() - started < 60
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    text = prompt.render_template("{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}",
                                  [{"role": "user", "content": "hi"}], bos_token="<bos>")
    assert text == "user:hi"
