"""Atomic output files: written under a temporary name, renamed only when complete."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from medgemma_gguf.errors import UserError, setting

TEMP_SUFFIX = ".partial"


def temp_path_for(final: Path) -> Path:
    """The temporary name used while ``final`` is being written (same folder, so rename is atomic)."""
    return final.with_name(f".{final.name}.{os.getpid()}{TEMP_SUFFIX}")


def check_can_write(final: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless ``force``; check the folder is writable."""
    if final.exists() and not force:
        raise UserError(f"{final} already exists; pass {setting('force')} to overwrite it or choose another "
                        f"{setting('outdir')}")
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {folder}: {exc.strerror}; choose a writable --outdir") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable; choose a writable --outdir")


@contextlib.contextmanager
def atomic_output(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``final``, on any failure delete it."""
    final = Path(final)
    check_can_write(final, force)
    tmp = temp_path_for(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(final: Path, text: str, force: bool = True) -> None:
    """Write a small text file atomically."""
    with atomic_output(final, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")


class StagedOutputs:
    """Several output files that appear together or not at all.

    ``stage(final)`` returns a temporary path to write; ``commit()`` renames every staged file to its
    final name; leaving the ``with`` block without ``commit()`` (an error, Ctrl-C) deletes the temporary
    files, so the folder keeps what it had before.
    """

    def __init__(self, force: bool = False):
        self.force = force
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, final: Path) -> Path:
        final = Path(final)
        check_can_write(final, self.force)
        tmp = temp_path_for(final)
        self._staged.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._staged:
            os.replace(tmp, final)
        self._staged.clear()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged.clear()


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it becomes ``final``, on failure it is removed.

    ``final`` must not exist or be an empty folder (UserError otherwise), so nothing the user had is lost.
    """
    import shutil

    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UserError(f"{final} already exists and is not an empty folder; delete it or choose another one")
    partial = temp_path_for(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write in {final.parent}: {exc.strerror}; choose a writable folder") from exc
    try:
        yield partial
        if final.exists():
            final.rmdir()
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
