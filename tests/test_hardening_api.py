"""Hostile and careless input through the CLI and the Python API (issue 11; the HTTP side is
``test_hardening_server.py``, folders and manifests ``test_hardening_folder.py``).

Seeded mutations of a valid ``ChatModel.chat`` call (``fuzzing.py``: wrong types, huge, tiny, negative,
non-finite and over-long numbers, deep nesting, paths that climb out) and hostile ``chat`` flags each get a
``medgemma_gguf.errors`` error (CLI: exit 2 and an ``error:`` line, never a traceback) or a normal reply, and
the model answers a normal request afterwards. Also: hostile image paths through the Python API, AUTO budgets
outside the feasible range refused before any work, and a safetensors file whose header claims terabytes.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
from fuzzing import mutations

from medgemma_gguf.cli import main
from medgemma_gguf.errors import UserError

VALID_CALL = {
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "text", "text": "Describe a chest X-ray."}]}],
    "max_tokens": 2, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1,
    "repeat_last_n": 64, "presence_penalty": 0.1, "frequency_penalty": 0.1, "seed": 7, "stop": ["\n\n"],
    "logit_bias": {"5": 1.0},
}


def _run(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def text_gguf(converted) -> Path:
    return converted("text").text_path


@pytest.fixture(scope="module")
def model(text_gguf):
    from medgemma_gguf.runtime.chat import load

    chat_model = load(text_gguf, n_gpu_layers=0, n_ctx=256, n_threads=1)
    yield chat_model
    chat_model.close()


def _call(model, document):
    """``model.chat`` with ``document``'s keys as arguments (keys ``chat`` does not take are dropped: Python
    itself refuses those with TypeError) or, when it is not an object, as the messages."""
    if not isinstance(document, dict):
        return model.chat(document, max_tokens=2)
    known = set(inspect.signature(model.chat).parameters)
    kwargs = {k: v for k, v in document.items() if k in known}
    if isinstance(kwargs.get("logit_bias"), dict):  # the Python API keys token ids as ints; JSON has strings
        kwargs["logit_bias"] = {int(k) if k.lstrip("-").isdigit() else k: v for k, v in kwargs["logit_bias"].items()}
    messages = kwargs.pop("messages", None)
    return model.chat(messages, **kwargs)


def test_random_python_api_calls_give_clear_errors(model):
    outcomes = {"ok": 0, "refused": 0}
    for what, text in mutations(VALID_CALL, seed=2026, count=80):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            continue  # not JSON at all: only a server reads raw text (test_hardening_server)
        try:
            result = _call(model, document)
        except UserError as exc:
            message = str(exc)
            assert message and "\n" not in message and "Traceback" not in message, (what, message)
            outcomes["refused"] += 1
        else:
            assert isinstance(result.text, str), what
            outcomes["ok"] += 1
    assert outcomes["refused"] > 20 and outcomes["ok"] > 5, outcomes
    assert model.chat([{"role": "user", "content": "hi"}], max_tokens=2).text is not None


@pytest.mark.parametrize("value,words", [
    (float("nan"), "temperature"), (float("inf"), "temperature"), (5e-324, "temperature"), (-1, "temperature"),
    (0.5, None),
    (10**400, "temperature"), ("hot", "temperature"), (True, "temperature"),
])
def test_temperatures(model, value, words):
    """5e-324 once made llama.cpp's probabilities NaN: every value is refused by name, or runs."""
    try:
        result = model.chat([{"role": "user", "content": "hi"}], max_tokens=2, temperature=value)
    except UserError as exc:
        assert words is not None and words in str(exc), str(exc)
    else:
        assert words is None and isinstance(result.text, str)


@pytest.fixture(scope="module")
def vision_model(converted):
    from medgemma_gguf.runtime.chat import load

    result = converted("mm-k256")
    chat_model = load(result.text_path, result.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1)
    yield chat_model
    chat_model.close()


