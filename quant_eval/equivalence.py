"""The equivalence probe set: proof that a converted GGUF in llama.cpp is the Hugging Face model in transformers.

One module for ``medgemma-gguf check`` and the test suite (the tests call the same probes on the tiny
fixtures). The probes:

* **tokenizer** — a fixed corpus (chat markers, numbers, whitespace runs, accents, CJK, emoji, rare bytes, an
  empty string, a literal ``<bos>``) tokenized by llama.cpp and the HF tokenizer, with and without special
  tokens: the ids must be identical; each chat/image marker must be one token. The chat prompt of the greedy
  probe, rendered by the runtime (``runtime.prompt``), must give the HF processor's ids.
* **text logits** — held-out prose (``quant_eval/data/heldout-text.jsonl``) as one sequence of at least
  ``MIN_TEXT_POSITIONS`` tokens and at least twice the sliding window plus 64, so local and global layers
  both matter (a wrong sliding-window pattern shows only past the window); up to ``MAX_SCORED_POSITIONS``
  positions, evenly spread, are compared: max |Δlogit| and mean KL(reference ‖ GGUF).
* **image prompts** — per image size the processor uses (Gemma 3: one square size, pan-and-scan off), an
  image already at that size and one the processor has to resize; the prompt ids must be the processor's,
  the mmproj's embeddings must match ``get_image_features`` (minimum cosine over image tokens), and the
  next-token distributions at the prompt's text positions must match (max KL).
* **greedy reply** — a chat question answered greedily by both (transformers ``generate`` and the runtime's
  ``chat``): the tokens must be equal up to the first near-tie, a step where the reference's two most likely
  tokens are closer than the tie margin (there rounding may pick either); and along the reference's reply
  the GGUF's distribution at every step must match (max KL).

Thresholds depend on the precision of both sides (:data:`THRESHOLDS`): ``f32`` when the reference runs in
float32 and the GGUF's text weights are F32, ``bf16`` otherwise (transformers in bf16 rounds every activation
to 8 bits of mantissa; llama.cpp rounds activations to bf16 in BF16 matrix products). They were set from the
tiny fixtures with margin (``tests/test_check.py`` shows the measured figures next to the broken GGUFs' ones);
the real MedGemma weights could not be downloaded here, so their figures are not measured.

The reference runs first and is freed before the GGUF is loaded, so the peak memory is the larger of the
two (:func:`reference_memory_bytes`: the weights at the reference's dtype plus activations); a reference that
does not fit the available memory is refused with what it needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from medgemma_gguf.errors import InputError, ResourceError, UserError, setting
from medgemma_gguf.quant_eval.metrics import kl_divergence_full

log = logging.getLogger(__name__)

TOKENIZER_CORPUS = (
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
)
MARKERS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>")
MIN_TEXT_POSITIONS = 320
MAX_SCORED_POSITIONS = 512
DEFAULT_GREEDY_TOKENS = 32
REFERENCE_DTYPES = ("bf16", "f32")
UNQUANTIZED_TEXT_TYPES = ("F32", "BF16", "F16")
GREEDY_MESSAGES = ({"role": "system", "content": "You are a helpful medical assistant."},
                   {"role": "user", "content": "What is the normal adult resting heart rate?"})
IMAGE_SYSTEM = "You are an expert radiologist."
IMAGE_QUESTION = "Describe this X-ray"
GIB = 1 << 30


@dataclass(frozen=True)
class Thresholds:
    """Pass limits for one precision class (module docstring)."""

    max_abs_logit: float  # text logits: largest |Δlogit| over the scored positions and the vocabulary
    mean_kl: float  # text logits: mean KL(reference ‖ GGUF) over the scored positions, nats
    image_cosine: float  # image embeddings: smallest cosine over the image tokens
    image_prompt_kl: float  # image prompts: largest KL over the prompt's text positions
    greedy_step_kl: float  # greedy reply: largest KL over the steps of the reference's reply
    tie_margin: float  # greedy reply: a step whose reference top-two logits are closer than this is a near-tie

    def to_json(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


THRESHOLDS: dict[str, Thresholds] = {
    # fixtures: max |Δ| ≤ 0.014 (llama.cpp keeps K and V in its default f16 cache, flash attention "auto"),
    # mean KL ≤ 4.6e-7, cosine ≥ 0.99999; broken GGUFs: max |Δ| ≥ 2.4, mean KL ≥ 0.08
    "f32": Thresholds(max_abs_logit=3e-2, mean_kl=1e-5, image_cosine=0.9999, image_prompt_kl=1e-4,
                      greedy_step_kl=1e-4, tie_margin=1e-2),
    # fixtures: max |Δ| ≤ 0.17, mean KL ≤ 2.9e-4, max KL ≤ 1.1e-3, cosine ≥ 0.99998; broken as above
    "bf16": Thresholds(max_abs_logit=1.0, mean_kl=5e-3, image_cosine=0.999, image_prompt_kl=5e-2,
                       greedy_step_kl=5e-2, tie_margin=0.5),
}


def precision_class(reference_dtype: str, text_types: Sequence[str]) -> str:
    """``f32`` when the reference runs in float32 and every text matrix of the GGUF is F32, else ``bf16``."""
    return "f32" if reference_dtype == "f32" and set(text_types) <= {"F32"} else "bf16"


# --- the transformers side ------------------------------------------------------------------------------


def load_transformers(folder: Path, dtype: str = "f32") -> Any:
    """The checkpoint in transformers (Gemma3ForConditionalGeneration or the causal LM), eager attention, eval
    mode, at ``dtype`` (``f32`` or ``bf16``; never f16, where Gemma 3's activations overflow)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    if dtype not in REFERENCE_DTYPES:
        raise InputError(f"reference dtype {dtype!r} is not supported; use bf16 or f32 (f16 overflows in Gemma 3)")
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or [""])[0]
    cls = Gemma3ForConditionalGeneration if arch == "Gemma3ForConditionalGeneration" else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32 if dtype == "f32" else torch.bfloat16,
                                attn_implementation="eager")
    return model.eval()


