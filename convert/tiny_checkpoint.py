"""Deterministic tiny random-weight Gemma 3 / MedGemma checkpoints laid out like the published ones.

Every variant is the real architecture at toy widths: the file set, tensor names, dtype (bf16),
sharding, config keys and tokenizer files follow google/medgemma-4b-it (image+text) or
google/medgemma-27b-text-it (text only), so the converter, quantizer and runtime see what they would
see on the real download.  ``mm-hf5`` is instead exactly what the installed transformers writes with
``save_pretrained`` (its own tensor names and tokenizer_config format).

The tokenizer is a small SentencePiece BPE model trained (single-threaded, so deterministically) on the
bundled ``tiny_corpus.txt``.  Its first ids are Gemma's specials in Gemma's order, then the turn and
image markers, then the 256 byte pieces; ``<image_soft_token>`` is an added token right after the
SentencePiece vocabulary, and the embedding has 64 padding rows beyond it, as the real 262208-row one.

Weights are drawn per tensor from a generator seeded by (seed, published tensor name), away from
transformers' default init: Gemma's (1 + w) norm weights, SigLIP's biases and the projector norm are
all random, so a mapping slip anywhere changes the outputs.  ``mm-hf5`` holds the same weights as
``mm-k256`` (same names, same seed), only in another layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import atomic_directory
from medgemma_gguf.errors import UserError

CORPUS_PATH = Path(__file__).with_name("tiny_corpus.txt")

# --- tokenizer layout (ids are checked against the trained model) -----------------------------------
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
MULTIMODAL_ID = 5
START_OF_TURN_ID, END_OF_TURN_ID, START_OF_IMAGE_ID, END_OF_IMAGE_ID = 6, 7, 8, 9
FIRST_BYTE_ID = 10  # <0x00> .. <0xFF> are ids 10 .. 265
SP_VOCAB_SIZE = 1024  # SentencePiece pieces (the real model: 262144)
IMAGE_SOFT_TOKEN_ID = SP_VOCAB_SIZE  # the one added token, right after the sp vocab (real: 262144)
EMBEDDING_ROWS = SP_VOCAB_SIZE + 64  # padded like the real 262208 = 262144 + 64
USER_DEFINED_PIECES = ("<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>",
                       "<start_of_image>", "<end_of_image>")
IMAGE_SOFT_TOKEN = "<image_soft_token>"

# Version string written where the published files carry the transformers version they were saved with.
PUBLISHED_TRANSFORMERS_VERSION = "4.51.3"

# The Gemma 3 chat template, verbatim from google/gemma-3-*-it and google/medgemma-4b-it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# --- layouts ------------------------------------------------------------------------------------------
PUBLISHED = "published"  # google/medgemma-4b-it names, sharded bf16
HF5 = "hf5"  # what the installed transformers' save_pretrained writes
TEXT_ONLY = "text"  # google/medgemma-27b-text-it: Gemma3ForCausalLM

NORM_STD = 0.3  # Gemma norms scale by (1 + w): w ~ N(0, 0.3) makes every norm matter
BIAS_STD = 0.1
POSITION_EMBEDDING_STD = 0.5


@dataclass(frozen=True)
class VisionSpec:
    """SigLIP vision tower sizes (real MedGemma 4B: 1152 / 4304 / 27 layers / 16 heads / 896 px)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    mm_tokens_per_image: int

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool_factor(self) -> int:
        """Side reduction of the projector's average pool (real: 64 / 16 = 4)."""
        return self.patches_per_side // math.isqrt(self.mm_tokens_per_image)


@dataclass(frozen=True)
class TinySpec:
    """Sizes and layout of one tiny checkpoint variant."""

    name: str
    layout: str  # PUBLISHED | HF5 | TEXT_ONLY
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    vision: VisionSpec | None
    sliding_window_pattern: int = 6
    write_layer_types: bool = True  # False: config gives only sliding_window_pattern, like older files

    @property
    def multimodal(self) -> bool:
        return self.vision is not None

    @property
    def layer_types(self) -> list[str]:
        """Gemma 3's 5 local : 1 global pattern, the global layer last in every group of six."""
        pattern = self.sliding_window_pattern
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(self.num_layers)]

    @property
    def vocab_size(self) -> int:
        return EMBEDDING_ROWS


