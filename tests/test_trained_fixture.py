"""The briefly trained Gemma 3 fixture: it trains, it is laid out like the published checkpoint, it converts
and runs in llama.cpp with HF's logits, and it is deterministic."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from medgemma_gguf.errors import UserError
from medgemma_gguf.fixtures import trained_fixture
from medgemma_gguf.fixtures.trained_fixture import build_trained_fixture, synthetic_image

STEPS = 12


def shard_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_trained_fixture(tmp_path_factory.mktemp("trained") / "fixture", steps=STEPS)


@pytest.mark.slow  # trains the fixture: ~10 s alone, minutes on a busy 2-core machine
def test_loss_decreases_and_log_is_written(trained):
    losses = trained.losses
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    log = json.loads((trained.path / trained_fixture.LOG_NAME).read_text())
    assert log["steps"] == STEPS and log["losses"] == list(losses)


@pytest.mark.slow  # trains the fixture: ~10 s alone, minutes on a busy 2-core machine
def test_layout_matches_the_published_tiny_checkpoint(trained, tiny_checkpoint):
    published = tiny_checkpoint("mm-k256")
    assert {p.name for p in trained.path.iterdir()} == {p.name for p in published.iterdir()} | {
        trained_fixture.LOG_NAME}
    ours = json.loads((trained.path / "model.safetensors.index.json").read_text())["weight_map"]
    theirs = json.loads((published / "model.safetensors.index.json").read_text())["weight_map"]
    assert ours.keys() == theirs.keys()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"):
        assert (trained.path / name).read_bytes() == (published / name).read_bytes(), name
    from safetensors import safe_open

    for shard in sorted(trained.path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert str(handle.get_slice(name).get_dtype()) == "BF16", name


@pytest.mark.slow  # trains the fixture: ~10 s alone, minutes on a busy 2-core machine
def test_converts_and_matches_hf_logits_in_llama_cpp(trained, tmp_path, hf_model):
    import torch

    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.runtime.engine import Engine

    result = convert_checkpoint(str(trained.path), tmp_path, outtype="f32", mmproj_type="f32", progress=False)
    batches = trained_fixture.Batches(seed=123)
    ids = batches.text(1, 48)[0].tolist()
    with Engine(result.text_path, result.mmproj_path, n_ctx=256) as engine:
        assert engine.has_vision
        ours = engine.eval_tokens(ids, logits="all")
    with torch.no_grad():
        theirs = hf_model(trained.path)(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs[:, : ours.shape[1]]).max() < 1e-2
    # trained weights predict the held-out text better than chance (ln 1088 = 7.0 nats)
    log_probs = torch.log_softmax(torch.from_numpy(ours), -1)
    nll = -log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
    assert nll < 6.0


@pytest.mark.slow  # trains the fixture: ~10 s alone, minutes on a busy 2-core machine
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = build_trained_fixture(tmp_path / "a", steps=2, seed=3)
    second = build_trained_fixture(tmp_path / "b", steps=2, seed=3)
    other = build_trained_fixture(tmp_path / "c", steps=2, seed=4)
    assert shard_hashes(first.path) == shard_hashes(second.path)
    assert first.losses == second.losses
    assert shard_hashes(first.path).values() != shard_hashes(other.path).values()
    assert set(shard_hashes(first.path).values()).isdisjoint(shard_hashes(other.path).values())


def test_synthetic_images_are_seeded_and_captioned():
    image, caption = synthetic_image(random.Random(1), 224)
    again, caption_again = synthetic_image(random.Random(1), 224)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    assert np.array_equal(image, again) and caption == caption_again
    assert len(np.unique(image.reshape(-1, 3), axis=0)) == 2  # a shape on a background
    assert caption.startswith("A ") and caption.endswith(" image.")


def test_bad_arguments_and_nothing_half_written(tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        build_trained_fixture(taken, steps=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="steps must be"):
            build_trained_fixture(tmp_path / "out", steps=bad)
    with pytest.raises(UserError, match="seed must be"):
        build_trained_fixture(tmp_path / "out", steps=1, seed=-1)

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(trained_fixture, "_write_tokenizer_files", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_trained_fixture(tmp_path / "out", steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
