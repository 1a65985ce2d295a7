"""Shared, session-cached fixtures: tiny checkpoints (built once per variant) and their conversions."""

from __future__ import annotations

from pathlib import Path

import pytest

MULTIMODAL_VARIANTS = ("mm-k256", "mm-deep", "mm-hf5")
ALL_VARIANTS = (*MULTIMODAL_VARIANTS, "text")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(variant) -> Path``: a tiny Gemma 3 checkpoint folder, built once per session."""
    from convert.tiny_checkpoint import build_tiny_checkpoint

    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{variant}"), variant)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_checkpoint):
    """``converted(variant, outtype, mmproj_type) -> ConvertResult``, converted once per combination."""
    from convert.converter import convert_checkpoint

    done: dict[tuple[str, str, str], object] = {}

    def get(variant: str, outtype: str = "f32", mmproj_type: str = "f32"):
        key = (variant, outtype, mmproj_type)
        if key not in done:
            outdir = tmp_path_factory.mktemp(f"gguf-{variant}-{outtype}-{mmproj_type}")
            done[key] = convert_checkpoint(str(tiny_checkpoint(variant)), outdir, outtype=outtype,
                                           mmproj_type=mmproj_type, progress=False)
        return done[key]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """``hf_model(folder) -> transformers model`` in float32, eager attention, cached per folder."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    cache: dict[Path, object] = {}

    def get(folder: Path):
        if folder not in cache:
            import json

            arch = json.loads((folder / "config.json").read_text())["architectures"][0]
            cls = Gemma3ForConditionalGeneration if arch == "Gemma3ForConditionalGeneration" else AutoModelForCausalLM
            model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            cache[folder] = model.eval()
        return cache[folder]

    return get


@pytest.fixture(scope="session")
def calibration_subset(tmp_path_factory):
    """``calibration_subset(ids) -> Path``: a JSONL with those items of the bundled calibration set, line for line."""
    import json

    from convert.calibration import DEFAULT_PATH

    lines = {json.loads(line)["id"]: line for line in DEFAULT_PATH.read_text(encoding="utf-8").splitlines()}

    def get(ids) -> Path:
        path = tmp_path_factory.mktemp("calib") / "subset.jsonl"
        path.write_text("".join(lines[item] + "\n" for item in ids), encoding="utf-8")
        return path

    return get


def image_text_greedy_tokens(text_path: Path, mmproj_path: Path, n_threads: int = 2, n_tokens: int = 4) -> list[int]:
    """An image + text chat turn through llama.cpp, then greedy tokens; asserts the logits stay usable."""
    import numpy as np

    from runtime.engine import Engine, ImagePart

    pixels = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    with Engine(text_path, mmproj_path, n_ctx=512, n_threads=n_threads) as engine:
        user = engine.tokenize("<start_of_turn>user\n")
        question = engine.tokenize("Describe this X-ray<end_of_turn>\n<start_of_turn>model\n")
        logits = engine.eval_parts([[engine.bos_token, *user], ImagePart(pixels), question])
        tokens = []
        for _ in range(n_tokens):
            assert np.isfinite(logits[-1]).all()
            tokens.append(int(np.argmax(logits[-1])))
            logits = engine.eval_tokens([tokens[-1]], logits="last")
        assert all(0 <= t < engine.n_vocab for t in tokens)
    return tokens