_K256_VISION = VisionSpec(hidden_size=128, intermediate_size=304, num_layers=2, num_heads=2,
                          image_size=224, patch_size=14, mm_tokens_per_image=16)

VARIANTS: dict[str, TinySpec] = {
    # Every text matrix input width is a multiple of 256 (k-quants apply). SigLIP's 304 = 16 * 19 is,
    # like the real 4304 = 16 * 269, not a multiple of 32.
    "mm-k256": TinySpec(name="mm-k256", layout=PUBLISHED, hidden_size=256, intermediate_size=768,
                        num_layers=6, num_heads=4, num_kv_heads=2, head_dim=64, sliding_window=32,
                        vision=_K256_VISION),
    # Two full 5:1 groups plus a partial one; n_head * head_dim != hidden (as the real 4B: 8 * 256 != 2560).
    "mm-deep": TinySpec(name="mm-deep", layout=PUBLISHED, hidden_size=64, intermediate_size=128,
                        num_layers=14, num_heads=4, num_kv_heads=1, head_dim=32, sliding_window=16,
                        vision=VisionSpec(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                                          image_size=112, patch_size=14, mm_tokens_per_image=4)),
    # The mm-k256 model as transformers 5.x save_pretrained writes it (same weights).
    "mm-hf5": TinySpec(name="mm-hf5", layout=HF5, hidden_size=256, intermediate_size=768,
                       num_layers=6, num_heads=4, num_kv_heads=2, head_dim=64, sliding_window=32,
                       vision=_K256_VISION),
    # Text-only Gemma3ForCausalLM; 7 layers = one 5:1 group + one local layer; config has only
    # sliding_window_pattern (no layer_types), as the published 27B text config.
    "text": TinySpec(name="text", layout=TEXT_ONLY, hidden_size=256, intermediate_size=512,
                     num_layers=7, num_heads=4, num_kv_heads=2, head_dim=128, sliding_window=32,
                     vision=None, write_layer_types=False),
}


