"""Reading a Gemma 3 ``config.json`` into typed hyperparameters, refusing what llama.cpp cannot represent.

Handles both the published config format (``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``,
``sliding_window_pattern``) and the one transformers 5.x writes (``rope_parameters`` per layer type,
``layer_types``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import UserError

MULTIMODAL_ARCH = "Gemma3ForConditionalGeneration"
TEXT_ONLY_ARCH = "Gemma3ForCausalLM"
SUPPORTED_ARCHS = (MULTIMODAL_ARCH, TEXT_ONLY_ARCH)
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")
# llama.cpp picks Gemma 3's attention scale from the layer count: 62 layers (27B) -> n_embd / n_head,
# anything else -> head_dim (src/models/gemma3.cpp).
LLAMA_CPP_27B_LAYERS = 62


@dataclass(frozen=True)
class RopeSettings:
    """Rotary embedding settings of one attention kind."""

    theta: float
    scaling_type: str  # "none" | "linear"
    factor: float = 1.0


@dataclass(frozen=True)
class TextParams:
    """The Gemma 3 text decoder's hyperparameters, as llama.cpp's gemma3 loader reads them."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    sliding_window: int
    layer_is_sliding: tuple[bool, ...]
    rope_global: RopeSettings
    rope_local: RopeSettings
    final_logit_softcapping: float | None
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionParams:
    """SigLIP vision tower + Gemma 3 projector hyperparameters, as llama.cpp's clip loader reads them."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    mm_tokens_per_image: int
    projection_dim: int

    @property
    def pool_factor(self) -> int:
        """Side reduction of the average pool: (image_size / patch_size) / sqrt(tokens per image)."""
        return (self.image_size // self.patch_size) // math.isqrt(self.mm_tokens_per_image)


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint's architecture and parameters."""

    architecture: str
    text: TextParams
    vision: VisionParams | None
    raw: dict[str, Any]

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None


