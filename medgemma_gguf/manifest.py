"""``manifest.json``: what an output folder holds — one typed, versioned schema, validated on load.

Layout (schema version 2; version 1, written before the ``schema_version`` key existed, has the same
fields and is read as is)::

    {"schema_version": 2, "model": "medgemma-4b-it",
     "source": {"repo_or_path": "google/medgemma-4b-it", "revision": null, ...},
     "files": [{"path": "medgemma-4b-it-Q4_K_M.gguf", "role": "text", "type": "Q4_K_M",
                "bytes": 2489894016, "sha256": "…", "bits_per_weight": 4.85, ...}, ...]}

``files[].path``, ``files[].role`` and ``files[].type`` keep their names: scripts outside this project
read them. A model split into llama.cpp's parts (``NAME-00001-of-00003.gguf`` …) is one row: ``path`` is its
first part (what llama.cpp loads), ``parts`` lists every part with its ``bytes`` and ``sha256``, and the
row's ``bytes`` is their sum. The importance matrix is a row of role ``imatrix`` (its ``path`` says where it
is: ``NAME.imatrix`` beside the models, GGUF inside, so ``*.gguf`` globs of models do not catch it); a
quant row's ``imatrix`` names the one it was built with.

Folders without a manifest (GGUFs downloaded from Unsloth, bartowski, ggml-org, or pulled from the Hub)
are described by ``Manifest.discover`` from the files' headers — role from ``general.architecture`` /
``general.type``, type from ``general.file_type`` and the tensor types (``gguf_info.quant_label``), never
from file names; ``Manifest.for_folder`` gives the manifest or, without one, the discovered description.
A discovered manifest is not saved and its rows carry no sha256.

The mmproj that goes with a text model: ``Manifest.mmprojs`` orders a folder's mmprojs (the run order
F16, BF16, F32, Q8_0 of ``quant_types``; the precision order to evaluate with), and ``Manifest.mmproj_for``
takes the first one that fits the text model (width and projector checked from the headers) and says which
it took and why any other was passed over.

Every row's optional fields are declared on ``FileEntry``; keys this version does not know (written by a
newer version, or added by hand) are kept in ``extra`` and written back unchanged. Paths are relative to the
folder and stay inside it (no absolute paths, no ``..``). A manifest that breaks the schema is refused with
one line naming the field; one from a newer schema version is refused with the fix (upgrade medgemma-gguf).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from medgemma_gguf import quant_types
from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.errors import IntegrityError, NotFoundError, UserError
from medgemma_gguf.gguf_info import SPLIT_NAME, GgufInfo, mmproj_mismatch, read_gguf_info
from medgemma_gguf.hashing import sha256_of

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 2
ROLES = ("text", "mmproj", "imatrix", "adapter")
# mmproj types, best first: to run with (F16 is what llama.cpp's tools default to), and to evaluate with
MMPROJ_RUN_ORDER = quant_types.MMPROJ_RUN_ORDER
MMPROJ_PRECISION_ORDER = quant_types.MMPROJ_PRECISION_ORDER

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fix(target: Path) -> str:
    return f"restore {target.name} or rebuild the folder with `medgemma-gguf convert ... --force`"


class _Checker:
    """Field checks that raise one line naming the manifest, the field and the fix."""

    def __init__(self, target: Path):
        self.target = target

    def fail(self, where: str, problem: str) -> IntegrityError:
        return IntegrityError(f"{self.target}: {where} {problem}; {_fix(self.target)}")

    def text(self, value: Any, where: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {value!r:.60}")
        return value

    def whole(self, value: Any, where: str, *, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(where, f"must be a whole number >= 0, got {value!r:.60}")
        return value

    def number(self, value: Any, where: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
            raise self.fail(where, f"must be a number, got {value!r:.60}")
        return float(value)

    def sha(self, value: Any, where: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not _SHA256.match(value):
            raise self.fail(where, f"must be a sha256 (64 lower-case hex digits), got {value!r:.60}")
        return value

    def mapping(self, value: Any, where: str) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(where, f"must be an object, got {type(value).__name__}")
        return value

    def counts(self, value: Any, where: str) -> dict[str, int]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and not isinstance(v, bool)
                                                  and isinstance(v, int) and v >= 0 for k, v in value.items()):
            raise self.fail(where, "must map type names to whole numbers")
        return value

    def rows(self, value: Any, where: str) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(where, "must be a list of objects")
        return value

    def relative_path(self, value: Any, where: str, *, optional: bool = False) -> str | None:
        """A path relative to the folder that stays inside it."""
        text = self.text(value, where, optional=optional)
        if text is None:
            return None
        pure = PurePosixPath(text.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", text) or "\0" in text:
            raise self.fail(where, f"must be a path inside the folder, got {text!r:.80}")
        return text


@dataclass
class FileEntry:
    """One file of the folder; ``path`` is relative to the manifest's folder.

    Every row: ``path``, ``role`` (one of ``ROLES``), ``type`` (F32, BF16, Q4_K_M, UD-Q4_K_XL, …), ``bytes``,
    ``sha256``. GGUF rows: ``bits_per_weight`` (of the quantizable tensors) and ``tensor_types`` (ggml
    type → tensor count). Quant rows: what they were built from (``inputs``; a rebuild is skipped while
    these and the sha256 are unchanged), ``recipe``, ``imatrix`` and ``mmproj`` (file names), llama.cpp's
    shape ``fallbacks``, the ``quantizer`` version and, for AUTO, how the mix was chosen (``auto``).
    Imatrix rows: the text GGUF it was computed on (``source``, ``source_sha256``) and the calibration set
    (``calibration``, ``calibration_sha256``, ``chunks``, ``chunk_size``). Split models: ``parts``, every
    part's ``path``, ``bytes`` and ``sha256`` (``path`` is the first part's).
    """

    path: str
    role: str
    type: str
    bytes: int
    sha256: str
    bits_per_weight: float | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] | None = None
    recipe: str | None = None
    imatrix: str | None = None
    mmproj: str | None = None
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    quantizer: str | None = None
    auto: dict[str, Any] | None = None
    source: str | None = None
    source_sha256: str | None = None
    calibration: dict[str, Any] | None = None
    calibration_sha256: str | None = None
    chunks: int | None = None
    chunk_size: int | None = None
    parts: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def part_paths(self) -> list[str]:
        """Every file of this row: its parts, or its path."""
        return [part["path"] for part in self.parts] or [self.path]

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "extra" or (value in (None, {}, []) and spec.name not in _REQUIRED):
                continue
            row[spec.name] = value
        row.update(self.extra)
        return row

    @classmethod
    def from_json(cls, row: Any, *, where: str = "files[]", target: Path = Path(MANIFEST_NAME)) -> FileEntry:
        """A validated row (IntegrityError naming the field otherwise)."""
        check = _Checker(target)
        if not isinstance(row, dict):
            raise check.fail(where, f"must be an object, got {type(row).__name__}")
        for name in _REQUIRED:
            if name not in row:
                raise check.fail(f"{where}.{name}", "is missing")
        role = check.text(row["role"], f"{where}.role")
        if role not in ROLES:
            raise check.fail(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r:.40}")
        known = {spec.name for spec in fields(cls)} - {"extra"}
        return cls(
            path=check.relative_path(row["path"], f"{where}.path"),  # type: ignore[arg-type]
            role=role,
            type=check.text(row["type"], f"{where}.type"),  # type: ignore[arg-type]
            bytes=check.whole(row["bytes"], f"{where}.bytes"),  # type: ignore[arg-type]
            sha256=check.sha(row["sha256"], f"{where}.sha256"),  # type: ignore[arg-type]
            bits_per_weight=check.number(row.get("bits_per_weight"), f"{where}.bits_per_weight"),
            tensor_types=check.counts(row.get("tensor_types"), f"{where}.tensor_types"),
            inputs=check.mapping(row.get("inputs"), f"{where}.inputs"),
            recipe=check.text(row.get("recipe"), f"{where}.recipe", optional=True),
            imatrix=check.relative_path(row.get("imatrix"), f"{where}.imatrix", optional=True),
            mmproj=check.relative_path(row.get("mmproj"), f"{where}.mmproj", optional=True),
            fallbacks=check.rows(row.get("fallbacks"), f"{where}.fallbacks"),
            quantizer=check.text(row.get("quantizer"), f"{where}.quantizer", optional=True),
            auto=check.mapping(row.get("auto"), f"{where}.auto"),
            source=check.relative_path(row.get("source"), f"{where}.source", optional=True),
            source_sha256=check.sha(row.get("source_sha256"), f"{where}.source_sha256", optional=True),
            calibration=check.mapping(row.get("calibration"), f"{where}.calibration"),
            calibration_sha256=check.sha(row.get("calibration_sha256"), f"{where}.calibration_sha256", optional=True),
            chunks=check.whole(row.get("chunks"), f"{where}.chunks", optional=True),
            chunk_size=check.whole(row.get("chunk_size"), f"{where}.chunk_size", optional=True),
            parts=_parts(check, row.get("parts"), f"{where}.parts"),
            extra={k: v for k, v in row.items() if k not in known},
        )


def _parts(check: _Checker, value: Any, where: str) -> list[dict[str, Any]]:
    rows = check.rows(value, where)
    return [{"path": check.relative_path(part.get("path"), f"{where}[{i}].path"),
             "bytes": check.whole(part.get("bytes"), f"{where}[{i}].bytes"),
             "sha256": check.sha(part.get("sha256"), f"{where}[{i}].sha256")} for i, part in enumerate(rows)]


_REQUIRED = ("path", "role", "type", "bytes", "sha256")


def type_rank(type_name: str, order: tuple[str, ...]) -> int:
    """Position of ``type_name`` (any case) in a best-first ``order``; types not in it rank last."""
    kind = type_name.upper()
    return order.index(kind) if kind in order else len(order)


@dataclass
class Manifest:
    """The manifest of one output folder: the model's name, where it came from, and its files.

    ``source``: ``repo_or_path`` (Hub repo id or local folder) and ``revision`` as given to ``convert``,
    plus what later steps add about the source (kept as written). ``extra``: top-level keys this version
    does not know, written back unchanged.
    """

    model: str
    source: dict[str, Any]
    files: list[FileEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    discovered: bool = False  # described from the files' headers (no manifest.json); never saved
    problems: list[str] = field(default_factory=list)  # discovery: files that could not be read, and why

    def upsert(self, entry: FileEntry) -> None:
        """Add ``entry``, replacing any row for the same path."""
        self.files = [f for f in self.files if f.path != entry.path] + [entry]

    def find(self, role: str) -> list[FileEntry]:
        return [f for f in self.files if f.role == role]

    def present(self, folder: Path, role: str) -> list[FileEntry]:
        """Rows of ``role`` whose file (every part of a split model) is still in ``folder``."""
        return [f for f in self.find(role) if all((Path(folder) / path).is_file() for path in f.part_paths)]

    def mmprojs(self, folder: Path, order: tuple[str, ...] = MMPROJ_RUN_ORDER) -> list[FileEntry]:
        """The folder's mmproj rows whose file is present, best first by type ``order`` (others last), then name."""
        return sorted(self.present(folder, "mmproj"), key=lambda row: (type_rank(row.type, order), row.path))

    def mmproj_for(self, folder: Path, text_path: Path, order: tuple[str, ...] = MMPROJ_RUN_ORDER) -> MmprojChoice:
        """The first of ``mmprojs(folder, order)`` that fits the text model at ``text_path`` (projector gemma3,
        projecting to the model's width), with a note saying which was taken and why others were not."""
        folder = Path(folder)
        text = read_gguf_info(text_path)
        passed: list[str] = []
        for row in self.mmprojs(folder, order):
            try:
                problem = mmproj_mismatch(text, read_gguf_info(folder / row.path))
            except UserError as exc:
                problem = str(exc)
            if problem:
                passed.append(problem)
                continue
            others = [r for r in self.mmprojs(folder, order) if r.path != row.path]
            note = f"{row.path} ({row.type}" + (f"; preferred to {', '.join(f'{r.path} ({r.type})' for r in others)}"
                                                if others else "") + ")"
            return MmprojChoice(folder / row.path, note, passed)
        return MmprojChoice(None, "; ".join(passed) if passed else f"no mmproj in {folder}", passed)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "source": self.source,
                "files": [f.to_json() for f in self.files], **self.extra}

    def save(self, folder: Path) -> Path:
        if self.discovered:
            raise ValueError("a discovered manifest describes files it did not measure; it is never saved")
        target = Path(folder) / MANIFEST_NAME
        write_text_atomic(target, json.dumps(self.to_json(), indent=2) + "\n")
        return target

    @classmethod
    def from_json(cls, data: Any, target: Path = Path(MANIFEST_NAME)) -> Manifest:
        """A validated manifest (IntegrityError naming the field otherwise)."""
        check = _Checker(target)
        if not isinstance(data, dict):
            raise check.fail("the top level", f"must be an object, got {type(data).__name__}")
        version = data.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise check.fail("schema_version", f"must be a whole number >= 1, got {version!r:.40}")
        if version > SCHEMA_VERSION:
            raise IntegrityError(f"{target} has schema version {version}, newer than this medgemma-gguf reads "
                                 f"({SCHEMA_VERSION}); upgrade medgemma-gguf")
        if "model" not in data:
            raise check.fail("model", "is missing")
        model = check.text(data["model"], "model")
        source = check.mapping(data.get("source"), "source") or {}
        if not isinstance(data.get("files", []), list):
            raise check.fail("files", f"must be a list, got {type(data['files']).__name__}")
        files = [FileEntry.from_json(row, where=f"files[{i}]", target=target)
                 for i, row in enumerate(data.get("files", []))]
        paths = [row.path for row in files]
        if len(set(paths)) != len(paths):
            duplicate = next(p for p in paths if paths.count(p) > 1)
            raise check.fail("files", f"lists {duplicate!r} twice")
        extra = {k: v for k, v in data.items() if k not in ("schema_version", "model", "source", "files")}
        return cls(model=model, source=source, files=files, extra=extra)  # type: ignore[arg-type]

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        target = Path(folder) / MANIFEST_NAME
        try:
            data = json.loads(target.read_bytes().decode("utf-8"), parse_constant=_not_json)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{target} not found; run `medgemma-gguf convert` into {folder} first") from exc
        except IsADirectoryError as exc:
            raise IntegrityError(f"{target} is a folder, not a file; {_fix(target)}") from exc
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"{target} is not UTF-8 text; {_fix(target)}") from exc
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else (
                "nested too deeply" if isinstance(exc, RecursionError) else str(exc))
            raise IntegrityError(f"{target} is not valid JSON ({reason}); {_fix(target)}") from exc
        return cls.from_json(data, target)

    @classmethod
    def discover(cls, folder: Path) -> Manifest:
        """A manifest described from the headers of the GGUFs in ``folder`` (and split models' parts in its direct
        subfolders, where bartowski puts files over 50 GB; see the module docstring): one row per model (a
        split model's parts together), unreadable files in ``problems``. NotFoundError when the folder holds
        no GGUF."""
        folder = Path(folder)
        found = sorted([p for p in folder.glob("*.gguf") if p.is_file() and not p.name.startswith(".")]
                       + [p for p in folder.glob("*/*.gguf") if p.is_file() and SPLIT_NAME.match(p.name)])
        if not found:
            raise NotFoundError(f"{folder} has no {MANIFEST_NAME} and no .gguf files; pass a folder with MedGemma "
                                "GGUFs, a .gguf file, or hf:REPO:QUANT")
        manifest = cls(model=folder.resolve().name, source={"repo_or_path": str(folder)}, discovered=True)
        for path in found:
            match = SPLIT_NAME.match(path.name)
            if match and int(match.group("no")) != 1:
                continue  # read with its first part
            try:
                info = read_gguf_info(path)
                info.check_complete()
            except UserError as exc:
                manifest.problems.append(str(exc))
                continue
            manifest.files.append(_discovered_row(folder, info))
        return manifest

    @classmethod
    def for_folder(cls, folder: Path) -> Manifest:
        """The folder's ``manifest.json``, or without one its discovered description."""
        folder = Path(folder)
        if (folder / MANIFEST_NAME).exists():
            return cls.load(folder)
        if not folder.is_dir():
            raise NotFoundError(f"{folder} is not a folder; pass a folder of GGUF files or a .gguf file")
        return cls.discover(folder)