# --- tokenizer ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _sentencepiece_model() -> bytes:
    """Train the tiny BPE SentencePiece model on the bundled corpus deterministically."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    lines = [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe", vocab_size=SP_VOCAB_SIZE,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=list(USER_DEFINED_PIECES), byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=16384, minloglevel=2,
    )
    model = buffer.getvalue()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    pieces = [p.piece for p in proto.pieces]
    expected = {PAD_ID: "<pad>", EOS_ID: "<eos>", BOS_ID: "<bos>", UNK_ID: "<unk>",
                **{MASK_ID + i: piece for i, piece in enumerate(USER_DEFINED_PIECES)},
                FIRST_BYTE_ID: "<0x00>", FIRST_BYTE_ID + 255: "<0xFF>"}
    wrong = {i: p for i, p in expected.items() if i >= len(pieces) or pieces[i] != p}
    if len(pieces) != SP_VOCAB_SIZE or wrong:
        raise RuntimeError(f"this sentencepiece version laid out the tiny vocabulary differently: {wrong}")
    return model


def _token_entry(content: str, special: bool, normalized: bool = False) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def _added_tokens_decoder() -> dict[str, dict[str, Any]]:
    """The published ``added_tokens_decoder``: every non-normal piece plus the added one."""
    specials = {"<pad>": True, "<eos>": True, "<bos>": True, "<unk>": True, "<mask>": True,
                "[multimodal]": False, "<start_of_turn>": True, "<end_of_turn>": True,
                "<start_of_image>": True, "<end_of_image>": True}
    decoder = {str(i): _token_entry(content, special)
               for i, (content, special) in enumerate(specials.items())}
    decoder[str(IMAGE_SOFT_TOKEN_ID)] = _token_entry(IMAGE_SOFT_TOKEN, True)
    return decoder


def _special_tokens_map() -> dict[str, Any]:
    def named(content: str) -> dict[str, Any]:
        entry = _token_entry(content, True)
        del entry["special"]
        return entry

    return {"boi_token": "<start_of_image>", "bos_token": named("<bos>"), "eoi_token": "<end_of_image>",
            "eos_token": named("<eos>"), "image_token": IMAGE_SOFT_TOKEN, "pad_token": named("<pad>"),
            "unk_token": named("<unk>")}


def _tokenizer_config(multimodal: bool) -> dict[str, Any]:
    """tokenizer_config.json in the published (transformers 4.5x) format."""
    config: dict[str, Any] = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": _added_tokens_decoder(),
        "boi_token": "<start_of_image>", "bos_token": "<bos>", "chat_template": GEMMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eoi_token": "<end_of_image>", "eos_token": "<eos>",
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": IMAGE_SOFT_TOKEN},
        "image_token": IMAGE_SOFT_TOKEN, "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>", "padding_side": "left", "sp_model_kwargs": None,
        "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if multimodal:
        config["processor_class"] = "Gemma3Processor"
    return config


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _write_tokenizer_files(folder: Path, multimodal: bool) -> None:
    """tokenizer.model, tokenizer.json (built by transformers), tokenizer_config, special tokens, template."""
    from transformers import AutoTokenizer

    (folder / "tokenizer.model").write_bytes(_sentencepiece_model())
    (folder / "tokenizer_config.json").write_bytes(_json_bytes(_tokenizer_config(multimodal)))
    (folder / "special_tokens_map.json").write_bytes(_json_bytes(_special_tokens_map()))
    (folder / "added_tokens.json").write_bytes(_json_bytes({IMAGE_SOFT_TOKEN: IMAGE_SOFT_TOKEN_ID}))
    if multimodal:
        (folder / "chat_template.json").write_bytes(_json_bytes({"chat_template": GEMMA3_CHAT_TEMPLATE}))
    # tokenizer.json is the fast tokenizer transformers builds from the files above.
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))


# --- configs --------------------------------------------------------------------------------------------
def _text_config(spec: TinySpec) -> dict[str, Any]:
    """The text config in the published format (rope_theta, rope_local_base_freq, rope_scaling)."""
    config: dict[str, Any] = {
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "cache_implementation": "hybrid", "final_logit_softcapping": None, "head_dim": spec.head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": spec.hidden_size, "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size, "max_position_embeddings": 131072,
        "model_type": "gemma3_text", "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers, "num_key_value_heads": spec.num_kv_heads,
        # llama.cpp scales attention by 1/sqrt(head_dim) unless the model has 62 layers.
        "query_pre_attn_scalar": spec.head_dim, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
        "sliding_window": spec.sliding_window, "sliding_window_pattern": spec.sliding_window_pattern,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": spec.vocab_size,
    }
    if spec.write_layer_types:
        config["layer_types"] = spec.layer_types
    return config


def _vision_config(vision: VisionSpec) -> dict[str, Any]:
    return {
        "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh", "hidden_size": vision.hidden_size,
        "image_size": vision.image_size, "intermediate_size": vision.intermediate_size,
        "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model", "num_attention_heads": vision.num_heads, "num_channels": 3,
        "num_hidden_layers": vision.num_layers, "patch_size": vision.patch_size, "torch_dtype": "bfloat16",
        "vision_use_head": False,
    }


def published_config(spec: TinySpec) -> dict[str, Any]:
    """config.json as the published checkpoint has it (image+text or text-only)."""
    if not spec.multimodal:
        return {"architectures": ["Gemma3ForCausalLM"], "bos_token_id": BOS_ID,
                "eos_token_id": [EOS_ID, END_OF_TURN_ID], "pad_token_id": PAD_ID,
                "transformers_version": PUBLISHED_TRANSFORMERS_VERSION, **_text_config(spec)}
    assert spec.vision is not None
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": START_OF_IMAGE_ID,
        "eoi_token_index": END_OF_IMAGE_ID, "eos_token_id": [EOS_ID, END_OF_TURN_ID],
        "image_token_index": IMAGE_SOFT_TOKEN_ID, "initializer_range": 0.02,
        "mm_tokens_per_image": spec.vision.mm_tokens_per_image, "model_type": "gemma3",
        "text_config": _text_config(spec), "torch_dtype": "bfloat16",
        "transformers_version": PUBLISHED_TRANSFORMERS_VERSION, "vision_config": _vision_config(spec.vision),
    }


def _generation_config() -> dict[str, Any]:
    return {"bos_token_id": BOS_ID, "cache_implementation": "hybrid", "do_sample": True,
            "eos_token_id": [EOS_ID, END_OF_TURN_ID], "pad_token_id": PAD_ID, "top_k": 64, "top_p": 0.95,
            "transformers_version": PUBLISHED_TRANSFORMERS_VERSION}


def _preprocessor_config(vision: VisionSpec) -> dict[str, Any]:
    """Gemma3ImageProcessor settings; the nulls are what the published file has (the processor's defaults)."""
    return {
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
        "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
        "image_seq_length": vision.mm_tokens_per_image, "image_std": [0.5, 0.5, 0.5],
        "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": vision.image_size, "width": vision.image_size},
    }


