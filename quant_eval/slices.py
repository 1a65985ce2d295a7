"""Evaluation slices: small, fixed sets of closed questions with verifiable answers.

A *slice* is a list of :class:`Item` (a question, its options, the index of the right option, an
optional image and where the item came from). ``load_slice(spec)`` accepts:

* a bundled slice: ``medqa-mini`` (text questions written for this project), ``vqa-mini``
  (questions about synthetic images drawn by :func:`render_synthetic`);
* a public benchmark read by :mod:`quant_eval.loaders`: ``medqa``, ``medmcqa``, ``pubmedqa``,
  ``mmlu-medical``, ``vqa-rad``, ``slake``;
* a path to a JSONL file in this module's schema (one item per line, see :func:`item_to_json`).

JSONL schema, one object per line: ``{"id", "question", "options": [str, ...], "answer_index": int,
"provenance": {"source", "license", "author" or "url", ...}, "image"?: {"synthetic": {...}} |
{"data_base64": "<image file bytes>"} | {"path": "<relative to the JSONL file>"}}``.

Any of them may end in ``:N`` (the first N items) and/or ``@seed=S`` (a seeded sample).
Seeded sampling ranks every item by ``sha256(f"{seed}:{item.id}")`` and keeps the N lowest, then
restores the source order. It depends only on the seed and the item ids, so it is the same on every
machine and Python version, and the sample of N is contained in the sample of N+1 for the same seed.
``name@seed=S`` without N shuffles the whole set (in hash order).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgemma_gguf.atomic import atomic_output
from medgemma_gguf.errors import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_SLICES: dict[str, str] = {"medqa-mini": "medqa-mini.jsonl", "vqa-mini": "vqa-mini.jsonl"}
HELDOUT_TEXT_FILE = "heldout-text.jsonl"
REQUIRED_PROVENANCE = ("source", "license")
SYNTHETIC_SIZE = 256
_SPEC_RE = re.compile(r"^(?P<base>.+?)(?::(?P<limit>\d+))?(?:@seed=(?P<seed>\d+))?$")


# --------------------------------------------------------------------------- data model


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
        """The image as an RGB PIL image."""
        if self.synthetic is not None:
            return render_synthetic(self.synthetic).convert("RGB")
        try:
            raw = self.data if self.data is not None else Path(self.path).read_bytes()  # type: ignore[arg-type]
            with Image.open(io.BytesIO(raw)) as image:
                return image.convert("RGB")
        except OSError as exc:
            where = self.path or "embedded image bytes"
            raise UserError(f"cannot read image {where}: {exc}; check the dataset files") from exc

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
    """One closed question: ``options[answer_index]`` is the right answer."""

    id: str
    question: str
    options: list[str]
    answer_index: int
    image: ImageRef | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.options[self.answer_index]


@dataclass(frozen=True)
class Slice:
    """A named, ordered list of items; ``spec`` is what was asked for (e.g. ``medqa:200@seed=7``)."""

    spec: str
    items: tuple[Item, ...]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @property
    def has_images(self) -> bool:
        return any(item.image is not None for item in self.items)


@dataclass(frozen=True)
class TextChunk:
    """A piece of held-out prose for perplexity, with its provenance."""

    id: str
    text: str
    provenance: dict[str, Any]


@dataclass(frozen=True)
class SliceSpec:
    """A parsed spec: ``base[:limit][@seed=seed]``."""

    base: str
    limit: int | None = None
    seed: int | None = None


# --------------------------------------------------------------------------- specs and loading


def parse_spec(spec: str) -> SliceSpec:
    """Split ``name[:N][@seed=S]`` into its parts."""
    match = _SPEC_RE.match(spec.strip())
    if not spec.strip() or match is None:
        raise UserError(f"empty slice spec; give one of {', '.join(valid_slice_names())} or a .jsonl path")
    limit = int(match["limit"]) if match["limit"] is not None else None
    if limit == 0:
        raise UserError(f"slice spec {spec!r} asks for 0 items; use :N with N >= 1")
    seed = int(match["seed"]) if match["seed"] is not None else None
    return SliceSpec(base=match["base"], limit=limit, seed=seed)


def valid_slice_names() -> list[str]:
    """Every name ``load_slice`` accepts besides a file path."""
    from quant_eval.loaders import BENCHMARKS

    return sorted(BUNDLED_SLICES) + sorted(BENCHMARKS)


def load_slice(spec: str, local_dir: str | Path | None = None) -> Slice:
    """Load the slice named by ``spec`` (see the module docstring for the grammar).

    ``local_dir`` is a folder holding public benchmark files (laid out as ``<local_dir>/<repo id>/...``);
    without it the loaders use ``$MEDGEMMA_GGUF_DATA_DIR`` or the Hugging Face Hub.
    """
    from quant_eval.loaders import BENCHMARKS, load_benchmark

    parsed = parse_spec(spec)
    base = parsed.base
    if base in BUNDLED_SLICES:
        items = read_slice_jsonl(DATA_DIR / BUNDLED_SLICES[base])
    elif base in BENCHMARKS:
        items = load_benchmark(base, local_dir=local_dir)
    elif base.endswith(".jsonl") or Path(base).is_file():
        items = read_slice_jsonl(Path(base))
    else:
        raise UserError(
            f"unknown slice {base!r}; valid names: {', '.join(valid_slice_names())}, or a path to a .jsonl file"
        )
    validate_items(items, where=base)
    chosen = select_items(items, parsed.limit, parsed.seed, where=base)
    return Slice(spec=spec.strip(), items=tuple(chosen))


def select_items(items: Sequence[Item], limit: int | None, seed: int | None, where: str = "slice") -> list[Item]:
    """The first ``limit`` items, or with ``seed`` a deterministic hash-ranked sample (module docstring)."""
    if limit is not None and limit > len(items):
        raise UserError(f"{where} has {len(items)} items but {limit} were asked for; use :N with N <= {len(items)}")
    if seed is None:
        return list(items[:limit]) if limit is not None else list(items)
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{items[i].id}".encode()).digest())
    if limit is None:
        return [items[i] for i in ranked]
    return [items[i] for i in sorted(ranked[:limit])]


def validate_items(items: Sequence[Item], where: str) -> None:
    """Raise UserError unless the items form a usable slice."""
    if not items:
        raise UserError(f"{where} holds no items; check the file or the benchmark download")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise UserError(f"{where}: item id {item.id!r} appears twice; ids must be unique")
        seen.add(item.id)
        if not item.question.strip():
            raise UserError(f"{where}: item {item.id!r} has an empty question")
        if len(item.options) < 2 or any(not str(o).strip() for o in item.options):
            raise UserError(f"{where}: item {item.id!r} needs at least two non-empty options")
        if not 0 <= item.answer_index < len(item.options):
            raise UserError(
                f"{where}: item {item.id!r} has answer_index {item.answer_index} "
                f"but only {len(item.options)} options"
            )
        missing = [key for key in REQUIRED_PROVENANCE if not item.provenance.get(key)]
        if not (item.provenance.get("author") or item.provenance.get("url")):
            missing.append("author or url")
        if missing:
            raise UserError(f"{where}: item {item.id!r} lacks provenance {', '.join(missing)}; add it to the item")


# --------------------------------------------------------------------------- JSONL schema


def item_to_json(item: Item) -> dict[str, Any]:
    """The item as one JSONL record of this project's schema."""
    record: dict[str, Any] = {
        "id": item.id,
        "question": item.question,
        "options": list(item.options),
        "answer_index": item.answer_index,
    }
    if item.image is not None:
        if item.image.synthetic is not None:
            record["image"] = {"synthetic": item.image.synthetic}
        else:
            record["image"] = {"data_base64": base64.b64encode(item.image.encoded_bytes()).decode("ascii")}
    record["provenance"] = dict(item.provenance)
    return record


