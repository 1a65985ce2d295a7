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
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import atomic_output
from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_eval.items import ImageRef, Item

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_SLICES: dict[str, str] = {"medqa-mini": "medqa-mini.jsonl", "vqa-mini": "vqa-mini.jsonl"}
HELDOUT_TEXT_FILE = "heldout-text.jsonl"
REQUIRED_PROVENANCE = ("source", "license")
_SPEC_RE = re.compile(r"^(?P<base>.+?)(?::(?P<limit>\d+))?(?:@seed=(?P<seed>\d+))?$")


# --------------------------------------------------------------------------- data model


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
    from medgemma_gguf.quant_eval.loaders import BENCHMARKS

    return sorted(BUNDLED_SLICES) + sorted(BENCHMARKS)


def load_slice(spec: str, local_dir: str | Path | None = None) -> Slice:
    """Load the slice named by ``spec`` (see the module docstring for the grammar).

    ``local_dir`` is a folder holding public benchmark files (laid out as ``<local_dir>/<repo id>/...``);
    without it the loaders use ``$MEDGEMMA_GGUF_DATA_DIR`` or the Hugging Face Hub.
    """
    from medgemma_gguf.quant_eval.loaders import BENCHMARKS, load_benchmark

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
