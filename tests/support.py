"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

MULTIMODAL_VARIANTS = ("mm-k256", "mm-deep", "mm-hf5")
ALL_VARIANTS = (*MULTIMODAL_VARIANTS, "text")


def image_text_greedy_tokens(text_path: Path, mmproj_path: Path, n_threads: int = 2, n_tokens: int = 4) -> list[int]:
    """An image + text chat turn through llama.cpp, then greedy tokens; asserts the logits stay usable."""
    import numpy as np

    from medgemma_gguf.runtime.engine import Engine, ImagePart

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