def item_from_json(record: Any, base_dir: Path, where: str) -> Item:
    """Parse one record of this project's schema; ``where`` names it in errors."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with id, question, options, answer_index")
    missing = [key for key in ("id", "question", "options", "answer_index", "provenance") if key not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    options = record["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise UserError(f"{where}: 'options' must be a list of strings")
    answer_index = record["answer_index"]
    if not isinstance(answer_index, int) or isinstance(answer_index, bool):
        raise UserError(f"{where}: 'answer_index' must be an integer")
    if not isinstance(record["provenance"], dict):
        raise UserError(f"{where}: 'provenance' must be an object with source, license, author or url")
    return Item(
        id=str(record["id"]),
        question=str(record["question"]),
        options=options,
        answer_index=answer_index,
        image=_image_from_json(record.get("image"), base_dir, where),
        provenance=record["provenance"],
    )


def _image_from_json(value: Any, base_dir: Path, where: str) -> ImageRef | None:
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("synthetic"), dict):
        return ImageRef(synthetic=value["synthetic"])
    if isinstance(value, dict) and isinstance(value.get("data_base64"), str):
        try:
            return ImageRef(data=base64.b64decode(value["data_base64"], validate=True))
        except ValueError as exc:
            raise UserError(f"{where}: 'image.data_base64' is not valid base64") from exc
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        path = (base_dir / value["path"]).resolve()
        if not path.is_file():
            raise UserError(f"{where}: image file {path} does not exist; fix 'image.path' (relative to the JSONL)")
        return ImageRef(path=str(path))
    raise UserError(f"{where}: 'image' must be an object with one of synthetic, data_base64, path")


def read_slice_jsonl(path: Path) -> list[Item]:
    """Read a JSONL file of this project's schema; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"slice file {path} does not exist; give a path to a .jsonl file or a slice name")
    items: list[Item] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg}); fix or remove that line") from exc
            items.append(item_from_json(record, path.parent, where))
    return items