def native_image(size: int, seed: int, width: int | None = None) -> Any:
    """A smooth, non-trivial RGB test image (PIL), ``size`` high and ``width`` (default ``size``) wide."""
    from PIL import Image

    width = width or size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:width] / size
    channels = [np.sin(2 * np.pi * (x * rng.uniform(1, 4) + y * rng.uniform(1, 4)) + rng.uniform(0, 6))
                for _ in range(3)]
    pixels = (np.stack(channels, axis=-1) * 0.5 + 0.5) * 200 + rng.uniform(0, 55, size=(size, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def config_of(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def image_size(folder: Path) -> int:
    return int(config_of(folder)["vision_config"]["image_size"])


def image_token_id(folder: Path) -> int:
    config = config_of(folder)
    return int(config.get("image_token_index", config.get("image_token_id", -1)))


def processor_image_sizes(processor: Any) -> list[tuple[int, int]]:
    """The (height, width) sizes the image processor feeds the vision tower (Gemma 3: one; pan-and-scan crops
    come at the same size)."""
    size = processor.image_processor.size
    get = size.get if isinstance(size, Mapping) else (lambda key, default=None: getattr(size, key, default))
    height, width = get("height"), get("width")
    if not height or not width:
        raise UserError("the checkpoint's image processor has no fixed height/width; check supports Gemma 3's")
    return [(int(height), int(width))]


def hf_inputs(folder_or_processor: Any, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The HF processor's (or, text-only, tokenizer's) tensors for ``messages`` with the generation prompt."""
    processor = folder_or_processor
    if isinstance(processor, str | Path):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(processor)
    return processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")


@dataclass(frozen=True)
class PixelNormalization:
    """How the image processor turns 8-bit pixels into the vision tower's input: ``(x * rescale - mean) / std``."""

    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, image_processor: Any) -> PixelNormalization:
        rescale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        mean = image_processor.image_mean if image_processor.do_normalize else (0.0, 0.0, 0.0)
        std = image_processor.image_std if image_processor.do_normalize else (1.0, 1.0, 1.0)
        return cls(rescale, tuple(float(m) for m in mean), tuple(float(v) for v in std))  # type: ignore[arg-type]

    def apply(self, pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        """uint8 [height, width, 3] to the processor's float32 [3, height, width]."""
        scaled = pixels.astype(np.float32) * np.float32(self.rescale)
        x = (scaled - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return x.astype(np.float32).transpose(2, 0, 1)


def hf_logits(model: Any, ids: Sequence[int], positions: Sequence[int] | NDArray[np.int64] | None = None
              ) -> NDArray[np.float32]:
    """float32 logits of ``ids`` (one forward pass): every position, or only ``positions`` (sorted)."""
    import torch

    kwargs: dict[str, Any] = {"input_ids": torch.tensor([list(ids)])}
    if positions is not None:
        kwargs["logits_to_keep"] = torch.tensor(list(positions), dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs).logits[0].float().numpy()


def hf_inputs_logits(model: Any, inputs: Mapping[str, Any], positions: Sequence[int] | NDArray[np.int64] | None = None
                     ) -> NDArray:
    """float32 logits of processor ``inputs`` (images in the model's dtype): every position or ``positions``."""
    import torch

    kwargs = dict(inputs)
    if "pixel_values" in kwargs:
        kwargs["pixel_values"] = kwargs["pixel_values"].to(model.dtype)
    if positions is not None:
        kwargs["logits_to_keep"] = torch.tensor(list(positions), dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs).logits[0].float().numpy()


def hf_image_features(model: Any, pixel_values: Any) -> NDArray[np.float32]:
    """The projected image embeddings transformers feeds the text model, float32 [image tokens, width]."""
    import torch

    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values.to(model.dtype))
    features = getattr(features, "pooler_output", features)
    features = features[0] if isinstance(features, list | tuple) else features
    return features.reshape(-1, features.shape[-1]).float().numpy()


def _token_types(ids: Any, inputs: Mapping[str, Any]) -> Any:
    import torch

    base = inputs.get("token_type_ids")
    if base is None:
        return torch.zeros_like(ids)
    return torch.cat([base, torch.zeros((1, ids.shape[1] - base.shape[1]), dtype=base.dtype)], dim=1)


def hf_greedy(model: Any, inputs: Mapping[str, Any], n_tokens: int) -> tuple[list[int], NDArray[np.float32]]:
    """The argmax continuation for ``n_tokens`` steps (end of turn ignored; each step a full forward pass, no
    cache) and the logits of each step."""
    import torch

    ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    if "pixel_values" in extra:
        extra["pixel_values"] = extra["pixel_values"].to(model.dtype)
    tokens, rows = [], []
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model(input_ids=ids, token_type_ids=_token_types(ids, inputs), **extra).logits[0, -1].float()
            rows.append(logits.numpy())
            tokens.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, np.stack(rows)


def hf_generate(model: Any, inputs: Mapping[str, Any], n_tokens: int) -> list[int]:
    """transformers ``generate``, greedy, stopping at the generation config's end ids (included)."""
    return hf_generate_with_logits(model, inputs, n_tokens)[0]


def hf_generate_with_logits(model: Any, inputs: Mapping[str, Any], n_tokens: int) -> tuple[list[int], NDArray]:
    """Greedy ``generate`` (end ids honoured and included) with the raw logits of every step [steps, vocab]."""
    import torch

    kwargs = dict(inputs)
    if "pixel_values" in kwargs:
        kwargs["pixel_values"] = kwargs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=n_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, top_p=None, top_k=None)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, np.stack([row[0].float().numpy() for row in out.logits])


# --- comparisons ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitFigures:
    """How far two sets of logit rows are apart."""

    n_positions: int
    max_abs: float
    mean_kl: float
    max_kl: float
    kl: NDArray[np.float64]


def logit_figures(reference: NDArray, ours: NDArray) -> LogitFigures:
    """max |Δlogit| and KL(reference ‖ ours) per row (``quant_eval.metrics.kl_divergence_full``)."""
    if reference.shape != ours.shape:
        raise ValueError(f"logit shapes differ: reference {reference.shape}, GGUF {ours.shape}")
    kl = kl_divergence_full(reference, ours)
    return LogitFigures(n_positions=int(reference.shape[0]), max_abs=float(np.abs(reference - ours).max()),
                        mean_kl=float(kl.mean()), max_kl=float(kl.max()), kl=kl)


def cosine_rows(a: NDArray, b: NDArray) -> NDArray[np.float64]:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def tokenizer_mismatches(hf_tokenizer: Any, tokenize: Callable[..., list[int]],
                         corpus: Sequence[str] = TOKENIZER_CORPUS) -> list[str]:
    """Where llama.cpp's tokenization differs from HF's: ``"<text> (special tokens added)"`` per difference.

    ``tokenize(text, add_special=False)`` is ``Engine.tokenize``.
    """
    wrong = []
    for text in corpus:
        if tokenize(text) != list(hf_tokenizer(text, add_special_tokens=False).input_ids):
            wrong.append(repr(text))
        if tokenize(text, add_special=True) != list(hf_tokenizer(text).input_ids):
            wrong.append(f"{text!r} (special tokens added)")
    return wrong


def split_markers(tokenize: Callable[[str], list[int]], markers: Sequence[str] = MARKERS) -> list[str]:
    """The markers llama.cpp does not parse as one token."""
    return [marker for marker in markers if len(tokenize(marker)) != 1]


@dataclass(frozen=True)
class GreedyFigures:
    """The runtime's greedy reply against the reference's: compared tokens, where they first differ, where the
    reference's first near-tie is (None: nowhere), and whether they agree up to it."""

    n_reference: int
    n_ours: int
    first_difference: int | None
    first_near_tie: int | None

    @property
    def agree(self) -> bool:
        if self.first_difference is None:
            return True
        return self.first_near_tie is not None and self.first_difference >= self.first_near_tie


def top_two_gaps(logits: NDArray) -> NDArray[np.float64]:
    """Per row, the gap between the largest and the second largest logit."""
    top = np.partition(np.asarray(logits, dtype=np.float64), -2, axis=-1)[..., -2:]
    return top[..., 1] - top[..., 0]


def greedy_figures(reference: Sequence[int], reference_logits: NDArray, ours: Sequence[int],
                   tie_margin: float) -> GreedyFigures:
    """Compare greedy replies token by token (``reference_logits[i]`` chose ``reference[i]``); a reply that
    ends earlier differs where the other goes on."""
    reference, ours = list(reference), list(ours)
    first = next((i for i, (a, b) in enumerate(zip(reference, ours, strict=False)) if a != b), None)
    if first is None and len(reference) != len(ours):
        first = min(len(reference), len(ours))
    ties = np.flatnonzero(top_two_gaps(reference_logits[: len(reference)]) < tie_margin)
    return GreedyFigures(n_reference=len(reference), n_ours=len(ours), first_difference=first,
                         first_near_tie=int(ties[0]) if ties.size else None)


# --- memory ---------------------------------------------------------------------------------------------


def checkpoint_parameters(folder: Path) -> int:
    """Number of parameters in a checkpoint folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights; pass a Hugging Face checkpoint folder or repo id")
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                total += int(np.prod(handle.get_slice(name).get_shape(), dtype=np.int64))
    return total


def reference_memory_bytes(folder: Path, dtype: str, n_positions: int, n_scored: int) -> int:
    """Memory the transformers reference needs: weights at ``dtype`` plus the activations of one forward pass
    over ``n_positions`` tokens (eager attention scores, MLP, the ``n_scored`` logit rows kept) and 512 MiB
    for the libraries."""
    config = config_of(folder)
    text = config.get("text_config", config)
    weights = checkpoint_parameters(folder) * (4 if dtype == "f32" else 2)
    act = 4 if dtype == "f32" else 2
    attention = int(text["num_attention_heads"]) * n_positions * n_positions * 4 * 3
    mlp = n_positions * int(text["intermediate_size"]) * act * 6
    logits = n_scored * int(text["vocab_size"]) * 4 * 3
    return weights + attention + mlp + logits + 512 * (1 << 20)


def check_memory(needed: int, available: int, what: str) -> None:
    """ResourceError naming what is needed when ``needed`` exceeds ``available`` bytes."""
    if needed > available:
        raise ResourceError(
            f"{what} needs about {needed / GIB:.1f} GiB but {available / GIB:.1f} GiB are available; run check on a "
            f"machine with at least {needed / GIB:.1f} GiB free, or raise {setting('check_memory')} if swap "
            "can hold the rest")


# --- the probe set ----------------------------------------------------------------------------------------


def text_probe_length(sliding_window: int | None) -> int:
    """Tokens of the text probe: ``MIN_TEXT_POSITIONS``, and at least twice the sliding window plus 64."""
    return max(MIN_TEXT_POSITIONS, 2 * int(sliding_window or 0) + 64)


def scored_positions(n_tokens: int, limit: int = MAX_SCORED_POSITIONS) -> NDArray[np.int64]:
    """Every position when there are at most ``limit``, else ``limit`` evenly spread ones (the last included)."""
    if n_tokens <= limit:
        return np.arange(n_tokens)
    return np.unique(np.linspace(0, n_tokens - 1, limit).round().astype(np.int64))


def text_probe_ids(tokenizer: Any, n_tokens: int) -> list[int]:
    """BOS, then the bundled held-out prose (repeated as needed) tokenized by the HF tokenizer: ``n_tokens`` ids."""
    from medgemma_gguf.quant_eval.slices import load_heldout_text

    prose = "\n\n".join(chunk.text for chunk in load_heldout_text())
    body = list(tokenizer(prose, add_special_tokens=False).input_ids)
    if not body:
        raise UserError("the tokenizer turned the held-out text into no tokens")
    bos = tokenizer.bos_token_id
    ids = [int(bos)] if bos is not None else []
    while len(ids) < n_tokens:
        ids.extend(int(t) for t in body[: n_tokens - len(ids)])
    return ids


def image_messages(image: Any) -> list[dict[str, Any]]:
    """The image probe's conversation (Google's chest X-ray example)."""
    return [{"role": "system", "content": [{"type": "text", "text": IMAGE_SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": IMAGE_QUESTION}, {"type": "image", "image": image}]}]


@dataclass
class ImageProbe:
    """One image prompt: what the reference computed for it."""

    label: str
    image: Any  # PIL image as given to both sides
    ids: list[int]
    text_positions: NDArray[np.int64]
    logits: NDArray[np.float32]  # at the text positions
    features: NDArray[np.float32]
    pixel_values: NDArray[np.float32]  # what the processor fed the vision tower, [3, height, width]


@dataclass
class ReferenceOutputs:
    """Everything the reference computed, kept while the GGUF runs (the reference itself is freed)."""

    dtype: str
    corpus_ids: list[tuple[list[int], list[int]]]  # per corpus text: ids without and with special tokens
    text_ids: list[int]
    text_positions: NDArray[np.int64]
    text_logits: NDArray[np.float32]
    chat_ids: list[int]
    greedy_tokens: list[int]
    greedy_logits: NDArray[np.float32]
    images: list[ImageProbe] = field(default_factory=list)
    image_token_id: int = -1
    sliding_window: int | None = None
    normalization: PixelNormalization | None = None


def compute_reference(folder: Path, model: Any, *, dtype: str, greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
                      echo: Callable[[str], None] = log.info) -> ReferenceOutputs:
    """Run the transformers reference ``model`` of checkpoint ``folder`` over the probe set."""
    from transformers import AutoProcessor, AutoTokenizer

    from medgemma_gguf.quant_eval.reference import text_positions

    config = config_of(folder)
    text_config = config.get("text_config", config)
    vision = "vision_config" in config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder) if vision else tokenizer
    corpus_ids = [(list(tokenizer(t, add_special_tokens=False).input_ids), list(tokenizer(t).input_ids))
                  for t in TOKENIZER_CORPUS]
    sliding = text_config.get("sliding_window")
    ids = text_probe_ids(tokenizer, text_probe_length(sliding))
    positions = scored_positions(len(ids))
    echo(f"reference: text logits over {len(ids)} tokens ({positions.size} positions compared)")
    text_logits = hf_logits(model, ids, positions if positions.size < len(ids) else None)
    echo(f"reference: greedy reply (up to {greedy_tokens} tokens)")
    inputs = hf_inputs(processor, GREEDY_MESSAGES)
    tokens, steps = hf_generate_with_logits(model, inputs, greedy_tokens)
    out = ReferenceOutputs(dtype=dtype, corpus_ids=corpus_ids, text_ids=ids, text_positions=positions,
                           text_logits=text_logits, chat_ids=inputs["input_ids"][0].tolist(), greedy_tokens=tokens,
                           greedy_logits=steps, sliding_window=sliding)
    if vision:
        out.image_token_id = image_token_id(folder)
        out.normalization = PixelNormalization.of(processor.image_processor)
        for height, width in processor_image_sizes(processor):
            for label, image in ((f"{width}x{height} image", native_image(height, 3, width)),
                                 (f"{width * 3 // 2}x{height} image, resized",
                                  native_image(height, 5, width * 3 // 2))):
                echo(f"reference: image prompt ({label})")
                messages = image_messages(image)
                inputs = hf_inputs(processor, messages)
                prompt_ids = inputs["input_ids"][0].tolist()
                where = [i for i, t in enumerate(prompt_ids) if t == out.image_token_id]
                if not where or where != list(range(where[0], where[-1] + 1)):
                    raise UserError(f"the processor of {folder} did not lay out one image block")
                keep = text_positions(len(prompt_ids), (where[0], where[-1] + 1))
                out.images.append(ImageProbe(label=label, image=image, ids=prompt_ids, text_positions=keep,
                                             logits=hf_inputs_logits(model, inputs, keep),
                                             features=hf_image_features(model, inputs["pixel_values"]),
                                             pixel_values=inputs["pixel_values"][0].float().numpy()))
    return out


# --- results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """One line of the check: what was compared, the figure, the threshold, pass or fail."""

    probe: str
    metric: str
    figure: str
    threshold: str
    passed: bool
    value: float | None = None
    limit: float | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"probe": self.probe, "metric": self.metric, "figure": self.figure, "threshold": self.threshold,
                "passed": self.passed, "value": self.value, "limit": self.limit, "detail": self.detail}


def _g(value: float) -> str:
    return f"{value:.3g}"


def _at_most(probe: str, metric: str, value: float, limit: float, detail: str = "") -> ProbeResult:
    return ProbeResult(probe, metric, _g(value), f"≤ {_g(limit)}", bool(value <= limit), float(value), limit, detail)


def compare_to_reference(reference: ReferenceOutputs, chat_model: Any, thresholds: Thresholds,
                         echo: Callable[[str], None] = log.info) -> list[ProbeResult]:
    """Run the GGUF (``runtime.chat.ChatModel``) over the probe set and compare it with ``reference``."""
    from medgemma_gguf.runtime.engine import ImagePart
    from medgemma_gguf.runtime.prompt import PromptImage

    engine = chat_model.engine
    results: list[ProbeResult] = []
    # tokenizer
    wrong = []
    for text, (plain, special) in zip(TOKENIZER_CORPUS, reference.corpus_ids, strict=True):
        if engine.tokenize(text) != plain:
            wrong.append(repr(text))
        if engine.tokenize(text, add_special=True) != special:
            wrong.append(f"{text!r} with special tokens")
    n_ways = 2 * len(TOKENIZER_CORPUS)
    results.append(ProbeResult("tokenizer corpus", "texts tokenized identically", f"{n_ways - len(wrong)}/{n_ways}",
                               "all", not wrong, detail="differs: " + "; ".join(wrong[:3]) if wrong else ""))
    split = split_markers(engine.tokenize)
    results.append(ProbeResult("tokenizer markers", "markers parsed as one token",
                               f"{len(MARKERS) - len(split)}/{len(MARKERS)}", "all", not split,
                               detail="split: " + ", ".join(split) if split else ""))
    prompt = chat_model.prompt(list(GREEDY_MESSAGES))
    ours_chat = prompt.flat_ids(-1)
    results.append(ProbeResult("chat prompt", "ids equal the HF chat template's",
                               "identical" if ours_chat == reference.chat_ids else
                               f"{len(ours_chat)} vs {len(reference.chat_ids)} ids", "identical",
                               ours_chat == reference.chat_ids))
    # text logits
    echo(f"GGUF: text logits over {len(reference.text_ids)} tokens")
    chat_model.reset()
    rows: list[NDArray[np.float32]] = []
    wanted = set(reference.text_positions.tolist())
    for start in range(0, len(reference.text_ids), engine.n_batch):
        chunk = reference.text_ids[start : start + engine.n_batch]
        logits = engine.eval_tokens(chunk, logits="all")
        rows.extend(logits[i] for i in range(len(chunk)) if start + i in wanted)
    chat_model.reset()
    figures = logit_figures(reference.text_logits, np.stack(rows))
    probe = f"text logits ({figures.n_positions} positions of {len(reference.text_ids)})"
    results.append(_at_most(probe, "max |Δlogit|", figures.max_abs, thresholds.max_abs_logit))
    results.append(_at_most(probe, "mean KL", figures.mean_kl, thresholds.mean_kl,
                            detail=f"max KL {_g(figures.max_kl)}"))
    # images
    for image in reference.images:
        echo(f"GGUF: image prompt ({image.label})")
        image_prompt = chat_model.prompt(image_messages(image.image))
        ours_ids = image_prompt.flat_ids(reference.image_token_id)
        same = ours_ids == image.ids
        results.append(ProbeResult(image.label, "prompt ids equal the HF processor's",
                                   "identical" if same else f"{len(ours_ids)} vs {len(image.ids)} ids",
                                   "identical", same))
        pixels = next(p.pixels for p in image_prompt.parts if isinstance(p, PromptImage))
        if reference.normalization is not None:
            ours_pixels = reference.normalization.apply(pixels)
            if ours_pixels.shape != image.pixel_values.shape:
                results.append(ProbeResult(image.label, "pixels the vision tower sees", f"shape {ours_pixels.shape}",
                                           f"shape {image.pixel_values.shape}", False))
            else:
                step = reference.normalization.rescale / min(reference.normalization.std)
                results.append(_at_most(image.label, "max |Δpixel| of the normalized image",
                                        float(np.abs(ours_pixels - image.pixel_values).max()), step / 2,
                                        detail="the runtime resizes the image differently from the HF processor"))
        features = engine.encode_image(ImagePart(pixels))
        if features.shape != image.features.shape:
            results.append(ProbeResult(image.label, "image embeddings", f"shape {features.shape}",
                                       f"shape {image.features.shape}", False))
        else:
            cosine = float(cosine_rows(features, image.features).min())
            results.append(ProbeResult(image.label, "min cosine of image embeddings", f"{cosine:.6f}",
                                       f"≥ {thresholds.image_cosine:g}", cosine >= thresholds.image_cosine,
                                       cosine, thresholds.image_cosine))
        if same:
            chat_model.reset()
            parts = [ImagePart(p.pixels) if isinstance(p, PromptImage) else list(p) for p in image_prompt.parts]
            ours = engine.eval_parts(parts, logits="all")
            chat_model.reset()
            figures = logit_figures(image.logits, ours)
            after = image.text_positions > image.ids.index(reference.image_token_id)
            results.append(_at_most(image.label, f"max next-token KL after the image ({int(after.sum())} positions)",
                                    float(figures.kl[after].max()), thresholds.image_prompt_kl,
                                    detail=f"before the image: max KL {_g(float(figures.kl[~after].max()))}; "
                                           f"max |Δlogit| {_g(figures.max_abs)}"))
    # greedy reply
    echo("GGUF: greedy reply")
    chat_model.reset()
    n_tokens = len(reference.greedy_logits)
    reply = chat_model.chat(list(GREEDY_MESSAGES), max_tokens=n_tokens)
    ref_tokens = [t for t in reference.greedy_tokens]
    end = next((i for i, t in enumerate(ref_tokens) if engine.is_end_of_generation(t)), len(ref_tokens))
    figures_greedy = greedy_figures(ref_tokens[:end], reference.greedy_logits, reply.token_ids, thresholds.tie_margin)
    where = ("equal" if figures_greedy.first_difference is None
             else f"differ at token {figures_greedy.first_difference}")
    tie = ("no near-tie" if figures_greedy.first_near_tie is None
           else f"first near-tie at token {figures_greedy.first_near_tie}")
    results.append(ProbeResult(f"greedy reply ({figures_greedy.n_reference} reference tokens)",
                               "tokens equal up to the first near-tie", f"{where}; {tie}",
                               f"equal before a near-tie (top-two gap < {thresholds.tie_margin:g})",
                               figures_greedy.agree))
    chat_model.reset()
    steps = [chat_model.next_token_logits(prompt)]
    forced = ref_tokens[: n_tokens - 1]
    if forced:
        steps.extend(engine.eval_tokens(forced, logits="all"))
    chat_model.reset()
    figures = logit_figures(reference.greedy_logits, np.stack(steps))
    results.append(_at_most(f"greedy reply ({n_tokens} steps)", "max KL along the reference's reply",
                            figures.max_kl, thresholds.greedy_step_kl))
    return results
