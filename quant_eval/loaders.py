"""Public medical benchmarks, read in each dataset's own schema as published on the Hugging Face Hub.

Where the files come from, first match wins:

1. ``local_dir`` (``--data-dir``), then ``$MEDGEMMA_GGUF_DATA_DIR``: a folder laid out like
   ``<dir>/<owner>/<dataset>/<the repo's own paths>`` (what ``hf download ... --local-dir
   <dir>/<owner>/<dataset>`` writes), or the dataset folder itself. Never touches the network.
2. The Hugging Face Hub via ``huggingface_hub.snapshot_download`` (only the files needed), or its
   cache alone when ``HF_HUB_OFFLINE=1``.

Each file may be the Hub's format (parquet or jsonl) or a ``.jsonl``/``.json`` holding the same
columns; parquet needs ``pyarrow``. VQA sets keep closed questions only: a yes/no answer gives options
``["yes", "no"]``; a question ending ``..., X or Y?`` answered by X or Y gives ``[X, Y]``; other questions
are skipped.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.quant_eval.items import ImageRef, Item

DATA_DIR_ENV = "MEDGEMMA_GGUF_DATA_DIR"
READABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)
# cais/mmlu has named each subject's test file test-00000-of-00001.parquet and, earlier, mmlu-test.parquet

Record = dict[str, Any]


@dataclass(frozen=True)
class DataFile:
    """One file's rows: ``relpath`` is its path inside the dataset repo, ``path`` where it was read."""

    relpath: str
    path: Path
    rows: list[Record]


@dataclass(frozen=True)
class Benchmark:
    """A public benchmark: its Hub repo, the files used (repo paths without extension) and its parser."""

    name: str
    repo_id: str
    file_stems: tuple[str, ...]
    hub_suffix: str
    split: str
    license: str
    parse: Callable[[Benchmark, DataFile, int, Record], Item | None]

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo_id}"

    @property
    def hub_patterns(self) -> list[str]:
        """The ``allow_patterns`` given to ``snapshot_download``."""
        return [stem + self.hub_suffix for stem in self.file_stems]

    def provenance(self, data_file: DataFile, row: int, **extra: Any) -> dict[str, Any]:
        return {
            "source": f"{self.repo_id} ({self.split} split), {data_file.relpath} row {row}",
            "license": self.license,
            "url": self.url,
            **extra,
        }


# --------------------------------------------------------------------------- parsers (one per schema)


def _require(record: Record, keys: tuple[str, ...], data_file: DataFile, row: int) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise UserError(
            f"{data_file.path} row {row}: missing column(s) {', '.join(missing)}; "
            f"is this the right dataset file?"
        )


def parse_medqa(bench: Benchmark, data_file: DataFile, row: int, record: Record) -> Item | None:
    """GBaker/MedQA-USMLE-4-options: question, options {A..D}, answer_idx (a letter)."""
    _require(record, ("question", "options", "answer_idx"), data_file, row)
    options_by_letter = record["options"]
    letters = sorted(options_by_letter)
    if record["answer_idx"] not in letters:
        raise UserError(f"{data_file.path} row {row}: answer_idx {record['answer_idx']!r} is not one of {letters}")
    return Item(
        id=f"medqa-{bench.split}-{row}",
        question=str(record["question"]).strip(),
        options=[str(options_by_letter[letter]) for letter in letters],
        answer_index=letters.index(record["answer_idx"]),
        provenance=bench.provenance(data_file, row),
    )


def parse_medmcqa(bench: Benchmark, data_file: DataFile, row: int, record: Record) -> Item | None:
    """openlifescienceai/medmcqa: question, opa..opd, cop 0-3 (-1 where the answer is hidden)."""
    _require(record, ("question", "opa", "opb", "opc", "opd", "cop"), data_file, row)
    if record["cop"] not in (0, 1, 2, 3):
        return None
    return Item(
        id=f"medmcqa-{record.get('id') or row}",
        question=str(record["question"]).strip(),
        options=[str(record[key]) for key in ("opa", "opb", "opc", "opd")],
        answer_index=int(record["cop"]),
        provenance=bench.provenance(data_file, row, subject=record.get("subject_name")),
    )


PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]


def parse_pubmedqa(bench: Benchmark, data_file: DataFile, row: int, record: Record) -> Item | None:
    """qiaojin/PubMedQA pqa_labeled: question, context {contexts: [...]}, final_decision yes/no/maybe.

    The abstract (without its conclusion) comes first in ``question``: ``Context: ...`` then the question.
    """
    _require(record, ("question", "context", "final_decision"), data_file, row)
    decision = str(record["final_decision"]).strip().lower()
    if decision not in PUBMEDQA_OPTIONS:
        raise UserError(f"{data_file.path} row {row}: final_decision {decision!r} is not yes, no or maybe")
    context = record["context"]
    paragraphs = context.get("contexts", []) if isinstance(context, dict) else context
    abstract = "\n".join(str(p).strip() for p in paragraphs or [])
    question = str(record["question"]).strip()
    return Item(
        id=f"pubmedqa-{record.get('pubid', row)}",
        question=f"Context: {abstract}\n\n{question}" if abstract else question,
        options=list(PUBMEDQA_OPTIONS),
        answer_index=PUBMEDQA_OPTIONS.index(decision),
        provenance=bench.provenance(data_file, row),
    )