def save_slice(slice_: Slice | Iterable[Item], path: Path, force: bool = False) -> Path:
    """Write items as JSONL of this project's schema, atomically (nothing half-written on failure)."""
    items = list(slice_.items if isinstance(slice_, Slice) else slice_)
    validate_items(items, where=str(path))
    with atomic_output(Path(path), force=force) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item_to_json(item), ensure_ascii=False, sort_keys=True) + "\n")
    return Path(path)


def slice_hash(slice_: Slice | Iterable[Item]) -> str:
    """Stable sha256 over each item's id, question, options, answer index and image content.

    Provenance and the spec string are left out: two slices with the same questions share a cache key.
    """
    items = slice_.items if isinstance(slice_, Slice) else tuple(slice_)
    digest = hashlib.sha256(b"medgemma-gguf slice v1\n")
    for item in items:
        canonical = {
            "id": item.id,
            "question": item.question,
            "options": list(item.options),
            "answer_index": item.answer_index,
            "image": item.image.digest() if item.image is not None else None,
        }
        digest.update(json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def load_heldout_text() -> list[TextChunk]:
    """The bundled held-out prose (general and medical), in chunks, for perplexity."""
    path = DATA_DIR / HELDOUT_TEXT_FILE
    chunks: list[TextChunk] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                    chunks.append(TextChunk(id=record["id"], text=record["text"], provenance=record["provenance"]))
                except (json.JSONDecodeError, KeyError) as exc:
                    raise UserError(f"{path} line {number}: not a held-out text record ({exc})") from exc
    return chunks


# --------------------------------------------------------------------------- synthetic images


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


__all__ = [
    "BUNDLED_SLICES",
    "ImageRef",
    "Item",
    "Slice",
    "SliceSpec",
    "TextChunk",
    "item_from_json",
    "item_to_json",
    "load_heldout_text",
    "load_slice",
    "mean_by_half",
    "parse_spec",
    "read_slice_jsonl",
    "render_synthetic",
    "save_slice",
    "select_items",
    "slice_hash",
    "synthetic_answer",
    "valid_slice_names",
    "validate_items",
]

