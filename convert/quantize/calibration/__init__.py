"""The bundled calibration set for importance matrices: Gemma chat conversations, some with images.

Each line of the JSONL file is one item: ``{"id", "kind", "messages"}`` where ``messages`` is a chat in
the Hugging Face format (``role`` system/user/assistant, ``content`` a list of ``{"type": "text",
"text"}`` and ``{"type": "image", "synthetic": {...}}`` entries). Images are never stored: each image
entry holds the parameters of a deterministic generator (``chest_radiograph``, ``histology``,
``skin_lesion``) that draws it at the model's native image size, so no resampling happens anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_gguf.errors import UserError

DEFAULT_PATH = Path(__file__).with_name("medgemma_calibration_v1.jsonl")
DEFAULT_NAME = "medgemma-gguf-calibration-v1"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class CalibrationItem:
    """One conversation of the calibration set."""

    id: str
    kind: str
    messages: list[dict[str, Any]]

    @property
    def image_specs(self) -> list[dict[str, Any]]:
        """The generator parameters of this item's images, in prompt order."""
        return [part["synthetic"] for message in self.messages for part in message["content"]
                if part["type"] == "image"]


@dataclass(frozen=True)
class CalibrationSet:
    """A loaded calibration file: its items, name and the sha256 of its bytes."""

    name: str
    path: Path
    items: list[CalibrationItem]
    sha256: str

    @property
    def image_items(self) -> int:
        return sum(1 for item in self.items if item.image_specs)

    @property
    def images(self) -> int:
        return sum(len(item.image_specs) for item in self.items)


def _check_item(data: Any, where: str) -> CalibrationItem:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not isinstance(data.get("messages"), list):
        raise UserError(f"{where}: each line must be a JSON object with 'id' and 'messages'; fix the calibration file")
    if not data["messages"]:
        raise UserError(f"{where}: item {data['id']!r} has no messages; fix the calibration file")
    for message in data["messages"]:
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), list):
            raise UserError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a content list; "
                            "fix the calibration file")
        for part in message["content"]:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image" and isinstance(part.get("synthetic"), dict) \
                    and part["synthetic"].get("generator") in GENERATORS:
                continue
            raise UserError(f"{where}: item {data['id']!r} has a content part that is neither text nor a synthetic "
                            f"image with a known generator ({', '.join(GENERATORS)}); fix the calibration file")
    return CalibrationItem(id=data["id"], kind=str(data.get("kind", "")), messages=data["messages"])


def load_calibration(path: Path | str | None = None) -> CalibrationSet:
    """Load and validate a calibration JSONL file (default: the bundled set)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read calibration file {path}: {exc.strerror}; check the path") from exc
    items = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); fix the calibration file") from exc
        items.append(_check_item(data, f"{path}:{number}"))
    if not items:
        raise UserError(f"calibration file {path} has no items; pass a JSONL file with one conversation per line")
    name = DEFAULT_NAME if path == DEFAULT_PATH else path.stem
    return CalibrationSet(name=name, path=path, items=items, sha256=hashlib.sha256(raw).hexdigest())


# --- synthetic images -------------------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return (x + 0.5) / size, (y + 0.5) / size


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, soft: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth edge of relative width ``soft``."""
    distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - distance) / soft + 0.5, 0.0, 1.0)


def _segment_distance(x: np.ndarray, y: np.ndarray, line: dict[str, float]) -> np.ndarray:
    x0, y0, x1, y1 = line["x0"], line["y0"], line["x1"], line["y1"]
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def chest_radiograph(spec: dict[str, Any], size: int) -> np.ndarray:
    """A frontal chest-film-like grayscale picture: body, lung fields, ribs, heart, opacities, lines."""
    rng = np.random.default_rng(int(spec["seed"]))
    x, y = _grid(size)
    image = 0.08 + 0.40 * _ellipse(x, y, 0.5, 0.58, 0.47, 0.52, 0.15)
    lungs = _ellipse(x, y, 0.31, 0.50, 0.15, 0.33, 0.2) + _ellipse(x, y, 0.69, 0.50, 0.15, 0.33, 0.2)
    pneumothorax = spec.get("pneumothorax_side")
    if pneumothorax:  # a lucent, markings-free rim at the apex of one lung
        cx = 0.31 if pneumothorax == "right" else 0.69  # radiographic convention: patient's right on the left
        rim = _ellipse(x, y, cx, 0.45, 0.15, 0.30, 0.2) - _ellipse(x, y, cx, 0.50, 0.11, 0.26, 0.2)
        lungs = lungs + 0.6 * np.clip(rim, 0, 1) * (y < 0.5)
    image -= 0.28 * np.clip(lungs, 0, 1.3)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (y * 9.0 + 1.6 * np.abs(x - 0.5)) + rng.uniform(0, 2 * np.pi))
    image += 0.07 * ribs * np.clip(lungs, 0, 1)
    heart_width = float(spec.get("heart_width", 0.44))
    image += 0.33 * _ellipse(x, y, 0.54, 0.66, heart_width / 2, 0.17, 0.3)
    image += 0.25 * _ellipse(x, y, 0.5, 0.35, 0.06, 0.30, 0.3)  # mediastinum and spine
    for opacity in spec.get("opacities", []):
        radius = opacity["radius"]
        blob = np.exp(-(((x - opacity["x"]) ** 2 + (y - opacity["y"]) ** 2) / (2 * radius**2)))
        image += opacity["strength"] * blob
    effusion = spec.get("effusion_side")
    if effusion:  # dependent opacity with a meniscus
        cx = 0.69 if effusion == "left" else 0.31
        meniscus = 0.72 + 0.05 * np.abs(x - cx) / 0.15
        image += 0.35 * (y > meniscus) * _ellipse(x, y, cx, 0.6, 0.17, 0.4, 0.2)
    for line in spec.get("lines", []):
        distance = _segment_distance(x, y, line)
        image += line["strength"] * np.clip(1.0 - distance / line["width"], 0.0, 1.0)
    image += float(spec.get("exposure_gradient", 0.0)) * (x - 0.5)
    image += float(spec.get("noise", 0.0)) * rng.standard_normal(image.shape)
    gray = np.clip(image, 0.0, 1.0) * 255.0
    return np.repeat(gray[..., None], 3, axis=2).round().astype(np.uint8)


