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


def make_peft_adapter(base: Path, outdir: Path, *, targets, r: int = 8, alpha: float = 16, rslora: bool = False,
                      seed: int = 0, std: float = 0.05, **config) -> Path:
    """A PEFT LoRA adapter saved by ``peft`` itself for the tiny checkpoint ``base``, with random A and B
    (PEFT initialises B to zero, which would make every adapter a no-op). Returns the adapter folder."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    arch = json.loads((Path(base) / "config.json").read_text())["architectures"][0]
    cls = Gemma3ForConditionalGeneration if arch == "Gemma3ForConditionalGeneration" else AutoModelForCausalLM
    model = cls.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                                  target_modules=targets, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT's own init draws from torch's global generator: replaced, for reproducible tests
        for name, parameter in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            elif "modules_to_save" in name:  # a trained copy of a base tensor: the base plus noise
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    peft_model.save_pretrained(outdir)
    return Path(outdir)
