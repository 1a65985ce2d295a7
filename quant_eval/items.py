"""Evaluation items: one closed question with its options, answer and optional image (file bytes, a file,
or a synthetic image drawn here from a few parameters, so a slice needs no image files), or a free-text
question (no options; scored by KL only, along its reference answer when it has one)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgemma_gguf.errors import UserError

SYNTHETIC_SIZE = 256


@dataclass(frozen=True)
class ImageRef:
    """An item's image: encoded bytes, a file, or the parameters of a synthetic image."""

    data: bytes | None = None
    path: str | None = None
    synthetic: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.data, self.path, self.synthetic)]
        if sum(given) != 1:
            raise ValueError("ImageRef needs exactly one of data, path, synthetic")

    def load(self) -> Image.Image:
        """The image as an RGB PIL image. DICOM (``.dcm``/``.dicom``, or the ``DICM`` marker) is read by the
        runtime's loader (``runtime.images.load_image``: rescale, the file's window, MONOCHROME1), as chat
        reads it; other files by Pillow."""
        if self.synthetic is not None:
            return render_synthetic(self.synthetic).convert("RGB")
        try:
            raw = self.data if self.data is not None else Path(self.path).read_bytes()  # type: ignore[arg-type]
            if self.is_dicom(raw):
                from medgemma_gguf.runtime.images import load_image

                return load_image(self.path if self.path is not None else raw)
            with Image.open(io.BytesIO(raw)) as image:
                return image.convert("RGB")
        except OSError as exc:
            where = self.path or "embedded image bytes"
            raise UserError(f"cannot read image {where}: {exc}; check the dataset files") from exc

    def is_dicom(self, raw: bytes) -> bool:
        """Whether the image is a DICOM file (by suffix or by the ``DICM`` marker at byte 128)."""
        from medgemma_gguf.runtime.images import DICOM_SUFFIXES

        return raw[128:132] == b"DICM" or (self.path is not None and Path(self.path).suffix.lower() in DICOM_SUFFIXES)

    def encoded_bytes(self) -> bytes:
        """The image file's bytes (PNG for a synthetic image)."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            return Path(self.path).read_bytes()
        buffer = io.BytesIO()
        render_synthetic(self.synthetic or {}).save(buffer, format="PNG")
        return buffer.getvalue()

    def digest(self) -> str:
        """sha256 of the image content: the file bytes, or a synthetic image's raw pixels."""
        if self.synthetic is not None:
            image = render_synthetic(self.synthetic)
            header = f"{image.mode}:{image.width}x{image.height}:".encode()
            return hashlib.sha256(header + image.tobytes()).hexdigest()
        return hashlib.sha256(self.encoded_bytes()).hexdigest()


@dataclass(frozen=True)
class Item:
    """One closed question (``options[answer_index]`` is the right answer), or a free-text question: no
    options, ``answer_index`` -1, and an optional ``reference_answer`` whose tokens are scored by KL."""

    id: str
    question: str
    options: list[str]
    answer_index: int
    image: ImageRef | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    reference_answer: str | None = None

    @property
    def free_text(self) -> bool:
        return not self.options

    @property
    def answer(self) -> str:
        if self.free_text:
            return self.reference_answer or ""
        return self.options[self.answer_index]


def render_synthetic(params: dict[str, Any]) -> Image.Image:
    """Draw a grayscale 'radiograph-like' test image from generator parameters.

    Pure integer/float numpy arithmetic (no random generator), so the pixels are the same everywhere.
    ``params["kind"]`` is one of:

    * ``opacity``: a bright disc centred in the ``side`` ("left"/"right") half; ``radius``.
    * ``tube``: a thin bright vertical line at column ``x`` when ``present`` is true.
    * ``spots``: ``count`` bright discs at fixed, well-separated positions; ``radius``.
    * ``darker``: the ``side`` half is darker than the other by ``contrast`` grey levels.

    Every kind takes ``seed`` (texture of the background) and optional ``size`` (default 256).
    """
    kind = params.get("kind")
    size = int(params.get("size", SYNTHETIC_SIZE))
    seed = int(params.get("seed", 0))
    canvas = _background(size, seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "opacity":
        centre_col = size * (0.25 if params["side"] == "left" else 0.75)
        centre_row = size * float(params.get("row", 0.5))
        _add_disc(canvas, rows, cols, centre_row, centre_col, float(params["radius"]), 110.0)
    elif kind == "tube":
        if params["present"]:
            x = int(params["x"])
            canvas[size // 12 : size - size // 12, x - 1 : x + 2] += 120.0
    elif kind == "spots":
        count = int(params["count"])
        if not 1 <= count <= len(_SPOT_POSITIONS):
            raise UserError(f"synthetic spots count {count} out of range 1..{len(_SPOT_POSITIONS)}")
        for row_frac, col_frac in _SPOT_POSITIONS[:count]:
            _add_disc(canvas, rows, cols, size * row_frac, size * col_frac, float(params["radius"]), 120.0)
    elif kind == "darker":
        half = slice(0, size // 2) if params["side"] == "left" else slice(size // 2, size)
        canvas[:, half] -= float(params.get("contrast", 45))
    else:
        raise UserError(f"unknown synthetic image kind {kind!r}; use opacity, tube, spots or darker")
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="L")


# Spot centres (row, col) as fractions of the size: far apart so each stays a separate blob.
_SPOT_POSITIONS: tuple[tuple[float, float], ...] = ((0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3), (0.5, 0.5))


def _background(size: int, seed: int) -> np.ndarray:
    """Mid-grey field, brighter towards the middle rows (like a chest), with hash-based grain."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.int64)
    grain = ((rows * 73856093) ^ (cols * 19349663) ^ (seed * 83492791 + 1)) % 17 - 8
    vertical = 60.0 + 25.0 * np.sin(np.pi * rows / max(size - 1, 1))
    return vertical + grain.astype(np.float64)


def _add_disc(canvas: np.ndarray, rows: np.ndarray, cols: np.ndarray, r0: float, c0: float, radius: float,
              brightness: float) -> None:
    """Add a disc with a softened edge (1-pixel ramp) to ``canvas`` in place."""
    distance = np.hypot(rows - r0, cols - c0)
    weight = np.clip(radius + 0.5 - distance, 0.0, 1.0)
    canvas += brightness * weight


def synthetic_answer(params: dict[str, Any]) -> str:
    """The right answer a synthetic image's parameters imply for the question named by ``params["asks"]``.

    ``asks`` is ``side`` (where the opacity is), ``present_left``/``present_right`` (is the opacity in that
    half: yes/no), ``present`` (is there a tube: yes/no), ``count`` (number of spots) or ``darker_side``.
    """
    asks = params.get("asks")
    kind = params.get("kind")
    if kind == "opacity" and asks == "side":
        return str(params["side"])
    if kind == "opacity" and asks in ("present_left", "present_right"):
        return "yes" if asks == f"present_{params['side']}" else "no"
    if kind == "tube" and asks == "present":
        return "yes" if params["present"] else "no"
    if kind == "spots" and asks == "count":
        return str(int(params["count"]))
    if kind == "darker" and asks == "darker_side":
        return str(params["side"])
    raise UserError(f"synthetic image kind {kind!r} cannot answer {asks!r}; see synthetic_answer for the pairs")


def mean_by_half(image: Image.Image) -> tuple[float, float]:
    """Mean grey level of the left and right halves (a pixel-level check used by tests and reports)."""
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    middle = pixels.shape[1] // 2
    return float(pixels[:, :middle].mean()), float(pixels[:, middle:].mean())
