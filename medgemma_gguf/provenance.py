"""Provenance: what produced a result, recorded in every evaluation report, ``check`` report and batch output.

One record (:class:`Provenance`) for every command, so a reader can tell whether two results are comparable:
the tool's version, the llama.cpp build (llama-cpp-python's version, ggml's version and commit, the CPU
features compiled in: ``medgemma_gguf.devices.llama_build``), the hardware (the CPU's name and the GPUs
llama.cpp registered), the thread count, every seed used, the sha256 of every input file, and the versions
of torch/transformers where a transformers reference ran.

Input hashes are remembered per file (path + size + mtime) under ``<cache root>/file-hashes`` so a GB-sized
GGUF is hashed once. No command-line arguments are recorded (they may hold a token), and no file content.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import IntegrityError

PROVENANCE_SCHEMA = 1


@dataclass(frozen=True)
class InputHash:
    """One input file: its role ("model", "mmproj", "reference", "slice", "batch input"…), path, sha256, size."""

    role: str
    path: str
    sha256: str
    bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class Provenance:
    """What produced a result (module docstring)."""

    tool_version: str
    llama_cpp: dict[str, str]
    cpu: str
    gpus: tuple[str, ...]
    threads: int | None
    seeds: dict[str, Any]
    inputs: tuple[InputHash, ...]
    python: str
    platform: str
    libraries: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"schema": PROVENANCE_SCHEMA, "tool": "medgemma-gguf", "tool_version": self.tool_version,
                "llama_cpp": dict(self.llama_cpp), "hardware": {"cpu": self.cpu, "gpus": list(self.gpus)},
                "threads": self.threads, "seeds": dict(self.seeds), "inputs": [i.to_json() for i in self.inputs],
                "python": self.python, "platform": self.platform, "libraries": dict(self.libraries),
                "created": self.created}

    @classmethod
    def from_json(cls, data: Any, where: str = "provenance") -> Provenance:
        """Read a record written by :meth:`to_json`; a damaged one names the field."""
        if not isinstance(data, Mapping):
            raise IntegrityError(f"{where} is not an object")
        try:
            hardware = data["hardware"]
            inputs = tuple(InputHash(role=str(i["role"]), path=str(i["path"]), sha256=str(i["sha256"]),
                                     bytes=i.get("bytes")) for i in data["inputs"])
            return cls(tool_version=str(data["tool_version"]), llama_cpp=dict(data["llama_cpp"]),
                       cpu=str(hardware["cpu"]), gpus=tuple(hardware["gpus"]), threads=data.get("threads"),
                       seeds=dict(data.get("seeds") or {}), inputs=inputs, python=str(data.get("python", "")),
                       platform=str(data.get("platform", "")), libraries=dict(data.get("libraries") or {}),
                       created=str(data.get("created", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where} is damaged ({exc!r} missing or malformed)") from exc

    def input(self, role: str) -> InputHash | None:
        """The first input of ``role``, or None."""
        return next((i for i in self.inputs if i.role == role), None)


def hash_cache_dir() -> Path:
    """Where file hashes are remembered (``<cache root>/file-hashes``)."""
    from medgemma_gguf.cache import cache_root

    return cache_root() / "file-hashes"


def hash_input(role: str, path: Path | str) -> InputHash:
    """The :class:`InputHash` of a file (hashed once per path + size + mtime)."""
    from medgemma_gguf.hashing import cached_file_sha256

    path = Path(path)
    folder = hash_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        sha = cached_file_sha256(path, folder)
    except PermissionError:  # a read-only cache: hash without remembering
        from medgemma_gguf.hashing import sha256_of

        sha = sha256_of(path)
    return InputHash(role=role, path=str(path), sha256=sha, bytes=path.stat().st_size)


def hash_folder_input(role: str, folder: Path | str) -> InputHash:
    """The :class:`InputHash` of a checkpoint folder: one sha256 over its weight, config and tokenizer files
    (``medgemma_gguf.hashing.folder_sha256``); ``bytes`` is their total size."""
    from medgemma_gguf.hashing import FOLDER_HASH_PATTERNS, folder_sha256

    folder = Path(folder)
    cache = hash_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    files = {p for pattern in FOLDER_HASH_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return InputHash(role=role, path=str(folder), sha256=folder_sha256(folder, cache),
                     bytes=sum(p.stat().st_size for p in files))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _library_versions(names: Iterable[str]) -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def tool_version() -> str:
    """The installed medgemma-gguf version (the distribution's metadata)."""
    from importlib import metadata

    try:
        return metadata.version("medgemma-gguf")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def collect_provenance(*, threads: int | None, seeds: Mapping[str, Any] | None = None,
                       inputs: Sequence[InputHash] = (), libraries: Sequence[str] = ()) -> Provenance:
    """The provenance of a run on this machine now. ``threads``: the llama.cpp thread count used (None: the
    default, all cores, is recorded as that number); ``libraries``: distributions whose versions matter too
    (``("torch", "transformers")`` when a transformers reference ran)."""
    from dataclasses import asdict

    from medgemma_gguf.devices import gpu_devices, llama_build

    try:
        gpus = tuple(f"{d.description or d.name}" for d in gpu_devices())
    except OSError:
        gpus = ()
    return Provenance(tool_version=tool_version(), llama_cpp=asdict(llama_build()), cpu=cpu_name(), gpus=gpus,
                      threads=threads if threads is not None else max(1, os.cpu_count() or 1),
                      seeds=dict(seeds or {}), inputs=tuple(inputs),
                      python=sys.version.split()[0], platform=platform.platform(),
                      libraries=_library_versions(libraries),
                      created=_dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat())
