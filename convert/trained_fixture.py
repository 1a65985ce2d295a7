"""A small Gemma 3 image+text model briefly *trained* on CPU, written in the published MedGemma layout.

Random weights quantize unlike real ones: their rows have no outliers and their activations no structure,
so per-tensor sensitivity measured on them says little.  This fixture trains the ``mm-k256`` shape of
``convert.tiny_checkpoint`` (text widths 256 / 768, 6 layers with the 5:1 sliding pattern, a 2-layer
SigLIP tower and the projector) with AdamW on next-token prediction over:

* the bundled ``tiny_corpus.txt`` plus ``trained_fixture_data/extra_corpus.txt``;
* clinical sentences generated from templates (vital signs, lab values, drug doses) by a seeded RNG;
* captions of synthetic images (a coloured shape at a position on a coloured background), in the Gemma 3
  chat format the HF processor produces, with image tokens attended bidirectionally as in training.

It is deterministic for a given machine: fixed seeds, ``torch.use_deterministic_algorithms``, two
threads, no data-order randomness outside the seeded generators.  Bit-identical files across CPUs with
different vector units are not promised (float reductions may differ), so compare hashes on one machine.

The tokenizer, configs and file writing are ``convert.tiny_checkpoint``'s, so the output is laid out
exactly like its ``mm-k256`` variant (sharded bf16 safetensors under the published tensor names), plus
``trained_fixture.json`` recording the steps, seed and loss curve.

Run ``python -m convert.trained_fixture OUTDIR [--steps N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.tiny_checkpoint import (
    BOS_ID,
    END_OF_IMAGE_ID,
    END_OF_TURN_ID,
    EOS_ID,
    IMAGE_SOFT_TOKEN_ID,
    PAD_ID,
    START_OF_IMAGE_ID,
    START_OF_TURN_ID,
    VARIANTS,
    _generation_config,
    _json_bytes,
    _preprocessor_config,
    _processor_config,
    _sentencepiece_model,
    _transformers_model,
    _write_shards,
    _write_tokenizer_files,
    published_config,
    published_name,
)
from medgemma_gguf.atomic import atomic_directory
from medgemma_gguf.errors import UserError

SPEC = VARIANTS["mm-k256"]
DATA_DIR = Path(__file__).with_name("trained_fixture_data")
CORPUS_FILES = (Path(__file__).with_name("tiny_corpus.txt"), DATA_DIR / "extra_corpus.txt")
LOG_NAME = "trained_fixture.json"

DEFAULT_STEPS = 300
TEXT_BATCH = 8
TEXT_LENGTH = 128
IMAGE_BATCH = 4
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
WEIGHT_DECAY = 0.01
THREADS = 2


@dataclass(frozen=True)
class TrainingResult:
    """Where the checkpoint went and how training went."""

    path: Path
    steps: int
    seed: int
    losses: tuple[float, ...]  # training loss (text + image caption) per step
    seconds: float


# --- data -----------------------------------------------------------------------------------------------
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "cross", "ring")
PLACES = {"upper left": (0.3, 0.3), "upper right": (0.3, 0.7), "lower left": (0.7, 0.3),
          "lower right": (0.7, 0.7), "center": (0.5, 0.5)}
QUESTIONS = ("Describe the image.", "What is in this image?", "What do you see?")


def _template_sentence(rng: random.Random) -> str:
    """One clinical sentence with random numbers: numbers, units and their ranges give learnable structure."""
    age = rng.randint(18, 92)
    who = rng.choice(("man", "woman"))
    templates = (
        lambda: f"A {age}-year-old {who} has a blood pressure of {rng.randint(90, 190)}/{rng.randint(50, 110)} "
                f"mmHg and a heart rate of {rng.randint(45, 140)} beats per minute.",
        lambda: f"Temperature {rng.randint(355, 405) / 10:.1f} C, respiratory rate {rng.randint(10, 34)}, "
                f"oxygen saturation {rng.randint(82, 100)}% on room air.",
        lambda: f"Hemoglobin is {rng.randint(60, 170) / 10:.1f} g/dL, white cell count {rng.randint(20, 250) / 10:.1f}"
                f" x10^9/L and platelets {rng.randint(40, 450)} x10^9/L.",
        lambda: f"Sodium {rng.randint(120, 155)} mmol/L, potassium {rng.randint(28, 65) / 10:.1f} mmol/L, "
                f"creatinine {rng.randint(40, 400)} umol/L.",
        lambda: f"Give {rng.choice(('amoxicillin', 'ceftriaxone', 'paracetamol', 'metformin', 'furosemide'))} "
                f"{rng.choice((250, 500, 1000, 20, 40))} mg {rng.choice(('once', 'twice', 'three times'))} daily "
                f"for {rng.randint(3, 14)} days.",
        lambda: f"The {age}-year-old {who} reports {rng.choice(('cough', 'fever', 'headache', 'chest pain'))} "
                f"for {rng.randint(1, 10)} days and {rng.choice(('no', 'mild', 'severe'))} shortness of breath.",
    )
    return rng.choice(templates)()


def _corpus_lines() -> list[str]:
    lines: list[str] = []
    for path in CORPUS_FILES:
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines


def synthetic_image(rng: random.Random, size: int) -> tuple[Any, str]:
    """A ``size``² RGB uint8 image of one coloured shape and its caption."""
    import numpy as np

    background, color = rng.sample(sorted(COLORS), 2)
    shape = rng.choice(SHAPES)
    place = rng.choice(sorted(PLACES))
    big = rng.random() < 0.5
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = COLORS[background]
    cy, cx = (c * size for c in PLACES[place])
    radius = size * (0.18 if big else 0.1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    distance = np.sqrt(dy * dy + dx * dx)
    mask = {"circle": distance <= radius, "square": np.maximum(dy, dx) <= radius,
            "cross": (np.minimum(dy, dx) <= radius / 4) & (np.maximum(dy, dx) <= radius),
            "ring": (distance <= radius) & (distance >= radius * 0.6)}[shape]
    image[mask] = COLORS[color]
    caption = f"A {'large' if big else 'small'} {color} {shape} in the {place} of a {background} image."
    return image, caption


class Batches:
    """Seeded text windows and image-caption examples as token tensors."""

    def __init__(self, seed: int):
        import sentencepiece as spm

        self.rng = random.Random(seed)
        self.sp = spm.SentencePieceProcessor(model_proto=_sentencepiece_model())
        corpus = self._encode_lines(_corpus_lines())
        self.corpus = corpus
        assert SPEC.vision is not None
        self.vision = SPEC.vision

    def _encode_lines(self, lines: list[str]) -> list[int]:
        ids: list[int] = []
        for line in lines:
            ids += self.sp.encode(line + "\n")
        return ids

    def text(self, batch: int, length: int) -> Any:
        """``batch`` rows of ``length`` ids: BOS, then corpus windows and template sentences mixed."""
        import torch

        rows = []
        for _ in range(batch):
            row = [BOS_ID]
            while len(row) < length:
                if self.rng.random() < 0.5:
                    start = self.rng.randrange(len(self.corpus) - 32)
                    row += self.corpus[start:start + self.rng.randint(16, 64)]
                else:
                    row += self.sp.encode(_template_sentence(self.rng) + "\n")
            rows.append(row[:length])
        return torch.tensor(rows, dtype=torch.long)

    def images(self, batch: int) -> tuple[Any, Any, Any, Any]:
        """Input ids, labels (caption only), token types (1 = image) and pixel values for captioned images."""
        import numpy as np
        import torch

        n_image = self.vision.mm_tokens_per_image
        rows, label_rows, pixels = [], [], []
        for _ in range(batch):
            image, caption = synthetic_image(self.rng, self.vision.image_size)
            pixels.append((image.astype(np.float32) / 255.0 - 0.5) / 0.5)
            prompt = ([BOS_ID, START_OF_TURN_ID] + self.sp.encode("user\n\n\n") + [START_OF_IMAGE_ID]
                      + [IMAGE_SOFT_TOKEN_ID] * n_image + [END_OF_IMAGE_ID] + self.sp.encode("\n\n")
                      + self.sp.encode(self.rng.choice(QUESTIONS)) + [END_OF_TURN_ID] + self.sp.encode("\n")
                      + [START_OF_TURN_ID] + self.sp.encode("model\n"))
            answer = self.sp.encode(caption) + [END_OF_TURN_ID, EOS_ID]
            rows.append(prompt + answer)
            label_rows.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))
        ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(label_row)] = torch.tensor(label_row)
        token_types = (ids == IMAGE_SOFT_TOKEN_ID).long()
        pixel_values = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        return ids, labels, token_types, pixel_values


# --- training -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seeded, deterministic, two-thread torch; the caller's settings are restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(THREADS)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)


def _next_token_loss(logits: Any, labels: Any) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def _learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: Any, steps: int, seed: int, report: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps; the loss of each step."""
    import torch

    batches = Batches(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=(0.9, 0.95))
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        text_ids = batches.text(TEXT_BATCH, TEXT_LENGTH)
        text_loss = _next_token_loss(model(input_ids=text_ids).logits, text_ids)
        ids, labels, token_types, pixel_values = batches.images(IMAGE_BATCH)
        image_logits = model(input_ids=ids, pixel_values=pixel_values, token_type_ids=token_types,
                             attention_mask=(ids != PAD_ID).long()).logits
        loss = text_loss + _next_token_loss(image_logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(float(loss.detach()), 6))
        if report is not None:
            report(step, losses[-1])
    model.eval()
    return losses


