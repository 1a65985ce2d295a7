"""Evaluation slices: small, fixed sets of closed questions with verifiable answers, or of free-text
questions scored by KL only.

A *slice* is a list of :class:`Item` (a question, its options, the index of the right option, an
optional image and where the item came from). ``load_slice(spec)`` accepts:

* a bundled slice: ``medqa-mini`` (text questions written for this project), ``vqa-mini``
  (questions about synthetic images drawn by :func:`render_synthetic`);
* a public benchmark read by :mod:`quant_eval.loaders`: ``medqa``, ``medmcqa``, ``pubmedqa``,
  ``mmlu-medical``, ``vqa-rad``, ``slake``;
* your own evaluation set: a ``.jsonl`` or ``.csv`` file (:func:`read_eval_file`).

Own sets, JSONL: one object per line (blank lines skipped), fields

* ``question`` (or ``prompt``): the user's text; required;
* ``id``: unique in the file (default ``line-N``);
* ``options``: two to ten strings: a closed question, scored by accuracy and KL. The right one is
  ``answer`` (its letter ``"B"`` or its text) or ``answer_index`` (0-based);
* no ``options``: a free-text question, scored by KL only; ``answer`` (optional) is a reference reply
  whose tokens are scored too (teacher-forced after the prompt);
* ``image``: a path (relative to the file; PNG, JPEG, …, or DICOM), or ``{"path"}``, ``{"data_base64"}``,
  ``{"synthetic": {...}}``;
* ``provenance`` (optional): ``{"source", "license", "author" or "url"}``; without it the file is the
  provenance (its path and sha256 go into the report);
* ``meta`` (optional): anything, ignored.

Own sets, CSV (a header row; UTF-8): columns ``question`` (or ``prompt``), ``id``, ``A`` … ``J`` (the
options, left to right; none for a free-text question), ``answer`` (letter or option text; the reference
reply of a free-text question), ``image`` (a path). Other fields and columns are refused by name, and every
error names the file and line.

The bundled slices and the project's own files (``item_to_json``) use the same fields with ``answer_index``
and ``provenance`` always given.

Any of them may end in ``:N`` (the first N items) and/or ``@seed=S`` (a seeded sample).
Seeded sampling ranks every item by ``sha256(f"{seed}:{item.id}")`` and keeps the N lowest, then
restores the source order. It depends only on the seed and the item ids, so it is the same on every
machine and Python version, and the sample of N is contained in the sample of N+1 for the same seed.
``name@seed=S`` without N shuffles the whole set (in hash order).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import atomic_output
from medgemma_gguf.errors import UserError
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.quant_eval.items import ImageRef, Item

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_SLICES: dict[str, str] = {"medqa-mini": "medqa-mini.jsonl", "vqa-mini": "vqa-mini.jsonl"}
HELDOUT_TEXT_FILE = "heldout-text.jsonl"
EXAMPLE_SET = DATA_DIR / "examples" / "own-set.jsonl"
REQUIRED_PROVENANCE = ("source", "license")
OWN_SET_SUFFIXES = (".jsonl", ".csv")
OPTION_LETTERS = "ABCDEFGHIJ"
RECORD_FIELDS = frozenset({"id", "question", "prompt", "options", "answer", "answer_index", "image", "provenance",
                           "meta"})
CSV_COLUMNS = frozenset({"id", "question", "prompt", "answer", "image", *OPTION_LETTERS})
_SPEC_RE = re.compile(r"^(?P<base>.+?)(?::(?P<limit>\d+))?(?:@seed=(?P<seed>\d+))?$")


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Slice:
    """A named, ordered list of items; ``spec`` is what was asked for (e.g. ``medqa:200@seed=7``); ``source``:
    for an own set, the file it was read from (``{"file", "sha256", "format"}``)."""

    spec: str
    items: tuple[Item, ...]
    source: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @property
    def has_images(self) -> bool:
        return any(item.image is not None for item in self.items)

    @property
    def n_free_text(self) -> int:
        return sum(item.free_text for item in self.items)

    def describe(self) -> dict[str, Any]:
        """What the report says of the slice: spec, item counts, content hash, and the file of an own set."""
        out: dict[str, Any] = {"spec": self.spec, "n_items": len(self), "hash": slice_hash(self),
                               "has_images": self.has_images, "n_free_text": self.n_free_text}
        if self.source:
            out.update(self.source)
        return out


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
    source = None
    if base in BUNDLED_SLICES:
        items = read_slice_jsonl(DATA_DIR / BUNDLED_SLICES[base])
        validate_items(items, where=base)
    elif base in BENCHMARKS:
        items = load_benchmark(base, local_dir=local_dir)
        validate_items(items, where=base)
    elif base.lower().endswith(OWN_SET_SUFFIXES) or Path(base).is_file():
        items = read_eval_file(Path(base))
        source = {"file": str(Path(base)), "sha256": sha256_of(Path(base)),
                  "format": "csv" if base.lower().endswith(".csv") else "jsonl"}
    else:
        raise UserError(
            f"unknown slice {base!r}; valid names: {', '.join(valid_slice_names())}, or a path to a .jsonl or "
            ".csv file"
        )
    chosen = select_items(items, parsed.limit, parsed.seed, where=base)
    return Slice(spec=spec.strip(), items=tuple(chosen), source=source)


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
        if item.free_text and item.answer_index == -1:
            continue
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
    if item.free_text:
        del record["answer_index"]
        if item.reference_answer is not None:
            record["answer"] = item.reference_answer
    if item.image is not None:
        if item.image.synthetic is not None:
            record["image"] = {"synthetic": item.image.synthetic}
        else:
            record["image"] = {"data_base64": base64.b64encode(item.image.encoded_bytes()).decode("ascii")}
    record["provenance"] = dict(item.provenance)
    return record


def _string(value: Any, name: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserError(f"{where}: {name!r} must be a string")
    return str(value)


def _answer_index(record: dict[str, Any], options: list[str], item_id: str, where: str) -> int:
    """The right option from ``answer_index`` (0-based) and/or ``answer`` (a letter or an option's text)."""
    index = record.get("answer_index")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
        raise UserError(f"{where}: 'answer_index' must be an integer (0 for the first option)")
    if index is not None and not 0 <= index < len(options):
        raise UserError(f"{where}: item {item_id!r} has answer_index {index} but only {len(options)} options")
    answer = record.get("answer")
    if answer is None:
        if index is None:
            raise UserError(f"{where}: item {item_id!r} has options but no answer; give 'answer' (a letter "
                            f"A-{OPTION_LETTERS[len(options) - 1]} or the option's text) or 'answer_index'")
        return index
    text = _string(answer, "answer", where).strip()
    letters = OPTION_LETTERS[: len(options)]
    matches = [i for i, option in enumerate(options) if option.strip().casefold() == text.casefold()]
    if len(text) == 1 and text.upper() in letters:
        chosen = letters.index(text.upper())
    elif len(matches) == 1:
        chosen = matches[0]
    else:
        raise UserError(f"{where}: item {item_id!r} has answer {text!r}, neither a letter A-{letters[-1]} nor the text "
                        "of one of its options")
    if index is not None and index != chosen:
        raise UserError(f"{where}: item {item_id!r} has answer {text!r} but answer_index {index}; give one of them")
    return chosen


def item_from_json(record: Any, base_dir: Path, where: str, *, default_id: str | None = None,
                   require_provenance: bool = True) -> Item:
    """Parse one record (module docstring); ``where`` names it in errors. ``require_provenance``: the
    project's own files must carry it; an own evaluation set may leave it out."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with at least a 'question'")
    unknown = sorted(set(record) - RECORD_FIELDS)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are "
                        f"{', '.join(sorted(RECORD_FIELDS))} (put anything else under 'meta')")
    required = ("id", "question", "options", "answer_index", "provenance") if require_provenance else ("question",)
    missing = [key for key in required if key not in record and not (key == "question" and "prompt" in record)]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    if "question" in record and "prompt" in record:
        raise UserError(f"{where}: give 'question' or 'prompt', not both")
    question = _string(record.get("question", record.get("prompt")), "question", where)
    item_id = _string(record["id"], "id", where) if record.get("id") is not None else default_id
    if item_id is None or not item_id.strip():
        raise UserError(f"{where}: 'id' is empty; give each item a unique id")
    if not question.strip():
        raise UserError(f"{where}: item {item_id!r} has an empty question")
    options = record.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise UserError(f"{where}: 'options' must be a list of strings")
    if len(options) == 1 or len(options) > len(OPTION_LETTERS):
        raise UserError(f"{where}: item {item_id!r} has {len(options)} option(s); a closed question needs at least two "
                        f"(at most {len(OPTION_LETTERS)}), a free-text question none")
    if any(not o.strip() for o in options):
        raise UserError(f"{where}: item {item_id!r} has an empty option; every option needs text")
    provenance = record.get("provenance")
    if provenance is not None or require_provenance:
        if not isinstance(provenance, dict):
            raise UserError(f"{where}: 'provenance' must be an object with source, license, author or url")
        missing = [key for key in REQUIRED_PROVENANCE if not provenance.get(key)]
        if not (provenance.get("author") or provenance.get("url")):
            missing.append("author or url")
        if missing:
            raise UserError(f"{where}: item {item_id!r} lacks provenance {', '.join(missing)}; add it to the item")
    reference_answer = None
    if options:
        answer_index = _answer_index(record, options, item_id, where)
    else:
        if record.get("answer_index") is not None:
            raise UserError(f"{where}: item {item_id!r} has answer_index but no options; a free-text question takes "
                            "a reference reply as 'answer'")
        answer_index = -1
        if record.get("answer") is not None:
            reference_answer = _string(record["answer"], "answer", where)
    return Item(
        id=item_id,
        question=question,
        options=list(options),
        answer_index=answer_index,
        image=_image_from_json(record.get("image"), base_dir, where),
        provenance=dict(provenance or {}),
        reference_answer=reference_answer,
    )


def _image_from_json(value: Any, base_dir: Path, where: str) -> ImageRef | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = {"path": value}
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
            raise UserError(f"{where}: image file {path} does not exist; fix 'image' (a path relative to the data "
                            "file)")
        return ImageRef(path=str(path))
    raise UserError(f"{where}: 'image' must be a path or an object with one of synthetic, data_base64, path")


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: not valid JSON ({exc.msg}); fix or remove that line") from exc


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """CSV rows as records: columns A..J become ``options`` (left to right, no gaps), empty cells are absent."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [str(name).strip() for name in reader.fieldnames or []]
        if not header:
            raise UserError(f"{path} line 1: no header row; the first line names the columns (question, A, B, ..., "
                            "answer, id, image)")
        unknown = [name for name in header if name not in CSV_COLUMNS]
        if unknown:
            raise UserError(f"{path} line 1: unknown column(s) {', '.join(unknown)}; the columns are question (or "
                            f"prompt), id, {', '.join(OPTION_LETTERS)}, answer, image")
        reader.fieldnames = header
        start = 2
        for row in reader:
            if None in row:
                raise UserError(f"{path} line {start}: more cells than columns; quote cells that hold commas")
            cells = {k: v.strip() for k, v in row.items() if isinstance(v, str) and v.strip()}
            if cells:
                letters = [letter for letter in OPTION_LETTERS if letter in cells]
                if letters != list(OPTION_LETTERS[: len(letters)]):
                    raise UserError(f"{path} line {start}: options in columns {', '.join(letters)}; fill them from A "
                                    "with no gap")
                record: dict[str, Any] = {k: v for k, v in cells.items() if k not in OPTION_LETTERS}
                if letters:
                    record["options"] = [cells[letter] for letter in letters]
                yield start, record
            start = reader.line_num + 1


def read_eval_file(path: Path, *, require_provenance: bool = False) -> list[Item]:
    """Read an own evaluation set (``.jsonl`` or ``.csv``, module docstring); every error names the file and
    line; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"slice file {path} does not exist; give a path to a .jsonl or .csv file or a slice name")
    records = _csv_records(path) if path.suffix.lower() == ".csv" else _jsonl_records(path)
    items: list[Item] = []
    lines: dict[str, int] = {}
    for number, record in records:
        where = f"{path} line {number}"
        item = item_from_json(record, path.parent, where, default_id=f"line-{number}",
                              require_provenance=require_provenance)
        if item.id in lines:
            raise UserError(f"{where}: item id {item.id!r} appears twice (first on line {lines[item.id]}); ids must "
                            "be unique")
        lines[item.id] = number
        items.append(item)
    if not items:
        raise UserError(f"{path} holds no items; give one question a line")
    return items


def read_slice_jsonl(path: Path) -> list[Item]:
    """Read a JSONL file of this project's schema (ids, answer_index and provenance given); errors name the
    file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"slice file {path} does not exist; give a path to a .jsonl file or a slice name")
    return [item_from_json(record, path.parent, f"{path} line {number}") for number, record in _jsonl_records(path)]


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
        if item.reference_answer is not None:  # only then: the hashes of closed questions stay as they were
            canonical["reference_answer"] = item.reference_answer
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