def _processor_config(vision: VisionSpec) -> dict[str, Any]:
    return {"image_seq_length": vision.mm_tokens_per_image, "processor_class": "Gemma3Processor"}


# --- weights --------------------------------------------------------------------------------------------
def _transformers_model(spec: TinySpec, config: dict[str, Any]) -> Any:
    """The transformers model for ``spec`` (float32, CPU), with its default init (overwritten later)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig

    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG state left as it was
        torch.manual_seed(0)
        if spec.multimodal:
            return Gemma3ForConditionalGeneration(Gemma3Config(**config)).eval()
        return Gemma3ForCausalLM(Gemma3TextConfig(**config)).eval()


def published_name(module_name: str, multimodal: bool) -> str | None:
    """The published checkpoint's name for a transformers 5.x parameter name; None for the tied lm_head."""
    if module_name == "lm_head.weight":
        return None
    if not multimodal:
        return module_name
    for internal, published in (("model.language_model.", "language_model.model."),
                                ("model.vision_tower.", "vision_tower.vision_model."),
                                ("model.multi_modal_projector.", "multi_modal_projector.")):
        if module_name.startswith(internal):
            return published + module_name[len(internal):]
    raise RuntimeError(f"unexpected parameter {module_name} in the transformers Gemma 3 model")


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """Random float32 values for the published tensor ``name``, scaled to keep activations sane."""
    import torch

    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    normal = torch.randn(shape, generator=generator, dtype=torch.float32)
    is_vision = name.startswith("vision_tower.") or ".vision_model." in name
    if name.endswith(".bias"):
        return normal * BIAS_STD
    if len(shape) == 1:  # norm weights
        if is_vision:  # SigLIP LayerNorm: plain scale
            return 1.0 + normal * NORM_STD
        return normal * NORM_STD  # Gemma RMSNorm scales by (1 + w)
    if name.endswith("position_embedding.weight"):
        return normal * POSITION_EMBEDDING_STD
    if name.endswith("embed_tokens.weight"):
        return normal / math.sqrt(shape[1])  # Gemma multiplies by sqrt(hidden) on lookup
    if name.endswith("mm_input_projection_weight"):  # used as x @ W: input width is dim 0
        return normal / math.sqrt(shape[0])
    fan_in = math.prod(shape[1:])  # Linear (out, in) and Conv2d (out, in, kh, kw)
    return normal / math.sqrt(fan_in)