def parse_mmlu(bench: Benchmark, data_file: DataFile, row: int, record: Record) -> Item | None:
    """cais/mmlu: question, subject, choices [4], answer (index)."""
    _require(record, ("question", "choices", "answer"), data_file, row)
    subject = record.get("subject") or data_file.relpath.split("/")[0]
    return Item(
        id=f"mmlu-{subject}-{row}",
        question=str(record["question"]).strip(),
        options=[str(choice) for choice in record["choices"]],
        answer_index=int(record["answer"]),
        provenance=bench.provenance(data_file, row, subject=subject),
    )


YES_NO = ["yes", "no"]
_ALTERNATIVES_RE = re.compile(r",\s*([^,?]+?)\s+or\s+([^,?]+?)\s*\?*\s*$", re.IGNORECASE)


def closed_options(question: str, answer: str) -> tuple[list[str], int] | None:
    """Options and answer index for a closed VQA question, or None when it is open.

    ``yes``/``no`` answers give ``["yes", "no"]``; ``"..., left or right?"`` answered ``left`` gives
    ``["left", "right"]``.
    """
    normalized = answer.strip().lower().rstrip(".")
    if normalized in YES_NO:
        return list(YES_NO), YES_NO.index(normalized)
    match = _ALTERNATIVES_RE.search(question.strip())
    if match:
        alternatives = [match[1].strip(), match[2].strip()]
        lowered = [a.lower() for a in alternatives]
        if normalized in lowered and lowered[0] != lowered[1]:
            return alternatives, lowered.index(normalized)
    return None


def _image_ref(record: Record, data_file: DataFile, row: int) -> ImageRef:
    """The row's image: an HF Image struct {bytes, path}, base64 text, or a path next to the data file."""
    value = record.get("image")
    if value is None and record.get("img_name"):
        value = {"path": f"imgs/{record['img_name']}"}
    if isinstance(value, dict) and value.get("bytes") is not None:
        raw = value["bytes"]
        if isinstance(raw, str):
            try:
                raw = base64.b64decode(raw, validate=True)
            except binascii.Error as exc:
                raise UserError(f"{data_file.path} row {row}: image bytes are not valid base64") from exc
        return ImageRef(data=bytes(raw))
    path_text = value.get("path") if isinstance(value, dict) else value
    if isinstance(path_text, str) and path_text:
        for base in (data_file.path.parent, data_file.path.parent.parent):
            candidate = base / path_text
            if candidate.is_file():
                return ImageRef(path=str(candidate))
        raise UserError(f"{data_file.path} row {row}: image {path_text} not found next to the data file")
    raise UserError(f"{data_file.path} row {row}: no image (expected an 'image' column or 'img_name')")


def _closed_image_item(record: Record, data_file: DataFile, row: int, *, item_id: str,
                       provenance: dict[str, Any]) -> Item | None:
    """A closed (yes/no or either-or) question about the row's image, or None for an open one."""
    closed = closed_options(str(record["question"]), str(record["answer"]))
    if closed is None:
        return None
    options, answer_index = closed
    return Item(
        id=item_id,
        question=str(record["question"]).strip(),
        options=options,
        answer_index=answer_index,
        image=_image_ref(record, data_file, row),
        provenance=provenance,
    )


def parse_vqa_rad(bench: Benchmark, data_file: DataFile, row: int, record: Record) -> Item | None:
    """flaviagiammarino/vqa-rad: image, question, answer (closed questions only)."""
    _require(record, ("question", "answer"), data_file, row)
    return _closed_image_item(record, data_file, row, item_id=f"vqa-rad-{bench.split}-{row}",
                              provenance=bench.provenance(data_file, row))


def parse_slake(bench: Benchmark, data_file: DataFile, row: int, record: Record) -> Item | None:
    """SLAKE (mdwiratathya/SLAKE-vqa-english or the original JSON): English CLOSED questions only."""
    _require(record, ("question", "answer"), data_file, row)
    if str(record.get("q_lang", "en")).lower() != "en":
        return None
    if "answer_type" in record and str(record["answer_type"]).upper() != "CLOSED":
        return None
    return _closed_image_item(record, data_file, row, item_id=f"slake-{record.get('qid', f'{bench.split}-{row}')}",
                              provenance=bench.provenance(data_file, row, image=record.get("img_name")))


