"""An output folder's integrity: what ``manifest.json`` records against what is on disk.

* ``verify_folder`` (``medgemma-gguf verify DIR``): re-hashes every file the manifest lists and reports
  what is missing, changed (size or sha256) or extra (on disk, not described), and the temporary files
  of interrupted runs.
* ``check_sizes``: the cheap check ``chat``, ``serve``, ``fit`` and ``eval`` make on load — every file they
  are about to use has the size its row records; otherwise one line pointing to ``verify``.
* Crash safety. A writer records a file's row in the manifest *before* renaming the finished temporary
  file (``.NAME.PID.partial``, ``medgemma_gguf.atomic``) to its name (``record_then_commit``), so a kill
  at any point leaves either the folder as it was plus a temporary file, or a manifest whose row
  already describes the complete temporary file. ``recover_folder`` (run by every command that opens a
  folder) finishes the second case — a dead process's temporary file whose size and sha256 match its
  row is renamed into place — and deletes every other temporary file of a dead process (the pid is in
  the name; a live process's files are left alone). No file ever sits in the folder without a row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import TEMP_SUFFIX
from medgemma_gguf.errors import IntegrityError, NotFoundError
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.manifest import MANIFEST_NAME, FileEntry, Manifest

log = logging.getLogger(__name__)

PARTIAL_NAME = re.compile(rf"^\.(?P<name>.+)\.(?P<pid>\d+){re.escape(TEMP_SUFFIX)}$")
# files a folder may hold besides its manifest's rows: the model card, and the evaluation report folder
COMPANIONS = ("README.md", "Modelfile")  # the model card; export ollama's Modelfile
COMPANION_FOLDERS = ("report",)


def _fix(folder: Path) -> str:
    return f"run `medgemma-gguf verify {folder}` to see what changed"


# --- temporary files of interrupted runs ---------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie counts as dead; another user's process as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


@dataclass(frozen=True)
class PartialFile:
    """A temporary output: ``path`` on disk, the ``final`` path it becomes, the writing process's ``pid``."""

    path: Path
    final: Path
    pid: int

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)


def partial_files(folder: Path) -> list[PartialFile]:
    """Every ``.NAME.PID.partial`` file or folder under ``folder`` (recursively, not into partial folders)."""
    found: list[PartialFile] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted([*dirnames, *filenames]):
            match = PARTIAL_NAME.match(name)
            if match:
                found.append(PartialFile(Path(dirpath) / name, Path(dirpath) / match["name"], int(match["pid"])))
        dirnames[:] = sorted(d for d in dirnames if not PARTIAL_NAME.match(d))
    return found


@dataclass
class Recovery:
    """What ``recover_folder`` did: rows' files it completed, temporary files it deleted (paths relative)."""

    adopted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _matches(path: Path, row: FileEntry) -> bool:
    try:
        return path.is_file() and path.stat().st_size == row.bytes and sha256_of(path) == row.sha256
    except OSError:
        return False


def recover_folder(folder: Path, manifest: Manifest | None = None) -> Recovery:
    """Finish or undo what killed runs left in ``folder`` (module docstring); a read-only folder is left as is.

    ``manifest``: the folder's (loaded when None and present). Nothing is touched while its process lives.
    """
    folder = Path(folder)
    done = Recovery()
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return done
    stale = [p for p in partial_files(folder) if not p.alive]
    if not stale:
        return done
    if manifest is None and (folder / MANIFEST_NAME).is_file():
        with contextlib.suppress(IntegrityError):  # a broken manifest is reported by whoever loads it
            manifest = Manifest.load(folder)
    rows = {row.path: row for row in manifest.files} if manifest is not None else {}
    for partial in stale:
        relative = partial.final.relative_to(folder).as_posix()
        row = rows.get(relative)
        try:
            if (row is not None and partial.path.is_file() and not _matches(partial.final, row)
                    and _matches(partial.path, row)):
                os.replace(partial.path, partial.final)
                done.adopted.append(relative)
                log.info("completed %s, which an interrupted run had written but not renamed", relative)
                continue
            if partial.path.is_dir() and not partial.path.is_symlink():
                shutil.rmtree(partial.path)
            else:
                partial.path.unlink()
            done.removed.append(partial.path.relative_to(folder).as_posix())
            log.info("removed %s, left by an interrupted run (process %d)", partial.path.name, partial.pid)
        except OSError as exc:
            log.warning("cannot clean up %s: %s", partial.path, exc.strerror or exc)
    return done


def open_manifest(folder: Path) -> Manifest:
    """The folder's manifest (``Manifest.for_folder``: discovered from the headers without one), after
    ``recover_folder`` has finished or undone what killed runs left; a warning for each row whose file is
    gone (the commands use the files still present; ``verify`` lists them)."""
    folder = Path(folder)
    recover_folder(folder)
    manifest = Manifest.for_folder(folder)
    if not manifest.discovered:
        for row in manifest.files:
            gone = [p for p in row.part_paths if not (folder / p).is_file()]
            if gone:
                log.warning("%s is listed in %s but missing; %s", folder / gone[0], MANIFEST_NAME, _fix(folder))
    return manifest


def record_then_commit(folder: Path, manifest: Manifest, rows: Iterable[FileEntry], commit: Callable[[], Any]) -> Path:
    """Record ``rows`` (measured from the finished temporary files) in the manifest, save it, then ``commit()``
    (rename the temporary files): the order that keeps every file on disk described (module docstring)."""
    for row in rows:
        manifest.upsert(row)
    target = manifest.save(folder)
    commit()
    return target


# --- cheap checks on load ------------------------------------------------------------------------------


