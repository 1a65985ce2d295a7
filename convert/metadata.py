"""GGUF key/values for the text model (llama.cpp ``gemma3``) and the mmproj (clip, projector ``gemma3``).

Key names come from gguf-py's writer methods, so they are the ones llama.cpp reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from medgemma_gguf.convert.config import ModelConfig
from medgemma_gguf.convert.vocab import Vocab

TEXT_ARCH = "gemma3"
QUANTIZED_BY = "medgemma-gguf"  # general.quantized_by, copied into every quant by llama.cpp's quantizer
BASE_TAGS = ("medical",)  # general.tags besides the source card's
_SIZE_LABEL = re.compile(r"^\d+(\.\d+)?[bmk]$", re.IGNORECASE)
# Gemma 3's image processor normalises with mean = std = 0.5 (preprocessor_config.json).
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
CLIP_DEFAULT_POOL = 4  # llama.cpp's default Gemma 3 projector pooling (896 / 14 / 4 = 16 per side)


@dataclass
class GeneralInfo:
    """``general.*`` keys: who the model is and where it came from."""

    name: str
    basename: str
    size_label: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    base_models: list[str] = field(default_factory=list)
    source_repo: str | None = None  # Hub repo id, or None for a local folder
    source_revision: str | None = None
    finetune: str | None = None
    quantized_by: str | None = QUANTIZED_BY
    tags: list[str] = field(default_factory=list)


def finetune_of(name: str) -> str | None:
    """llama.cpp's naming ``<basename>-<size>-<finetune>``: what follows the size label (``it`` for
    ``medgemma-4b-it``, ``text-it`` for ``medgemma-27b-text-it``), or None when the name has no size label."""
    words = name.split("-")
    for i, word in enumerate(words):
        if _SIZE_LABEL.match(word):
            return "-".join(words[i + 1:]) or None
    return None


def read_card_metadata(folder: Path) -> dict[str, Any]:
    """The YAML front matter of the checkpoint's README.md model card ({} if absent)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception:  # a malformed card must not stop a conversion; the keys are informative
        return {}


def general_info(name: str, card: dict[str, Any], *, source_repo: str | None, revision: str | None,
                 n_params: int) -> GeneralInfo:
    """Collect ``general.*`` values from the model name, its card and the source."""
    base = card.get("base_model") or []
    base_models = [base] if isinstance(base, str) else [str(b) for b in base]
    basename = name.split("-")[0] if "-" in name else name
    card_tags = card.get("tags") or []
    tags = list(dict.fromkeys([*BASE_TAGS, *(str(t) for t in (card_tags if isinstance(card_tags, list) else []))]))
    return GeneralInfo(
        name=name, basename=basename, size_label=gguf.size_label(n_params, 0, 0, 0),
        license=card.get("license"), license_name=card.get("license_name"), license_link=card.get("license_link"),
        base_models=base_models, source_repo=source_repo, source_revision=revision, finetune=finetune_of(name),
        tags=tags,
    )


# GeneralInfo fields written when set, in this order, each by gguf-py's ``GGUFWriter.add_<field>``
_OPTIONAL_GENERAL = ("size_label", "finetune", "quantized_by", "tags", "license", "license_name", "license_link")