@dataclass(frozen=True)
class MmprojChoice:
    """The mmproj taken for a text model (None: none fits), a note for people, and the reasons others were
    passed over (another model's width, another projector)."""

    path: Path | None
    note: str
    passed_over: list[str]


def _discovered_row(folder: Path, info: GgufInfo) -> FileEntry:
    parts = [{"path": p.path.relative_to(folder).as_posix(), "bytes": p.path.stat().st_size, "sha256": ""}
             for p in info.parts]
    return FileEntry(path=info.path.relative_to(folder).as_posix(), role=info.kind, type=info.quant_type,
                     bytes=info.file_bytes, sha256="", bits_per_weight=round(info.bits_per_weight, 4) or None,
                     tensor_types=info.quantizable_type_counts(), parts=parts)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def entry_for(folder: Path, file: Path, role: str, type_name: str, *, parts: list[Path] | None = None,
              stored_as: Path | None = None, **values: Any) -> FileEntry:
    """A manifest row for a finished file, with size and sha256 measured from disk.

    ``stored_as``: the file's final path when ``file`` is still its temporary name (the row is recorded
    before the rename: ``medgemma_gguf.integrity.record_then_commit``).
    ``parts``: every part of a split model (``file`` is the first): the row's ``bytes`` is their sum, its
    ``sha256`` the first part's, and ``parts`` lists each. ``values``: ``FileEntry`` fields
    (``bits_per_weight=…``); other keys go to ``extra``.
    """
    file = Path(file)
    folder = Path(folder)
    known = {spec.name for spec in fields(FileEntry)} - {"extra", "parts", *_REQUIRED}
    rows: list[dict[str, Any]] = [
        {"path": Path(part).relative_to(folder).as_posix(), "bytes": Path(part).stat().st_size,
         "sha256": sha256_of(Path(part))} for part in parts] if parts and len(parts) > 1 else []
    return FileEntry(path=Path(stored_as or file).relative_to(folder).as_posix(), role=role, type=type_name,
                     bytes=sum(r["bytes"] for r in rows) if rows else file.stat().st_size,
                     sha256=rows[0]["sha256"] if rows else sha256_of(file), parts=rows,
                     **{k: v for k, v in values.items() if k in known},
                     extra={k: v for k, v in values.items() if k not in known})