def check_sizes(folder: Path, rows: Sequence[FileEntry]) -> None:
    """IntegrityError naming the first of ``rows`` whose file is missing or has another size than recorded."""
    folder = Path(folder)
    for row in rows:
        for relative, recorded in [(p["path"], p["bytes"]) for p in row.parts] or [(row.path, row.bytes)]:
            path = folder / relative
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise IntegrityError(f"{path} is listed in {folder / MANIFEST_NAME} but missing; "
                                     f"{_fix(folder)}") from None
            except OSError as exc:
                raise IntegrityError(f"cannot read {path} ({exc.strerror}); {_fix(folder)}") from None
            if size != recorded:
                kind = "truncated" if size < recorded else "longer than recorded"
                raise IntegrityError(f"{path} is {size} bytes but {MANIFEST_NAME} records {recorded} ({kind}); "
                                     f"{_fix(folder)}")


def check_file_against_folder(path: Path) -> None:
    """For a GGUF given by path: when its folder's manifest lists it, check its size (``check_sizes``).

    A folder without a manifest, or a manifest that does not list the file, is not checked; a manifest
    that cannot be read is logged as a warning (the file itself may still be fine to use).
    """
    path = Path(path)
    folder = path.parent
    if not (folder / MANIFEST_NAME).is_file():
        return
    try:
        manifest = Manifest.load(folder)
    except IntegrityError as exc:
        log.warning("cannot check %s against its folder's manifest: %s", path.name, exc)
        return
    rows = [row for row in manifest.files if (folder / row.path) == path]
    check_sizes(folder, rows)


# --- verify --------------------------------------------------------------------------------------------


@dataclass
class FileCheck:
    """One row's state: ``status`` "ok", "missing" or "changed" (``detail`` says how)."""

    path: str
    status: str
    detail: str = ""


@dataclass
class VerifyReport:
    """``medgemma-gguf verify``'s findings; ``ok`` when every listed file is present and unchanged."""

    folder: Path
    files: list[FileCheck]
    extra: list[str]
    partial: list[tuple[str, bool]]  # (relative path, its process still running)

    @property
    def ok(self) -> bool:
        return all(f.status == "ok" for f in self.files)

    def count(self, status: str) -> int:
        return sum(f.status == status for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "ok": self.ok,
                "files": [{"path": f.path, "status": f.status, "detail": f.detail} for f in self.files],
                "extra": self.extra,
                "partial": [{"path": p, "process_running": alive} for p, alive in self.partial]}


def described_paths(manifest: Manifest) -> set[str]:
    """Paths (relative) the manifest describes: its rows (every part of a split model) and the files rows
    name (an AUTO mix's recipe)."""
    paths = {path for row in manifest.files for path in row.part_paths}
    for row in manifest.files:
        recipe_file = (row.auto or {}).get("recipe_file")
        if isinstance(recipe_file, str):
            paths.add(recipe_file)
    return paths


def extra_files(folder: Path, manifest: Manifest) -> list[str]:
    """Files in ``folder`` that the manifest does not describe (not its companions, not temporary files)."""
    folder = Path(folder)
    described = described_paths(manifest) | {MANIFEST_NAME, *COMPANIONS}
    extra = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here == folder:
            dirnames[:] = [d for d in dirnames if d not in COMPANION_FOLDERS]
        dirnames[:] = sorted(d for d in dirnames if not PARTIAL_NAME.match(d))
        for name in sorted(filenames):
            relative = (here / name).relative_to(folder).as_posix()
            if PARTIAL_NAME.match(name) or relative in described:
                continue
            extra.append(relative)
    return extra


def _recorded(row: FileEntry) -> list[tuple[str, int, str]]:
    """(path, bytes, sha256) of each file of ``row``: its parts, or itself."""
    return [(p["path"], p["bytes"], p["sha256"]) for p in row.parts] or [(row.path, row.bytes, row.sha256)]


def verify_folder(folder: Path, *, progress: bool = True) -> VerifyReport:
    """Re-hash every file ``manifest.json`` lists (a progress bar over the bytes) and compare (module docstring).

    Every part of a split model is a file of its own here. NotFoundError without a manifest; IntegrityError
    naming the field when it breaks the schema.
    """
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is not a folder; pass an output folder of medgemma-gguf convert")
    if not (folder / MANIFEST_NAME).exists():
        raise NotFoundError(f"{folder} has no {MANIFEST_NAME}, so nothing records what its files should be; verify "
                            "checks folders written by medgemma-gguf convert/quantize")
    manifest = Manifest.load(folder)
    checks: list[FileCheck] = []
    to_hash: list[tuple[FileCheck, Path, str]] = []
    total = 0
    for row in manifest.files:
        for relative, recorded, digest in _recorded(row):
            path = folder / relative
            try:
                size = path.stat().st_size if path.is_file() else None
            except OSError:
                size = None
            if size is None:
                checks.append(FileCheck(relative, "missing", "listed in the manifest, not on disk"))
            elif size != recorded:
                checks.append(FileCheck(relative, "changed", f"{size} bytes, the manifest records {recorded}"))
            else:
                check = FileCheck(relative, "ok")
                checks.append(check)
                to_hash.append((check, path, digest))
                total += size
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verifying", disable=not progress,
              leave=False) as bar:
        for check, path, digest in to_hash:
            try:
                if sha256_of(path, on_progress=bar.update) != digest:
                    check.status, check.detail = "changed", "same size, different sha256"
            except OSError as exc:
                check.status, check.detail = "missing", f"cannot be read ({exc.strerror or exc})"
    partial = [(p.path.relative_to(folder).as_posix(), p.alive) for p in partial_files(folder)]
    return VerifyReport(folder, checks, extra_files(folder, manifest), partial)