def test_hostile_image_paths_through_the_python_api(vision_model, tmp_path):
    """Devices, FIFOs, folders, sparse 10 GiB files, non-images: refused from stat or the header, never read whole
    (the Python API allows local files, so containment is the caller's; ``serve`` adds roots)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "not-an-image.png").write_text("hello")
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:
        handle.truncate(10 * 2**30)  # sparse: 10 GiB claimed, nothing written
    for path in ("/dev/zero", "/dev/urandom", fifo, tmp_path, tmp_path / "missing.png", tmp_path / "not-an-image.png",
                 huge, "/etc/shadow", "../../../../etc/passwd", "\0"):
        with pytest.raises(UserError) as info:
            vision_model.chat([{"role": "user", "content": [{"type": "image", "path": str(path)},
                                                     {"type": "text", "text": "what is this?"}]}], max_tokens=2)
        assert "\n" not in str(info.value) and "mmproj" not in str(info.value), str(info.value)
    assert isinstance(vision_model.chat([{"role": "user", "content": "hi"}], max_tokens=2).text, str)


CHAT_FLAGS = [
    ["--temperature", "5e-324"], ["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-1"],
    ["--temperature", "1" + "0" * 400], ["--top-p", "2"], ["--top-p", "nan"], ["--top-k", "-5"],
    ["--top-k", "9" * 40], ["--min-p", "-0.5"], ["--repeat-penalty", "0"], ["--repeat-penalty", "inf"],
    ["--repeat-last-n", "-7"], ["--presence-penalty", "1e9"], ["--frequency-penalty", "-inf"],
    ["--max-tokens", "0"], ["--max-tokens", "-1"], ["--max-tokens", "1000000000000"], ["--seed", "-2"],
    ["--seed", str(2**70)], ["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"],
    ["--stop", ""], ["--logit-bias", "999999999=1"], ["--logit-bias", "x=y"], ["--logit-bias", "5=nan"],
    ["--ctx", "999999999"], ["--ctx", "1"], ["--n-gpu-layers", "lots"], ["--n-gpu-layers", "-3"],
    ["--vram", "a few"], ["--vram", "-1GB"], ["--threads", "0"], ["--window", "1,2,3"], ["--window", "nan,5"],
    ["--image", "/dev/zero"], ["--image", "/etc/passwd"], ["--preset", "nonsense"], ["--quant", "Q4_K_M"],
    ["--system", "x" * 200_000], ["--ctx", "131073"],
]


def test_hostile_chat_flags(text_gguf, capsys):
    """Every flag above, and seeded random pairs of them: exit 0 or 2 with an error line, never a traceback."""
    rng = random.Random(11)
    cases = [*CHAT_FLAGS, *(rng.choice(CHAT_FLAGS) + rng.choice(CHAT_FLAGS) for _ in range(8))]
    refused = 0
    for flags in cases:
        code, out, err = _run(capsys, "chat", text_gguf, "--prompt", "hi", "--max-tokens", "2", "--threads", "1",
                              "--ctx", "256", *flags)
        assert code in (0, 2), (flags, code, err)
        assert "Traceback" not in err + out, (flags, err)
        if code == 2:
            refused += 1
            assert "rror: " in err, (flags, err)  # ours ("error: …") or click's usage error ("Error: …")
            ours = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(ours) <= 1, (flags, err)
    assert refused >= len(CHAT_FLAGS) - 6, refused


@pytest.fixture
def folder(converted, tmp_path):
    source = converted("text").manifest_path.parent
    target = tmp_path / "folder"
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("flags,words", [
    (["--target-bpw", "0.1"], "feasible range"), (["--target-bpw", "99"], "at most 32"),
    (["--target-size", "1KB"], "feasible range"), (["--target-bpw", "nan"], "target"),
    (["--target-bpw", "-3"], "target"), (["--target-size", "lots"], "--target-size: cannot read the size"),
    (["--vram", "-1GB", "--ctx", "256"], "--vram: cannot read the size"),
    (["--vram", "1MB", "--ctx", "256"], "feasible range"),
])
def test_auto_budgets_outside_the_feasible_range_are_refused_up_front(folder, capsys, flags, words):
    before = sorted(p.name for p in folder.rglob("*"))
    code, _, err = _run(capsys, "quantize", folder, *flags, "--threads", "1", "--quiet",
                        "--cache-dir", folder.parent / "cache")
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert sorted(p.name for p in folder.rglob("*")) == before
    assert not (folder.parent / "cache" / "sensitivity").exists()  # nothing was measured


@pytest.mark.parametrize("claimed", [2**40, 2**63 - 1, 150_000_000])
def test_a_safetensors_header_claiming_too_much_is_refused(tiny_checkpoint, tmp_path, capsys, claimed):
    """safetensors refuses headers over 100 MB; a length past the end of the file is refused too: one line."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("text"), folder)
    weights = folder / "model-00001-of-00002.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", claimed) + data[8:])
    code, _, err = _run(capsys, "convert", folder, "--outdir", tmp_path / "out")
    assert code == 2 and "not a readable safetensors file" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
