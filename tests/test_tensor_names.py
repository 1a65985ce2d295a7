"""The one name table: published MedGemma names, transformers 5.x names and text-only names."""

import pytest

from medgemma_gguf.convert.tensor_names import Component, is_vision_head, map_tensor_name

CASES = [
    # published google/medgemma-4b-it layout
    ("language_model.model.embed_tokens.weight", "token_embd.weight", Component.TEXT, False),
    ("language_model.model.norm.weight", "output_norm.weight", Component.TEXT, True),
    ("language_model.model.layers.7.self_attn.q_proj.weight", "blk.7.attn_q.weight", Component.TEXT, False),
    ("language_model.model.layers.7.self_attn.o_proj.weight", "blk.7.attn_output.weight", Component.TEXT, False),
    ("language_model.model.layers.0.self_attn.k_norm.weight", "blk.0.attn_k_norm.weight", Component.TEXT, True),
    ("language_model.model.layers.3.post_attention_layernorm.weight", "blk.3.post_attention_norm.weight",
     Component.TEXT, True),
    ("language_model.model.layers.3.pre_feedforward_layernorm.weight", "blk.3.ffn_norm.weight", Component.TEXT, True),
    ("language_model.model.layers.3.post_feedforward_layernorm.weight", "blk.3.post_ffw_norm.weight",
     Component.TEXT, True),
    ("language_model.model.layers.12.mlp.down_proj.weight", "blk.12.ffn_down.weight", Component.TEXT, False),
    ("vision_tower.vision_model.embeddings.patch_embedding.weight", "v.patch_embd.weight", Component.VISION, False),
    ("vision_tower.vision_model.embeddings.patch_embedding.bias", "v.patch_embd.bias", Component.VISION, False),
    ("vision_tower.vision_model.embeddings.position_embedding.weight", "v.position_embd.weight",
     Component.VISION, False),
    ("vision_tower.vision_model.encoder.layers.26.self_attn.out_proj.bias", "v.blk.26.attn_out.bias",
     Component.VISION, False),
    ("vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight", "v.blk.1.ffn_up.weight", Component.VISION, False),
    ("vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight", "v.blk.1.ffn_down.weight", Component.VISION, False),
    ("vision_tower.vision_model.encoder.layers.0.layer_norm1.bias", "v.blk.0.ln1.bias", Component.VISION, False),
    ("vision_tower.vision_model.post_layernorm.weight", "v.post_ln.weight", Component.VISION, False),
    ("multi_modal_projector.mm_input_projection_weight", "mm.input_projection.weight", Component.PROJECTOR, False),
    ("multi_modal_projector.mm_soft_emb_norm.weight", "mm.soft_emb_norm.weight", Component.PROJECTOR, True),
    # transformers 5.x save_pretrained layouts
    ("vision_tower.encoder.layers.2.self_attn.v_proj.weight", "v.blk.2.attn_v.weight", Component.VISION, False),
    ("vision_tower.embeddings.patch_embedding.weight", "v.patch_embd.weight", Component.VISION, False),
    ("model.language_model.layers.5.mlp.gate_proj.weight", "blk.5.ffn_gate.weight", Component.TEXT, False),
    ("model.vision_tower.vision_model.post_layernorm.bias", "v.post_ln.bias", Component.VISION, False),
    ("model.multi_modal_projector.mm_input_projection_weight", "mm.input_projection.weight",
     Component.PROJECTOR, False),
    ("lm_head.weight", "output.weight", Component.TEXT, False),
    ("language_model.lm_head.weight", "output.weight", Component.TEXT, False),
    # Gemma3ForCausalLM (MedGemma 27B text)
    ("model.layers.61.self_attn.q_norm.weight", "blk.61.attn_q_norm.weight", Component.TEXT, True),
    ("model.embed_tokens.weight", "token_embd.weight", Component.TEXT, False),
]


@pytest.mark.parametrize(("source", "gguf_name", "component", "add_one"), CASES)
def test_maps_known_layouts(source, gguf_name, component, add_one):
    mapped = map_tensor_name(source)
    assert mapped is not None
    assert (mapped.gguf, mapped.component, mapped.add_one) == (gguf_name, component, add_one)


@pytest.mark.parametrize("source", [
    "language_model.model.layers.0.self_attn.qkv_proj.weight",
    "vision_tower.vision_model.encoder.layers.0.mlp.fc3.weight",
    "something.else",
    "language_model.model.layers.x.mlp.up_proj.weight",
])
def test_unknown_names_do_not_map(source):
    assert map_tensor_name(source) is None


def test_vision_head_is_recognised_as_unused():
    assert is_vision_head("vision_tower.vision_model.head.attention.in_proj_weight")
    assert not is_vision_head("vision_tower.vision_model.post_layernorm.weight")


def test_layer_numbers_are_kept():
    mapped = map_tensor_name("language_model.model.layers.33.mlp.up_proj.weight")
    assert mapped is not None and mapped.layer == 33