def histology(spec: dict[str, Any], size: int) -> np.ndarray:
    """An H&E-like tile: pink stroma, pale glands, and purple nuclei at random places and sizes."""
    rng = np.random.default_rng(int(spec["seed"]))
    x, y = _grid(size)
    texture = 0.5 + 0.5 * np.sin(2 * np.pi * (x * rng.uniform(3, 7) + y * rng.uniform(3, 7)))
    stain = np.stack([0.93 - 0.05 * texture, 0.70 - 0.08 * texture, 0.80 - 0.04 * texture], axis=-1)
    for _ in range(int(spec.get("glands", 0))):
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        gland = _ellipse(x, y, cx, cy, rng.uniform(0.08, 0.16), rng.uniform(0.06, 0.12), 0.3)
        stain = stain * (1 - gland[..., None]) + np.array([0.97, 0.93, 0.95]) * gland[..., None]
    radius = float(spec["nucleus_radius"])
    for _ in range(int(spec["nuclei"])):
        cx, cy = rng.uniform(0, 1, size=2)
        r = radius * rng.uniform(0.7, 1.4)
        nucleus = _ellipse(x, y, cx, cy, r, r * rng.uniform(0.7, 1.0), 0.4)
        color = np.array([0.33, 0.18, 0.52]) * rng.uniform(0.8, 1.1)
        stain = stain * (1 - nucleus[..., None]) + color * nucleus[..., None]
    stain += 0.02 * rng.standard_normal(stain.shape)
    return (np.clip(stain, 0, 1) * 255).round().astype(np.uint8)


def skin_lesion(spec: dict[str, Any], size: int) -> np.ndarray:
    """A dermoscopy-like picture: skin tone with a pigmented lesion whose border is made irregular."""
    rng = np.random.default_rng(int(spec["seed"]))
    x, y = _grid(size)
    angle = np.arctan2(y - 0.5, x - 0.5)
    irregularity = float(spec.get("irregularity", 0.0))
    wobble = sum(rng.uniform(-1, 1) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
    radius = float(spec["lesion_radius"]) * (1 + irregularity * wobble / 3)
    distance = np.hypot(x - 0.5, y - 0.5) / radius
    lesion = np.clip((1 - distance) / 0.15 + 0.5, 0, 1)
    skin = np.array(spec["skin_color"], dtype=np.float64) / 255
    mole = np.array(spec["lesion_color"], dtype=np.float64) / 255
    mottling = 1 + irregularity * 0.6 * np.sin(2 * np.pi * (x * rng.uniform(4, 9) + y * rng.uniform(4, 9)))
    image = skin * (1 - lesion[..., None]) + (mole * mottling[..., None]) * lesion[..., None]
    image += 0.015 * rng.standard_normal(image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


GENERATORS = {"chest_radiograph": chest_radiograph, "histology": histology, "skin_lesion": skin_lesion}


def render_image(spec: dict[str, Any], size: int) -> np.ndarray:
    """Draw the synthetic image ``spec`` describes: uint8 RGB [size, size, 3], the same on every run."""
    return GENERATORS[spec["generator"]](spec, size)


def without_images(calibration: CalibrationSet) -> CalibrationSet:
    """The same conversations with every image entry removed (to measure what images add)."""
    items = []
    for item in calibration.items:
        messages = [{**message, "content": [part for part in message["content"] if part["type"] != "image"]}
                    for message in item.messages]
        items.append(CalibrationItem(id=item.id, kind=item.kind, messages=messages))
    return CalibrationSet(name=f"{calibration.name}-text-only", path=calibration.path, items=items,
                          sha256=calibration.sha256)
