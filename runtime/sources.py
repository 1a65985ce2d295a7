"""Where a volume or a slide comes from: a local path (only where allowed) or inline base64 bytes, read safely.

* Local paths. ``check_local_path`` accepts a path when local files are allowed (the CLI and the Python API
  by default) or when it lies inside one of the allowed roots (``serve --allow-dir``): the path is resolved
  (symlinks followed, ``..`` removed) before the containment test, so a link inside a root that points out of
  it is refused. Walking a series folder applies the same test to every file (``walk_files``). A single
  file is read with ``read_regular_file``: regular files only (no device, FIFO or socket is opened), size
  checked before reading, containment checked again on the opened descriptor.
* Inline bytes. ``decode_payload`` takes raw base64 or a ``data:...;base64,`` URI.
* Zip archives (a DICOM series sent as one file). Members are read into memory one at a time and never
  extracted, so a member name cannot write anywhere (zip-slip); names that are absolute or climb out with
  ``..`` are refused all the same. Zip bombs are refused from the central directory before anything is
  inflated: too many members, a member or a total declared size over the limits, or a member over 1 MiB
  claiming a compression ratio above 100:1 (image slices deflate a few times; a bomb about 1000 times) —
  what zipfile inflates never exceeds the declared size (it stops there and the CRC check fails), so the
  declared sizes bound the memory: one member at a time.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import re
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from medgemma_gguf.errors import AccessError, InputError, NotFoundError, ResourceError, setting

MiB = 1024**2
GiB = 1024**3
_DATA_URI = re.compile(r"data:(?P<media>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<payload>.*)", re.DOTALL)


@dataclass(frozen=True)
class ArchiveLimits:
    """What a zip archive may declare before anything in it is read."""

    max_members: int = 20_000
    max_member_bytes: int = 256 * MiB
    max_total_bytes: int = 16 * GiB
    max_ratio: float = 100.0  # for members over 1 MiB: real slices deflate a few times, a bomb ~1000 times


DEFAULT_ARCHIVE_LIMITS = ArchiveLimits()
# Server defaults: a CT study as the notebooks send it (85 slices; the pathology notebook asks for 125 images),
# and a body that holds an 85-slice 512x512 16-bit series zipped and base64-encoded (~60 MB), with room for
# larger headers.
DEFAULT_MAX_IMAGES = 128
DEFAULT_MAX_BODY_BYTES = 80 * MiB
MAX_FOLDER_FILES = 20_000
DEFAULT_MAX_FILE_BYTES = 1 * GiB  # one image file read from a path (the CLI and the Python API)


def _check_no_nul(text: str | bytes, what: str) -> None:
    """InputError for a path with a NUL character (no file has one; the OS calls would raise ValueError)."""
    if (b"\0" in text) if isinstance(text, bytes) else ("\0" in text):
        raise InputError(f"{what} path {text!r:.80} contains a NUL character; pass a real path")


def within(path: Path, roots: Sequence[Path]) -> bool:
    """True when the resolved ``path`` is one of ``roots`` (resolved) or lies below one."""
    resolved = Path(os.path.realpath(path))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if resolved == real_root or real_root in resolved.parents:
            return True
    return False


def check_local_path(path: str | os.PathLike[str], *, what: str, allow_local_files: bool,
                     allowed_roots: Sequence[Path] = ()) -> Path:
    """``path`` as a Path when it may be read here; AccessError otherwise, NotFoundError when it is missing."""
    text = os.fspath(path)
    _check_no_nul(text, what)
    if text.startswith("file://"):
        text = text[len("file://"):]
    candidate = Path(text).expanduser()
    if not allow_local_files and not (allowed_roots and within(candidate, allowed_roots)):
        if allowed_roots:
            raise AccessError(f"{what} path {candidate} is outside the allowed folders; put it under one of "
                              f"{setting('allow_dir')} or send it inline as base64 'data'")
        raise AccessError(f"local {what} paths are not allowed here; send it inline as base64 'data' (paths are "
                          f"accepted only with {setting('allow_local_files')} or under {setting('allow_dir')})")
    if not candidate.exists():
        raise NotFoundError(f"{what} {candidate} does not exist; check the path")
    if not (candidate.is_file() or candidate.is_dir()):
        raise InputError(f"{what} {candidate} is not a regular file or folder (a device, FIFO or socket); pass a "
                         "file or folder")
    return candidate


def read_regular_file(path: str | os.PathLike[str], *, what: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                      allowed_roots: Sequence[Path] = ()) -> bytes:
    """The bytes of a regular file, checked before anything is read.

    Symlinks are resolved first; with ``allowed_roots`` the real path must lie under one of them, checked
    again on the opened descriptor (a link swapped in between is caught). Devices, FIFOs and sockets are
    refused from ``stat`` without being opened (``/dev/zero`` never streams, a FIFO never blocks), and a
    file over ``max_bytes`` is refused from its size. Errors: NotFoundError, AccessError, InputError,
    ResourceError, each naming the path and the fix.
    """
    shown = os.fspath(path)
    _check_no_nul(shown, what)
    real = os.path.realpath(shown)
    if allowed_roots and not within(Path(real), allowed_roots):
        raise AccessError(f"{what} path {shown} is outside the allowed folders; put it under one of "
                          f"{setting('allow_dir')} or send it inline")
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise NotFoundError(f"{what} file {shown} does not exist; check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} file {shown}: {exc.strerror}; check the path") from None
    _check_regular(info, shown, what, max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise NotFoundError(f"{what} file {shown} does not exist; check the path") from None
    except PermissionError:
        raise AccessError(f"{what} file {shown} is not readable (permission denied); fix its permissions") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AccessError(f"{what} file {shown} was replaced by a link while it was opened; pass a stable "
                              "file") from None
        raise InputError(f"cannot read {what} file {shown}: {exc.strerror}; check the path") from None
    try:
        _check_regular(os.fstat(fd), shown, what, max_bytes)
        fd_link = f"/proc/self/fd/{fd}"
        if allowed_roots and os.path.islink(fd_link) and not within(Path(os.readlink(fd_link)), allowed_roots):
            raise AccessError(f"{what} path {shown} is outside the allowed folders; put it under one of "
                              f"{setting('allow_dir')} or send it inline")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise ResourceError(f"{what} file {shown} grew past the limit of {max_bytes} bytes while it was "
                                    "read; pass a finished file")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"cannot read {what} file {shown}: {exc.strerror}; check the path") from None
    finally:
        os.close(fd)


def _check_regular(info: os.stat_result, shown: str, what: str, max_bytes: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what} path {shown} is a directory; pass a file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} path {shown} is not a regular file (a device, FIFO or socket); pass a file")
    if info.st_size > max_bytes:
        raise ResourceError(f"{what} file {shown} is {info.st_size} bytes, more than the limit of {max_bytes}; "
                            "pass a smaller file")


def walk_files(folder: Path, *, allowed_roots: Sequence[Path] = (), limit: int = MAX_FOLDER_FILES) -> list[Path]:
    """The regular files under ``folder`` (recursively, sorted, hidden names skipped; symlinked folders not
    followed). With ``allowed_roots``, a file whose real path leaves them is refused."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            if allowed_roots and not within(path, allowed_roots):
                raise AccessError(f"{path} links outside the allowed folders; remove the link or copy the file in")
            files.append(path)
            if len(files) > limit:
                raise ResourceError(f"{folder} holds more than {limit} files; pass the folder of one series")
    return files


