"""Config parsing: both config formats, the per-layer sliding pattern, and refusals."""

import copy

import pytest

from medgemma_gguf.convert.config import parse_config
from medgemma_gguf.errors import UserError

# The published google/medgemma-4b-it config.json (transformers 4.50 format).
MEDGEMMA_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
        "sliding_window_pattern": 6, "vocab_size": 262208, "max_position_embeddings": 131072,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "image_size": 896,
        "patch_size": 14, "num_attention_heads": 16, "num_hidden_layers": 27, "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
    },
}


def test_published_4b_config():
    cfg = parse_config(MEDGEMMA_4B)
    text = cfg.text
    assert cfg.is_multimodal and text.n_layer == 34 and text.head_dim == 256
    assert text.layer_is_sliding == tuple((i + 1) % 6 != 0 for i in range(34))
    assert sum(not s for s in text.layer_is_sliding) == 5  # layers 5, 11, 17, 23, 29 are global
    assert (text.rope_global.theta, text.rope_global.scaling_type, text.rope_global.factor) == (1e6, "linear", 8.0)
    assert (text.rope_local.theta, text.rope_local.scaling_type) == (1e4, "none")
    assert cfg.vision.pool_factor == 4 and cfg.vision.projection_dim == 2560


def test_transformers5_rope_parameters_and_layer_types():
    raw = copy.deepcopy(MEDGEMMA_4B)
    text = raw["text_config"]
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
        text.pop(key)
    text["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    text["layer_types"] = ["sliding_attention", "full_attention"] * 17
    cfg = parse_config(raw)
    assert cfg.text.layer_is_sliding == (True, False) * 17
    assert cfg.text.rope_global.factor == 8.0 and cfg.text.rope_local.theta == 1e4


def test_27b_attention_scale_rule():
    raw = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 5376,
           "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
           "head_dim": 128, "query_pre_attn_scalar": 168, "vocab_size": 262208, "sliding_window": 1024}
    cfg = parse_config(raw)
    assert not cfg.is_multimodal and cfg.text.n_layer == 62
    raw["query_pre_attn_scalar"] = 128
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        parse_config(raw)


@pytest.mark.parametrize(("path", "value", "message"), [
    (("text_config", "attn_logit_softcapping"), 50.0, "attn_logit_softcapping"),
    (("text_config", "query_pre_attn_scalar"), 200, "query_pre_attn_scalar"),
    (("text_config", "hidden_activation"), "silu", "activation"),
    (("architectures",), ["LlamaForCausalLM"], "unsupported architecture"),
    (("text_config", "rope_scaling"), {"rope_type": "yarn", "factor": 4.0}, "rope scaling type"),
    (("vision_config", "model_type"), "clip_vision_model", "SigLIP"),
    (("mm_tokens_per_image",), 250, "mm_tokens_per_image"),
])
def test_refuses_what_llama_cpp_cannot_represent(path, value, message):
    raw = copy.deepcopy(MEDGEMMA_4B)
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(UserError, match=message):
        parse_config(raw)


def test_missing_field_is_named():
    raw = copy.deepcopy(MEDGEMMA_4B)
    del raw["text_config"]["hidden_size"]
    with pytest.raises(UserError, match="hidden_size"):
        parse_config(raw)
