"""The one table from Hugging Face Gemma 3 tensor names to GGUF tensor names.

A checkpoint name is split into a *component* by its prefix (the published google/medgemma-4b-it
layout, the layouts transformers 5.x writes on ``save_pretrained``, and the text-only
Gemma3ForCausalLM layout) and then matched against that component's rules.  Every tensor in a
checkpoint must match exactly one rule; an unknown name is an error, never silently dropped.

Gemma's RMSNorm scales by ``1 + w``; llama.cpp multiplies by the stored weight, so rules marked
``add_one`` store ``w + 1`` (text norms and the projector's ``mm_soft_emb_norm``, not SigLIP's
LayerNorms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Component(StrEnum):
    """Which output file a tensor belongs to."""

    TEXT = "text"
    VISION = "vision"
    PROJECTOR = "projector"


# (prefix, component): the first matching prefix wins, so longer prefixes come first.
PREFIXES: tuple[tuple[str, Component], ...] = (
    ("model.language_model.model.", Component.TEXT),
    ("model.language_model.", Component.TEXT),
    ("language_model.model.", Component.TEXT),
    ("language_model.", Component.TEXT),  # language_model.lm_head.weight
    ("model.vision_tower.vision_model.", Component.VISION),
    ("model.vision_tower.", Component.VISION),
    ("vision_tower.vision_model.", Component.VISION),
    ("vision_tower.", Component.VISION),
    ("model.multi_modal_projector.", Component.PROJECTOR),
    ("multi_modal_projector.", Component.PROJECTOR),
    ("model.", Component.TEXT),  # Gemma3ForCausalLM: model.layers.N...
    ("", Component.TEXT),  # lm_head.weight
)


@dataclass(frozen=True)
class Rule:
    """One mapping: ``pattern`` matches the name after its prefix; ``{bid}`` in ``gguf`` is the layer."""

    pattern: str
    gguf: str
    add_one: bool = False


# Gemma 3's decoder layer: the name after ``layers.N.`` -> (the name after ``blk.N.``, add_one); all ``.weight``.
TEXT_LAYER: dict[str, tuple[str, bool]] = {
    "input_layernorm": ("attn_norm", True),
    "self_attn.q_proj": ("attn_q", False),
    "self_attn.k_proj": ("attn_k", False),
    "self_attn.v_proj": ("attn_v", False),
    "self_attn.o_proj": ("attn_output", False),
    "self_attn.q_norm": ("attn_q_norm", True),
    "self_attn.k_norm": ("attn_k_norm", True),
    "post_attention_layernorm": ("post_attention_norm", True),
    "pre_feedforward_layernorm": ("ffn_norm", True),
    "post_feedforward_layernorm": ("post_ffw_norm", True),
    "mlp.gate_proj": ("ffn_gate", False),
    "mlp.up_proj": ("ffn_up", False),
    "mlp.down_proj": ("ffn_down", False),
}
# SigLIP's encoder layer: the name after ``encoder.layers.N.`` -> the name after ``v.blk.N.``; weight and bias.
VISION_LAYER: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}

RULES: dict[Component, tuple[Rule, ...]] = {
    Component.TEXT: (
        Rule(r"embed_tokens\.weight", "token_embd.weight"),
        Rule(r"norm\.weight", "output_norm.weight", add_one=True),
        Rule(r"lm_head\.weight", "output.weight"),
        *(Rule(rf"layers\.(\d+)\.{re.escape(hf)}\.weight", f"blk.{{bid}}.{name}.weight", add_one)
          for hf, (name, add_one) in TEXT_LAYER.items()),
    ),
    Component.VISION: (
        Rule(r"embeddings\.patch_embedding\.(weight|bias)", "v.patch_embd.{suffix}"),
        Rule(r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
        *(Rule(rf"encoder\.layers\.(\d+)\.{re.escape(hf)}\.(weight|bias)", f"v.blk.{{bid}}.{name}.{{suffix}}")
          for hf, name in VISION_LAYER.items()),
        Rule(r"post_layernorm\.(weight|bias)", "v.post_ln.{suffix}"),
    ),
    Component.PROJECTOR: (
        Rule(r"mm_input_projection_weight", "mm.input_projection.weight"),
        Rule(r"mm_input_projection\.weight", "mm.input_projection.weight"),
        Rule(r"mm_soft_emb_norm\.weight", "mm.soft_emb_norm.weight", add_one=True),
    ),
}

_COMPILED = {comp: [(re.compile(rule.pattern + r"\Z"), rule) for rule in rules] for comp, rules in RULES.items()}


@dataclass(frozen=True)
class MappedName:
    """Where one checkpoint tensor goes."""

    source: str
    component: Component
    gguf: str
    add_one: bool
    layer: int | None


def split_prefix(name: str) -> tuple[Component, str]:
    """The component of a checkpoint tensor name and the name without its prefix."""
    for prefix, component in PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix):]
    raise AssertionError("the empty prefix always matches")


def map_tensor_name(name: str) -> MappedName | None:
    """Map a checkpoint tensor name to its GGUF name, or None if no rule matches."""
    component, rest = split_prefix(name)
    for regex, rule in _COMPILED[component]:
        match = regex.match(rest)
        if match is None:
            continue
        groups = match.groups()
        layer = int(groups[0]) if groups and groups[0].isdigit() else None
        suffix = groups[-1] if groups and not groups[-1].isdigit() else ""
        gguf_name = rule.gguf.format(bid=layer, suffix=suffix)
        return MappedName(name, component, gguf_name, rule.add_one, layer)
    return None


def is_vision_head(name: str) -> bool:
    """SigLIP's pooling head (``vision_model.head.*``): unused by Gemma 3 when ``vision_use_head`` is false."""
    component, rest = split_prefix(name)
    return component is Component.VISION and rest.startswith("head.")