def decode_payload(data: object, *, what: str) -> bytes:
    """Bytes from base64 text or a ``data:<type>;base64,<payload>`` URI; InputError naming the problem."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if not isinstance(data, str) or not data.strip():
        raise InputError(f"the {what} 'data' must be base64 text (or a data: URI); got {type(data).__name__}")
    text = data.strip()
    if text[:5].lower() == "data:":
        match = _DATA_URI.fullmatch(text)
        if match is None or "base64" not in match["params"].lower():
            raise InputError(f"the {what} 'data' is a data: URI that is not base64; send 'data:<type>;base64,...'")
        text = match["payload"]
    payload = "".join(text.split())
    payload += "=" * (-len(payload) % 4)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"the {what} 'data' is not valid base64 ({exc}); encode the file's bytes with base64") from exc
    if not raw:
        raise InputError(f"the {what} 'data' is empty; send the file's bytes")
    return raw


class Archive:
    """A zip file (path or bytes) whose members are read one at a time, with the bomb and slip checks above."""

    def __init__(self, source: Path | bytes, label: str, limits: ArchiveLimits = DEFAULT_ARCHIVE_LIMITS):
        self.label = label
        try:
            self._zip = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise InputError(f"{label} is not a readable zip archive ({exc}); zip the series folder again") from exc
        members = [info for info in infos if not info.is_dir()]
        if len(members) > limits.max_members:
            raise ResourceError(f"{label} holds {len(members)} files, more than the limit of {limits.max_members}; "
                                "zip one series")
        total = 0
        for info in members:
            name = info.filename.replace("\\", "/")
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
                raise InputError(f"{label} has a member named {info.filename!r} that points outside the archive; "
                                 "zip the files with relative names")
            if info.file_size > limits.max_member_bytes:
                raise ResourceError(f"{label}: member {info.filename!r} unpacks to {info.file_size} bytes, more than "
                                    f"the limit of {limits.max_member_bytes}; this is not a slice file")
            if info.file_size > MiB and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise ResourceError(f"{label}: member {info.filename!r} claims a compression ratio of "
                                    f"{info.file_size / max(info.compress_size, 1):.0f}:1 (a zip bomb); refusing it")
            total += info.file_size
        if total > limits.max_total_bytes:
            raise ResourceError(f"{label} unpacks to {total} bytes, more than the limit of {limits.max_total_bytes}; "
                                "zip one series")
        self.members = [info for info in members if not Path(info.filename).name.startswith(".")]

    def names(self) -> list[str]:
        return [info.filename for info in self.members]

    def read(self, name: str) -> bytes:
        """One member's bytes (at most its declared size)."""
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError) as exc:
            raise InputError(f"{self.label}: cannot read member {name!r} ({exc}); zip the series again") from exc

    def open(self, name: str) -> IO[bytes]:
        """A seekable stream of one member: a header scan inflates only what it reads."""
        try:
            return self._zip.open(name)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError) as exc:
            raise InputError(f"{self.label}: cannot read member {name!r} ({exc}); zip the series again") from exc

    def close(self) -> None:
        self._zip.close()