def read_config(folder: Path) -> ModelConfig:
    """Read and validate ``folder/config.json``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found; point convert at a Hugging Face Gemma 3 checkpoint folder or repo id")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-download it") from exc
    return parse_config(raw, where=str(path))


def parse_config(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Validate a parsed config dict (see :func:`read_config`)."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHS), None)
    if arch is None:
        found = ", ".join(archs) or f"model_type {raw.get('model_type')!r}"
        raise UserError(f"{where}: unsupported architecture {found}; medgemma-gguf converts Gemma 3 checkpoints "
                        f"({MULTIMODAL_ARCH} or {TEXT_ONLY_ARCH}), e.g. google/medgemma-4b-it")
    if arch == MULTIMODAL_ARCH:
        text_raw = raw.get("text_config")
        vision_raw = raw.get("vision_config")
        if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
            raise UserError(f"{where}: {MULTIMODAL_ARCH} needs text_config and vision_config; the file is incomplete")
    else:
        text_raw, vision_raw = raw, None
    text = _parse_text(text_raw, where)
    vision = _parse_vision(vision_raw, raw, text, where) if vision_raw is not None else None
    return ModelConfig(architecture=arch, text=text, vision=vision, raw=raw)


def _need(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise UserError(f"{where}: missing {key!r}; the config is incomplete or not a Gemma 3 config")
    return cfg[key]


def _layer_types(cfg: dict[str, Any], n_layer: int, where: str) -> tuple[bool, ...]:
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != n_layer:
            raise UserError(f"{where}: layer_types has {len(types)} entries for {n_layer} layers; fix the config")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise UserError(f"{where}: unsupported layer type(s) {unknown}; Gemma 3 has sliding_attention "
                            "and full_attention layers only")
        return tuple(t == "sliding_attention" for t in types)
    pattern = int(cfg.get("sliding_window_pattern", 6))
    return tuple((i + 1) % pattern != 0 for i in range(n_layer))


def _rope(cfg: dict[str, Any], where: str) -> tuple[RopeSettings, RopeSettings]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full, sliding = params["full_attention"], params.get("sliding_attention", {})
        global_theta = float(full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0)))
        local_theta = float(sliding.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0)))
        global_scaling, local_scaling = full, sliding
    else:
        global_theta = float(cfg.get("rope_theta", 1_000_000.0))
        local_theta = float(cfg.get("rope_local_base_freq", 10_000.0))
        global_scaling, local_scaling = (cfg.get("rope_scaling") or {}), {}
    global_rope = _rope_settings(global_theta, global_scaling, where, "global")
    local_rope = _rope_settings(local_theta, local_scaling, where, "local")
    if local_rope.scaling_type != "none":
        raise UserError(f"{where}: rope scaling on sliding-window layers ({local_rope.scaling_type}) is not "
                        "supported by llama.cpp's gemma3; it applies scaling to global layers only")
    return global_rope, local_rope


def _rope_settings(theta: float, scaling: dict[str, Any], where: str, kind: str) -> RopeSettings:
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeSettings(theta, "none")
    if rope_type == "linear":
        return RopeSettings(theta, "linear", float(scaling["factor"]))
    raise UserError(f"{where}: {kind} rope scaling type {rope_type!r} is not supported; "
                    "medgemma-gguf writes linear or no scaling, as Gemma 3 uses")


def _parse_text(cfg: dict[str, Any], where: str) -> TextParams:
    if cfg.get("attn_logit_softcapping") is not None:
        raise UserError(f"{where}: attn_logit_softcapping={cfg['attn_logit_softcapping']} cannot be represented "
                        "by llama.cpp's gemma3 architecture; this is not a Gemma 3 checkpoint")
    if cfg.get("attention_bias"):
        raise UserError(f"{where}: attention_bias=true is not supported by llama.cpp's gemma3 architecture")
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in GELU_TANH:
        raise UserError(f"{where}: hidden activation {activation!r} is not supported; llama.cpp's gemma3 "
                        "uses tanh-approximated GELU")
    n_layer = int(_need(cfg, "num_hidden_layers", where))
    n_embd = int(_need(cfg, "hidden_size", where))
    n_head = int(_need(cfg, "num_attention_heads", where))
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    expected_scalar = n_embd / n_head if n_layer == LLAMA_CPP_27B_LAYERS else head_dim
    scalar = float(cfg.get("query_pre_attn_scalar", expected_scalar))
    if not math.isclose(scalar, expected_scalar):
        raise UserError(f"{where}: query_pre_attn_scalar={scalar:g} but llama.cpp's gemma3 infers "
                        f"{expected_scalar:g} for a {n_layer}-layer model (attention scale is not stored in "
                        "GGUF); the converted model would be wrong, so it is refused")
    layer_is_sliding = _layer_types(cfg, n_layer, where)
    rope_global, rope_local = _rope(cfg, where)
    softcap = cfg.get("final_logit_softcapping")
    return TextParams(
        n_layer=n_layer, n_embd=n_embd, n_ff=int(_need(cfg, "intermediate_size", where)), n_head=n_head,
        n_head_kv=int(cfg.get("num_key_value_heads") or n_head), head_dim=head_dim,
        vocab_size=int(_need(cfg, "vocab_size", where)),
        context_length=int(cfg.get("max_position_embeddings", 131072)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        sliding_window=int(cfg.get("sliding_window") or 0), layer_is_sliding=layer_is_sliding,
        rope_global=rope_global, rope_local=rope_local,
        final_logit_softcapping=float(softcap) if softcap else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def _parse_vision(cfg: dict[str, Any], top: dict[str, Any], text: TextParams, where: str) -> VisionParams:
    model_type = cfg.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise UserError(f"{where}: vision tower {model_type!r} is not supported; Gemma 3 uses SigLIP")
    activation = cfg.get("hidden_act", "gelu_pytorch_tanh")
    if activation not in GELU_TANH:
        raise UserError(f"{where}: vision activation {activation!r} is not supported; llama.cpp's clip uses GELU")
    image_size = int(_need(cfg, "image_size", where))
    patch_size = int(_need(cfg, "patch_size", where))
    tokens = int(top.get("mm_tokens_per_image", 256))
    side = math.isqrt(tokens)
    patches = image_size // patch_size
    if side * side != tokens or image_size % patch_size or patches % side:
        raise UserError(f"{where}: mm_tokens_per_image={tokens} does not evenly pool a {patches}x{patches} "
                        "patch grid; llama.cpp's gemma3 projector needs a square average pool")
    return VisionParams(
        n_layer=int(_need(cfg, "num_hidden_layers", where)), n_embd=int(_need(cfg, "hidden_size", where)),
        n_ff=int(_need(cfg, "intermediate_size", where)), n_head=int(_need(cfg, "num_attention_heads", where)),
        image_size=image_size, patch_size=patch_size, layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
        mm_tokens_per_image=tokens, projection_dim=text.n_embd,
    )
