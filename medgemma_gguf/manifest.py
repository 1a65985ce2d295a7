"""``manifest.json``: what an output folder holds, written atomically and read back by every part."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgemma_gguf import quant_types
from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.errors import UserError
from medgemma_gguf.hashing import sha256_of

MANIFEST_NAME = "manifest.json"
# mmproj types, best first: to run with (F16 is what llama.cpp's tools default to), and to evaluate with
MMPROJ_RUN_ORDER = quant_types.MMPROJ_RUN_ORDER
MMPROJ_PRECISION_ORDER = quant_types.MMPROJ_PRECISION_ORDER


@dataclass
class FileEntry:
    """One output file: ``path`` is relative to the manifest's folder."""

    path: str
    role: str  # "text" | "mmproj" | "imatrix"
    type: str
    bytes: int
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(row.pop("extra"))
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> FileEntry:
        known = {k: row[k] for k in ("path", "role", "type", "bytes", "sha256")}
        extra = {k: v for k, v in row.items() if k not in known}
        return cls(**known, extra=extra)


def type_rank(type_name: str, order: tuple[str, ...]) -> int:
    """Position of ``type_name`` (any case) in a best-first ``order``; types not in it rank last."""
    kind = type_name.upper()
    return order.index(kind) if kind in order else len(order)


@dataclass
class Manifest:
    """The manifest of one output folder."""

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
        return {"model": self.model, "source": self.source, "files": [f.to_json() for f in self.files],
                **self.extra}

    def save(self, folder: Path) -> Path:
        target = Path(folder) / MANIFEST_NAME
        write_text_atomic(target, json.dumps(self.to_json(), indent=2) + "\n")
        return target

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        target = Path(folder) / MANIFEST_NAME
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise UserError(f"{target} not found; run `medgemma-gguf convert` into {folder} first") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"{target} is not valid JSON ({exc.msg}); re-run convert with --force") from exc
        extra = {k: v for k, v in data.items() if k not in ("model", "source", "files")}
        return cls(model=data["model"], source=data["source"],
                   files=[FileEntry.from_json(r) for r in data.get("files", [])], extra=extra)


def entry_for(folder: Path, file: Path, role: str, type_name: str, **extra: Any) -> FileEntry:
    """A manifest row for a finished file, with size and sha256 measured from disk."""
    file = Path(file)
    return FileEntry(path=str(file.relative_to(folder)), role=role, type=type_name,
                     bytes=file.stat().st_size, sha256=sha256_of(file), extra=extra)
