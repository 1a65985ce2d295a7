"""``manifest.json``: what an output folder holds — one typed, versioned schema, validated on load.

Layout (schema version 2; version 1, written before the ``schema_version`` key existed, has the same
fields and is read as is)::

    {"schema_version": 2, "model": "medgemma-4b-it",
     "source": {"repo_or_path": "google/medgemma-4b-it", "revision": null, ...},
     "files": [{"path": "medgemma-4b-it-Q4_K_M.gguf", "role": "text", "type": "Q4_K_M",
                "bytes": 2489894016, "sha256": "…", "bits_per_weight": 4.85, ...}, ...]}

``files[].path``, ``files[].role`` and ``files[].type`` keep their names: scripts outside this project
read them. Every row's optional fields are declared on ``FileEntry``; keys this version does not know
(written by a newer version, or added by hand) are kept in ``extra`` and written back unchanged. Paths
are relative to the folder and stay inside it (no absolute paths, no ``..``). A manifest that breaks
the schema is refused with one line naming the field; one from a newer schema version is refused with
the fix (upgrade medgemma-gguf).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from medgemma_gguf import quant_types
from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.errors import IntegrityError, NotFoundError
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
    (``calibration``, ``calibration_sha256``, ``chunks``, ``chunk_size``).
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
    extra: dict[str, Any] = field(default_factory=dict)

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
            role=role,  # type: ignore[arg-type]
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
            extra={k: v for k, v in row.items() if k not in known},
        )


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

    def upsert(self, entry: FileEntry) -> None:
        """Add ``entry``, replacing any row for the same path."""
        self.files = [f for f in self.files if f.path != entry.path] + [entry]

    def find(self, role: str) -> list[FileEntry]:
        return [f for f in self.files if f.role == role]

    def present(self, folder: Path, role: str) -> list[FileEntry]:
        """Rows of ``role`` whose file is still in ``folder``."""
        return [f for f in self.find(role) if (Path(folder) / f.path).is_file()]

    def mmprojs(self, folder: Path, order: tuple[str, ...] = MMPROJ_RUN_ORDER) -> list[FileEntry]:
        """The folder's mmproj rows whose file is present, best first by type ``order`` (others last), then name."""
        return sorted(self.present(folder, "mmproj"), key=lambda row: (type_rank(row.type, order), row.path))

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "source": self.source,
                "files": [f.to_json() for f in self.files], **self.extra}

    def save(self, folder: Path) -> Path:
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
            data = json.loads(target.read_bytes().decode("utf-8"))
        except FileNotFoundError as exc:
            raise NotFoundError(f"{target} not found; run `medgemma-gguf convert` into {folder} first") from exc
        except IsADirectoryError as exc:
            raise IntegrityError(f"{target} is a folder, not a file; {_fix(target)}") from exc
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"{target} is not UTF-8 text; {_fix(target)}") from exc
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise IntegrityError(f"{target} is not valid JSON ({reason}); {_fix(target)}") from exc
        return cls.from_json(data, target)


def entry_for(folder: Path, file: Path, role: str, type_name: str, **values: Any) -> FileEntry:
    """A manifest row for a finished file, with size and sha256 measured from disk.

    ``values``: ``FileEntry`` fields (``bits_per_weight=…``); other keys go to ``extra``.
    """
    file = Path(file)
    known = {spec.name for spec in fields(FileEntry)} - {"extra", *_REQUIRED}
    return FileEntry(path=file.relative_to(folder).as_posix(), role=role, type=type_name,
                     bytes=file.stat().st_size, sha256=sha256_of(file),
                     **{k: v for k, v in values.items() if k in known},
                     extra={k: v for k, v in values.items() if k not in known})