BENCHMARKS: dict[str, Benchmark] = {
    bench.name: bench
    for bench in (
        Benchmark("medqa", "GBaker/MedQA-USMLE-4-options", ("phrases_no_exclude_test",), ".jsonl", "test",
                  "CC-BY-4.0", parse_medqa),
        Benchmark("medmcqa", "openlifescienceai/medmcqa", ("data/validation-*",), ".parquet", "validation",
                  "Apache-2.0", parse_medmcqa),
        Benchmark("pubmedqa", "qiaojin/PubMedQA", ("pqa_labeled/train-*",), ".parquet", "pqa_labeled",
                  "MIT", parse_pubmedqa),
        Benchmark("mmlu-medical", "cais/mmlu", tuple(f"{s}/*test*" for s in MMLU_MEDICAL_SUBJECTS), ".parquet",
                  "test", "MIT", parse_mmlu),
        Benchmark("vqa-rad", "flaviagiammarino/vqa-rad", ("data/test-*",), ".parquet", "test", "CC0-1.0",
                  parse_vqa_rad),
        Benchmark("slake", "mdwiratathya/SLAKE-vqa-english", ("data/test-*",), ".parquet", "test",
                  "CC-BY-4.0", parse_slake),
    )
}


# --------------------------------------------------------------------------- reading files


def read_records(path: Path) -> list[Record]:
    """Rows of a parquet, JSONL or JSON (list of objects) file; errors name the file (and line)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise UserError(f"reading {path} needs pyarrow; install it with `pip install pyarrow`") from exc
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise UserError(f"cannot read parquet file {path}: {exc}; download it again") from exc
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); download it again") from exc
        return _objects_only(rows, path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: not valid JSON ({exc.msg}); fix or download it again") from exc
    return _objects_only(rows, path)


def _objects_only(rows: Any, path: Path) -> list[Record]:
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{path}: expected one JSON object per row; is this the right dataset file?")
    return rows


def _match_stem(root: Path, stem: str) -> list[Path]:
    """Files under ``root`` matching a repo path stem (may hold ``*``) with a readable suffix."""
    for suffix in READABLE_SUFFIXES:
        found = sorted(p for p in root.glob(stem + suffix) if p.is_file())
        if found:
            return found
    return []


def find_files(bench: Benchmark, root: Path) -> list[tuple[str, Path]] | None:
    """(repo path, local path) of every file the benchmark needs under ``root``; None if any is missing."""
    found: list[tuple[str, Path]] = []
    for stem in bench.file_stems:
        matches = _match_stem(root, stem)
        if not matches:
            return None
        found.extend((match.relative_to(root).as_posix(), match) for match in matches)
    return found


def missing_data_message(bench: Benchmark, where: str) -> str:
    """One line: what to download, with which command, and where to put it."""
    includes = " ".join(f"--include '{pattern}'" for pattern in bench.hub_patterns)
    return (
        f"{bench.name} data not found {where}: download dataset {bench.repo_id} (files "
        f"{', '.join(bench.hub_patterns)}) with `hf download {bench.repo_id} --repo-type dataset {includes} "
        f"--local-dir DATA_DIR/{bench.repo_id}` and pass {setting('data_dir')} DATA_DIR (or set "
        f"{DATA_DIR_ENV}=DATA_DIR), "
        f"or unset HF_HUB_OFFLINE so it is downloaded from the Hub"
    )


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_benchmark(bench: Benchmark, cache_dir: str | Path | None = None) -> Path:
    """Fetch the benchmark's files from the Hub (or only the local cache when offline); return the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        folder = snapshot_download(
            bench.repo_id,
            repo_type="dataset",
            allow_patterns=bench.hub_patterns,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as exc:
        where = "in the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "and the Hub is unreachable"
        raise UserError(missing_data_message(bench, where)) from exc
    except HfHubHTTPError as exc:
        raise UserError(f"cannot download {bench.repo_id} from the Hub: {exc}; "
                        f"check the network or log in with `hf auth login`") from exc
    return Path(folder)


def locate_benchmark(bench: Benchmark, local_dir: str | Path | None = None,
                     cache_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The benchmark's files: from ``local_dir``, ``$MEDGEMMA_GGUF_DATA_DIR``, or the Hub (module docstring)."""
    folder = local_dir if local_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if folder is not None:
        folder = Path(folder).expanduser()
        for root in (folder / bench.repo_id, folder):
            files = find_files(bench, root) if root.is_dir() else None
            if files:
                return files
        raise UserError(missing_data_message(bench, f"in {folder}"))
    snapshot = download_benchmark(bench, cache_dir=cache_dir)
    files = find_files(bench, snapshot)
    if not files:
        raise UserError(missing_data_message(bench, f"in the downloaded snapshot {snapshot}"))
    return files


def load_benchmark(name: str, local_dir: str | Path | None = None,
                   cache_dir: str | Path | None = None) -> list[Item]:
    """All usable items of a public benchmark, in file order (see :data:`BENCHMARKS` for names)."""
    bench = BENCHMARKS.get(name)
    if bench is None:
        raise UserError(f"unknown benchmark {name!r}; valid names: {', '.join(sorted(BENCHMARKS))}")
    items: list[Item] = []
    for relpath, path in locate_benchmark(bench, local_dir=local_dir, cache_dir=cache_dir):
        data_file = DataFile(relpath=relpath, path=path, rows=read_records(path))
        for row, record in enumerate(data_file.rows):
            item = bench.parse(bench, data_file, row, record)
            if item is not None:
                items.append(item)
    if not items:
        raise UserError(f"{name}: no usable items in {bench.repo_id}'s files; download them again")
    return items
