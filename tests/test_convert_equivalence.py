"""Proof that the converted GGUF is the same model as the Hugging Face checkpoint it came from.

For every fixture variant: llama.cpp tokenizes like the HF tokenizer; F32 GGUF logits equal HF float32
logits past the sliding window; mmproj image embeddings equal HF's ``get_image_features``; and the text
decoder given the HF processor's exact image+text prompt predicts what HF predicts after the image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import ALL_VARIANTS, MULTIMODAL_VARIANTS

from medgemma_gguf.quant_eval.metrics import kl_divergence_full
from medgemma_gguf.runtime.engine import Engine, ImagePart

TOKENIZER_CORPUS = [
    "<start_of_turn>user\nWhat is the normal adult resting heart rate?<end_of_turn>\n<start_of_turn>model\n",
    "Dose: 12.5 mg/kg every 8 h; 2024-03-17, 0.0001, 1,000,000 and 3.14159.",
    "two  spaces, three   spaces,\ttab\t\ttabs\n\n\nnewlines    \n  trailing  ",
    "Café, naïve, über, résumé, São Paulo, Ångström, Łódź, ñandú",
    "医学影像诊断 と 病理 の 画像 — 한국어 의학",
    "Emoji: 🩻🫀😷🧬 and symbols ∑∫√≈≠ ±°µ",
    "Rare bytes: \u0007\u001b ǅ 𝔸𝔹 \ufeff end",
    "<start_of_image><end_of_image> markers inside text <end_of_turn>",
    "",
    " leading space and a <bos> literal",
]


def _gguf_paths(result):
    return result.text_path, result.mmproj_path


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_tokenizer_matches_hf(variant, tiny_checkpoint, converted):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_checkpoint(variant))
    with Engine(converted(variant).text_path, vocab_only=True) as engine:
        for text in TOKENIZER_CORPUS:
            assert engine.tokenize(text) == hf(text, add_special_tokens=False).input_ids, text
            assert engine.tokenize(text, add_special=True) == hf(text).input_ids, text
        for marker in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"):
            assert len(engine.tokenize(marker)) == 1


def _random_ids(folder, n, seed=0):
    config = json.loads((folder / "config.json").read_text())
    vocab = config.get("text_config", config)["vocab_size"]
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(300, min(vocab, 1000), size=n - 1).tolist()  # 2 = <bos>


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _sliding_window(folder) -> int:
    config = json.loads((folder / "config.json").read_text())
    return config.get("text_config", config)["sliding_window"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_f32_text_logits_equal_hf(variant, tiny_checkpoint, converted, hf_model):
    folder = tiny_checkpoint(variant)
    ids = _random_ids(folder, 320)
    assert len(ids) > 2 * _sliding_window(folder)  # the test crosses the sliding window
    reference = _hf_logits(hf_model(folder), ids)
    with Engine(converted(variant).text_path, n_ctx=512) as engine:
        ours = engine.eval_tokens(ids, logits="all")
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-2
    assert kl_divergence_full(reference, ours).mean() <= 1e-5


@pytest.mark.parametrize("variant", ["mm-k256", "text"])
def test_bf16_text_logits_are_as_close_as_hf_bf16(variant, tiny_checkpoint, converted, hf_model):
    """BF16 weights are the source's bits, so the only difference is llama.cpp rounding activations to
    bf16 in its matrix products. The bound: no further from the float32 reference than transformers' own
    bf16 inference is (x2, plus 1e-4 of slack for these tiny random models)."""
    folder = tiny_checkpoint(variant)
    ids = _random_ids(folder, 320, seed=1)
    model = hf_model(folder)
    reference = _hf_logits(model, ids)
    with torch.no_grad():
        hf_bf16 = model.to(torch.bfloat16)(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    model.to(torch.float32)
    with Engine(converted(variant, "bf16", "f16").text_path, n_ctx=512) as engine:
        ours = engine.eval_tokens(ids, logits="all")
    hf_kl = kl_divergence_full(reference, hf_bf16).mean()
    our_kl = kl_divergence_full(reference, ours).mean()
    assert our_kl <= 2 * hf_kl + 1e-4, (our_kl, hf_kl)


def _native_image(size: int, seed: int = 3) -> np.ndarray:
    """A smooth, non-trivial RGB image already at the model's native size (no resampling anywhere)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(2 * np.pi * (x * rng.uniform(1, 4) + y * rng.uniform(1, 4)) + rng.uniform(0, 6))
                for _ in range(3)]
    image = (np.stack(channels, axis=-1) * 0.5 + 0.5) * 200 + rng.uniform(0, 55, size=(size, size, 3))
    return image.clip(0, 255).astype(np.uint8)


def _image_size(folder) -> int:
    return json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]


@pytest.mark.parametrize("variant", MULTIMODAL_VARIANTS)
def test_mmproj_image_embeddings_equal_hf(variant, tiny_checkpoint, converted, hf_model):
    from PIL import Image
    from transformers import AutoProcessor

    folder = tiny_checkpoint(variant)
    pixels = _native_image(_image_size(folder))
    processor = AutoProcessor.from_pretrained(folder)
    pixel_values = processor.image_processor(Image.fromarray(pixels), return_tensors="pt").pixel_values
    with torch.no_grad():
        features = hf_model(folder).get_image_features(pixel_values=pixel_values.float())
    reference = getattr(features, "pooler_output", features)
    reference = (reference[0] if isinstance(reference, (list, tuple)) else reference).reshape(
        -1, reference.shape[-1]).numpy()
    result = converted(variant)
    with Engine(result.text_path, result.mmproj_path) as engine:
        ours = engine.encode_image(ImagePart(pixels))
    assert ours.shape == reference.shape
    cosine = (ours * reference).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine.min() >= 0.999


@pytest.mark.parametrize("variant", MULTIMODAL_VARIANTS)
def test_image_prompt_next_token_distributions_equal_hf(variant, tiny_checkpoint, converted, hf_model):
    from PIL import Image
    from transformers import AutoProcessor

    folder = tiny_checkpoint(variant)
    pixels = _native_image(_image_size(folder), seed=5)
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                             {"type": "image", "image": Image.fromarray(pixels)}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        reference = hf_model(folder)(**inputs).logits[0].float().numpy()

    image_token = json.loads((folder / "config.json").read_text())["image_token_index"]
    image_positions = [i for i, t in enumerate(ids) if t == image_token]
    start, end = image_positions[0], image_positions[-1] + 1
    assert image_positions == list(range(start, end)) and ids.count(2) == 1  # one image block, one <bos>
    result = converted(variant)
    with Engine(result.text_path, result.mmproj_path) as engine:
        ours = engine.eval_parts([ids[:start], ImagePart(pixels), ids[end:]], logits="all")
    text_positions = [i for i in range(len(ids)) if not start <= i < end]
    kl = kl_divergence_full(reference[text_positions], ours)
    after_image = np.array(text_positions) >= end
    assert after_image.sum() >= 5
    assert kl[after_image].max() <= 1e-4
    assert kl[~after_image].max() <= 1e-5