def _published_weights(spec: TinySpec, model: Any, seed: int) -> dict[str, Any]:
    """Published name -> bf16 tensor for every parameter of ``model`` (the tied lm_head left out)."""
    import torch

    weights: dict[str, Any] = {}
    for module_name, parameter in model.state_dict().items():
        name = published_name(module_name, spec.multimodal)
        if name is not None:
            weights[name] = _random_tensor(name, tuple(parameter.shape), seed).to(torch.bfloat16).contiguous()
    return weights


def _write_shards(folder: Path, weights: dict[str, Any], n_shards: int = 2) -> None:
    """Write ``model-0000i-of-0000n.safetensors`` (split by bytes in name order) and the index."""
    from safetensors.torch import save_file

    names = sorted(weights)
    sizes = [weights[n].numel() * weights[n].element_size() for n in names]
    total = sum(sizes)
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    written = 0
    for name, size in zip(names, sizes, strict=True):
        index = min(n_shards - 1, written * n_shards // total)
        shards[index].append(name)
        written += size
    weight_map: dict[str, str] = {}
    for i, shard_names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: weights[n] for n in shard_names}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, filename))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_bytes(_json_bytes(index))


# --- variants -------------------------------------------------------------------------------------------
def _build_published(folder: Path, spec: TinySpec, seed: int) -> None:
    config = published_config(spec)
    model = _transformers_model(spec, config)
    _write_shards(folder, _published_weights(spec, model, seed))
    (folder / "config.json").write_bytes(_json_bytes(config))
    (folder / "generation_config.json").write_bytes(_json_bytes(_generation_config()))
    _write_tokenizer_files(folder, spec.multimodal)
    if spec.vision is not None:
        (folder / "preprocessor_config.json").write_bytes(_json_bytes(_preprocessor_config(spec.vision)))
        (folder / "processor_config.json").write_bytes(_json_bytes(_processor_config(spec.vision)))


def _build_hf5(folder: Path, spec: TinySpec, seed: int) -> None:
    """Load the published files into transformers and let ``save_pretrained`` write them its way."""
    import torch
    from transformers import AutoProcessor, GenerationConfig

    with tempfile.TemporaryDirectory(prefix="tiny-published-") as staging_dir:
        staging = Path(staging_dir)
        config = published_config(spec)
        model = _transformers_model(spec, config)
        weights = _published_weights(spec, model, seed)
        state = {}
        for module_name in model.state_dict():
            name = published_name(module_name, spec.multimodal)
            if name is not None:
                state[module_name] = weights[name]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"tiny weights do not fit: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model = model.to(torch.bfloat16)
        model.generation_config = GenerationConfig(**{k: v for k, v in _generation_config().items()
                                                      if k != "transformers_version"})
        (staging / "config.json").write_bytes(_json_bytes(config))
        _write_tokenizer_files(staging, multimodal=True)
        assert spec.vision is not None
        (staging / "preprocessor_config.json").write_bytes(_json_bytes(_preprocessor_config(spec.vision)))
        (staging / "processor_config.json").write_bytes(_json_bytes(_processor_config(spec.vision)))
        processor = AutoProcessor.from_pretrained(str(staging))
        model.save_pretrained(str(folder))
        processor.save_pretrained(str(folder))


def build_tiny_checkpoint(outdir: Path, variant: str = "mm-k256", seed: int = 0) -> Path:
    """Write the tiny checkpoint ``variant`` into ``outdir`` (new or empty) and return ``outdir``.

    Deterministic: the same variant and seed give byte-identical files.  The folder appears complete
    or not at all (built under a temporary name, renamed at the end).
    """
    spec = VARIANTS.get(variant)
    if spec is None:
        raise UserError(f"unknown tiny checkpoint variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    outdir = Path(outdir)
    with atomic_directory(outdir) as partial:
        if spec.layout == HF5:
            _build_hf5(partial, spec, seed)
        else:
            _build_published(partial, spec, seed)
    return outdir