def _published_trained_weights(model: Any) -> dict[str, Any]:
    import torch

    weights = {}
    for module_name, tensor in model.state_dict().items():
        name = published_name(module_name, multimodal=True)
        if name is not None:
            weights[name] = tensor.detach().to(torch.bfloat16).contiguous()
    return weights


def _write_checkpoint(folder: Path, model: Any, config: dict[str, Any], log: dict[str, Any]) -> None:
    assert SPEC.vision is not None
    _write_shards(folder, _published_trained_weights(model))
    (folder / "config.json").write_bytes(_json_bytes(config))
    (folder / "generation_config.json").write_bytes(_json_bytes(_generation_config()))
    _write_tokenizer_files(folder, multimodal=True)
    (folder / "preprocessor_config.json").write_bytes(_json_bytes(_preprocessor_config(SPEC.vision)))
    (folder / "processor_config.json").write_bytes(_json_bytes(_processor_config(SPEC.vision)))
    (folder / LOG_NAME).write_bytes(_json_bytes(log))


def _check_args(outdir: Path, steps: int, seed: int) -> None:
    for label, value, low in (("steps", steps, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{label} must be a whole number of at least {low}, got {value!r}")


def build_trained_fixture(outdir: Path | str, steps: int = DEFAULT_STEPS, seed: int = 0,
                          report: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Train the fixture for ``steps`` steps and write it to ``outdir`` (new or empty; complete or absent)."""
    outdir = Path(outdir)
    _check_args(outdir, steps, seed)
    started = time.monotonic()
    with atomic_directory(outdir) as partial, _deterministic_torch(seed):
        config = published_config(SPEC)
        model = _transformers_model(SPEC, config).float()  # the config says bf16; train in float32
        model.tie_weights()
        losses = train(model, steps, seed, report)
        log = {"base_variant": SPEC.name, "steps": steps, "seed": seed, "text_batch": [TEXT_BATCH, TEXT_LENGTH],
               "image_batch": IMAGE_BATCH, "learning_rate": LEARNING_RATE, "losses": losses}
        _write_checkpoint(partial, model, config, log)
    return TrainingResult(outdir, steps, seed, tuple(losses), time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.trained_fixture", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="new or empty folder for the checkpoint")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"AdamW steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def report(step: int, loss: float) -> None:
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:.4f}", file=sys.stderr, flush=True)

    try:
        result = build_trained_fixture(args.outdir, args.steps, args.seed, report)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.path} in {result.seconds:.0f} s; loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