def add_general(writer: gguf.GGUFWriter, info: GeneralInfo, file_type: int) -> None:
    writer.add_name(info.name)
    writer.add_basename(info.basename)
    for name in _OPTIONAL_GENERAL:
        value = getattr(info, name)
        if value:
            getattr(writer, f"add_{name}")(value)
    if info.base_models:
        writer.add_base_model_count(len(info.base_models))
        for i, base in enumerate(info.base_models):
            writer.add_base_model_name(i, base.split("/")[-1])
            if "/" in base:
                writer.add_base_model_organization(i, base.split("/")[0])
                writer.add_base_model_repo_url(i, f"https://huggingface.co/{base}")
    if info.source_repo:
        writer.add_source_repo_url(f"https://huggingface.co/{info.source_repo}")
        if info.source_revision:
            writer.add_source_url(f"https://huggingface.co/{info.source_repo}/tree/{info.source_revision}")
    if info.source_revision:
        writer.add_string("general.source.revision", info.source_revision)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_text_hparams(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """Everything llama.cpp's gemma3 loader reads, with the sliding-window pattern written per layer."""
    text = config.text
    writer.add_context_length(text.context_length)
    writer.add_embedding_length(text.n_embd)
    writer.add_block_count(text.n_layer)
    writer.add_feed_forward_length(text.n_ff)
    writer.add_head_count(text.n_head)
    writer.add_head_count_kv(text.n_head_kv)
    writer.add_key_length(text.head_dim)
    writer.add_value_length(text.head_dim)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_rope_freq_base(text.rope_global.theta)
    if text.rope_global.scaling_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(text.rope_global.factor)
    if any(text.layer_is_sliding) and text.sliding_window > 0:
        writer.add_sliding_window(text.sliding_window)
        writer.add_sliding_window_pattern(list(text.layer_is_sliding))
        writer.add_rope_freq_base_swa(text.rope_local.theta)
    if text.final_logit_softcapping:
        writer.add_final_logit_softcapping(text.final_logit_softcapping)


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """``tokenizer.*``: SentencePiece vocabulary, types, special ids and the chat template."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types([int(t) for t in vocab.types])
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
               "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for role, token_id in vocab.special_ids.items():
        setters[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# generation_config.json key -> (general.sampling.* key, type, valid range): what llama.cpp's
# common_init_sampler_from_model reads at load (llama-server, llama-cli) and runtime.sampling reads here.
_SAMPLING_KEYS: dict[str, tuple[str, type, float, float]] = {
    "top_k": (gguf.Keys.General.SAMPLING_TOP_K, int, 1, 2**31 - 1),
    "top_p": (gguf.Keys.General.SAMPLING_TOP_P, float, 0.0, 1.0),
    "min_p": (gguf.Keys.General.SAMPLING_MIN_P, float, 0.0, 1.0),
    "temperature": (gguf.Keys.General.SAMPLING_TEMP, float, 0.0, 100.0),
    "repetition_penalty": (gguf.Keys.General.SAMPLING_PENALTY_REPEAT, float, 0.1, 10.0),
}


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, int | float]:
    """``general.sampling.*`` values from a checkpoint's ``generation_config.json`` (MedGemma: top_k 64,
    top_p 0.95). Keys absent or out of range are left out; ``do_sample`` is ignored, as llama.cpp's
    converter ignores it (the runtime decides whether to sample)."""
    values: dict[str, int | float] = {}
    for name, (key, kind, low, high) in _SAMPLING_KEYS.items():
        value = generation_config.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            continue
        if kind is int and value != int(value):
            continue
        values[key] = kind(value)
    return values


def add_sampling(writer: gguf.GGUFWriter, values: dict[str, int | float]) -> None:
    """Write ``general.sampling.*`` keys (int32 for top_k, float32 for the rest, as gguf-py's writer does)."""
    for key, value in values.items():
        if isinstance(value, int):
            writer.add_int32(key, value)
        else:
            writer.add_float32(key, value)


def add_mmproj_hparams(writer: gguf.GGUFWriter, config: ModelConfig, preprocessor: dict[str, Any]) -> None:
    """Everything llama.cpp's clip loader reads for a Gemma 3 vision tower + projector."""
    vision = config.vision
    assert vision is not None
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_projection_dim(vision.projection_dim)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.n_embd)
    writer.add_vision_feed_forward_length(vision.n_ff)
    writer.add_vision_block_count(vision.n_layer)
    writer.add_vision_head_count(vision.n_head)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_use_gelu(True)
    writer.add_vision_image_mean(list(preprocessor.get("image_mean", DEFAULT_IMAGE_MEAN)))
    writer.add_vision_image_std(list(preprocessor.get("image_std", DEFAULT_IMAGE_STD)))
    if vision.pool_factor != CLIP_DEFAULT_POOL:
        writer.add_vision_projector_scale_factor(vision.pool_factor)
