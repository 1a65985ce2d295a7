"""Proof that the converted GGUF is the same model as the Hugging Face checkpoint it came from.

For every fixture variant: llama.cpp tokenizes like the HF tokenizer; F32 GGUF logits equal HF float32
logits past the sliding window; mmproj image embeddings equal HF's ``get_image_features``; and the text
decoder given the HF processor's exact image+text prompt predicts what HF predicts after the image.
The probes are ``medgemma_gguf.quant_eval.equivalence``'s, the ones ``medgemma-gguf check`` runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import ALL_VARIANTS, MULTIMODAL_VARIANTS

from medgemma_gguf.quant_eval.equivalence import (
    TOKENIZER_CORPUS,
    cosine_rows,
    hf_image_features,
    hf_inputs,
    hf_inputs_logits,
    hf_logits,
    image_size,
    image_token_id,
    logit_figures,
    native_image,
    split_markers,
    text_probe_ids,
    tokenizer_mismatches,
)
from medgemma_gguf.runtime.engine import Engine, ImagePart


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_tokenizer_matches_hf(variant, tiny_checkpoint, converted):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_checkpoint(variant))
    with Engine(converted(variant).text_path, vocab_only=True) as engine:
        assert len(TOKENIZER_CORPUS) == 10
        assert tokenizer_mismatches(hf, engine.tokenize, TOKENIZER_CORPUS) == []
        assert split_markers(engine.tokenize, ("<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                                               "<end_of_image>")) == []


def _random_ids(folder, n, seed=0):
    config = json.loads((folder / "config.json").read_text())
    vocab = config.get("text_config", config)["vocab_size"]
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(300, min(vocab, 1000), size=n - 1).tolist()  # 2 = <bos>


def _sliding_window(folder) -> int:
    config = json.loads((folder / "config.json").read_text())
    return config.get("text_config", config)["sliding_window"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_f32_text_logits_equal_hf(variant, tiny_checkpoint, converted, hf_model):
    from transformers import AutoTokenizer

    folder = tiny_checkpoint(variant)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for ids in (_random_ids(folder, 320), text_probe_ids(tokenizer, 320)):  # rare pieces, and check's prose
        assert len(ids) > 2 * _sliding_window(folder)  # the test crosses the sliding window
        reference = hf_logits(hf_model(folder), ids)
        with Engine(converted(variant).text_path, n_ctx=512) as engine:
            ours = engine.eval_tokens(ids, logits="all")
        assert ours.shape == reference.shape
        figures = logit_figures(reference, ours)
        assert figures.max_abs <= 1e-2
        assert figures.mean_kl <= 1e-5


@pytest.mark.parametrize("variant", ["mm-k256", "text"])
def test_bf16_text_logits_are_as_close_as_hf_bf16(variant, tiny_checkpoint, converted, hf_model):
    """BF16 weights are the source's bits, so the only difference is llama.cpp rounding activations to
    bf16 in its matrix products. The bound: no further from the float32 reference than transformers' own
    bf16 inference is (x2, plus 1e-4 of slack for these tiny random models)."""
    import torch

    folder = tiny_checkpoint(variant)
    ids = _random_ids(folder, 320, seed=1)
    model = hf_model(folder)
    reference = hf_logits(model, ids)
    hf_bf16 = hf_logits(model.to(torch.bfloat16), ids)
    model.to(torch.float32)
    with Engine(converted(variant, "bf16", "f16").text_path, n_ctx=512) as engine:
        ours = engine.eval_tokens(ids, logits="all")
    hf_kl = logit_figures(reference, hf_bf16).mean_kl
    our_kl = logit_figures(reference, ours).mean_kl
    assert our_kl <= 2 * hf_kl + 1e-4, (our_kl, hf_kl)


@pytest.mark.parametrize("variant", MULTIMODAL_VARIANTS)
def test_mmproj_image_embeddings_equal_hf(variant, tiny_checkpoint, converted, hf_model):
    from transformers import AutoProcessor

    folder = tiny_checkpoint(variant)
    image = native_image(image_size(folder), 3)
    processor = AutoProcessor.from_pretrained(folder)
    pixel_values = processor.image_processor(image, return_tensors="pt").pixel_values
    reference = hf_image_features(hf_model(folder), pixel_values)
    result = converted(variant)
    with Engine(result.text_path, result.mmproj_path) as engine:
        ours = engine.encode_image(ImagePart(np.asarray(image)))
    assert ours.shape == reference.shape
    assert cosine_rows(ours, reference).min() >= 0.999


@pytest.mark.parametrize("variant", MULTIMODAL_VARIANTS)
def test_image_prompt_next_token_distributions_equal_hf(variant, tiny_checkpoint, converted, hf_model):
    folder = tiny_checkpoint(variant)
    image = native_image(image_size(folder), 5)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                             {"type": "image", "image": image}]}]
    inputs = hf_inputs(folder, messages)
    ids = inputs["input_ids"][0].tolist()
    reference = hf_inputs_logits(hf_model(folder), inputs)

    image_token = image_token_id(folder)
    image_positions = [i for i, t in enumerate(ids) if t == image_token]
    start, end = image_positions[0], image_positions[-1] + 1
    assert image_positions == list(range(start, end)) and ids.count(2) == 1  # one image block, one <bos>
    result = converted(variant)
    with Engine(result.text_path, result.mmproj_path) as engine:
        ours = engine.eval_parts([ids[:start], ImagePart(np.asarray(image)), ids[end:]], logits="all")
    text_positions = [i for i in range(len(ids)) if not start <= i < end]
    kl = logit_figures(reference[text_positions], ours).kl
    after_image = np.array(text_positions) >= end
    assert after_image.sum() >= 5
    assert kl[after_image].max() <= 1e-4
    assert kl[~after_image].max() <= 1e-5
