"""Lazy access to a checkpoint's safetensors: shapes and dtypes up front, data one tensor at a time.

Both layouts are read: a single ``model.safetensors`` and sharded ``model-0000x-of-0000y.safetensors``
files with ``model.safetensors.index.json``.  Files are memory-mapped by ``safetensors``; a tensor's
bytes are only touched when :meth:`Checkpoint.load` is called for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from medgemma_gguf.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor is and what it looks like, without its data."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "BF16", "F16", "F32", …

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def read_weight_map(index_path: Path) -> dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name.

    Shard names must stay inside the checkpoint folder: relative, without ``..`` (a Hub snapshot's
    shards are symlinks into the cache's blobs, so names are checked as written, not resolved).
    """
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{index_path} is not a valid safetensors index (not JSON); re-download it") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in weight_map.items()):
        raise UserError(f"{index_path} is not a valid safetensors index (no 'weight_map' of tensor names to shard "
                        "files); re-download it")
    for name in sorted(set(weight_map.values())):
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name) or "\0" in name:
            raise UserError(f"{index_path} names shard {name!r}, which is outside the checkpoint folder; "
                            "re-download the checkpoint (shards live beside the index)")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, validated against its index when sharded."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = read_weight_map(index_path)
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{folder} is missing weight shard(s) {', '.join(missing)} listed in {INDEX_NAME}; "
                            "re-download the checkpoint (the Hub download resumes)")
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return [folder / name for name in others]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise UserError(f"{folder} has only PyTorch .bin/.pth weights; save the model with safetensors "
                        "(model.save_pretrained(..., safe_serialization=True)) and convert that")
    raise UserError(f"no model weights (*.safetensors) in {folder}; point convert at a complete checkpoint folder")


class Checkpoint:
    """The tensors of a checkpoint folder, opened lazily."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles: dict[Path, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in weight_files(self.folder):
            handle = self._open(file)
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if name in self.tensors:
                    raise UserError(f"tensor {name} appears in both {self.tensors[name].file.name} and "
                                    f"{file.name}; the checkpoint is inconsistent, re-download it")
                piece = handle.get_slice(name)
                self.tensors[name] = TensorInfo(name, file, tuple(piece.get_shape()), piece.get_dtype())
        self._check_index()

    def _open(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises SafetensorError, a plain Exception subclass
                raise UserError(f"{file} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                                "it is probably truncated: delete it and download again") from exc
        return self._handles[file]

    def _check_index(self) -> None:
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            return
        weight_map = read_weight_map(index_path)
        absent = sorted(set(weight_map) - set(self.tensors))
        if absent:
            raise UserError(f"{len(absent)} tensor(s) listed in {INDEX_NAME} are missing from the shards "
                            f"(first: {absent[0]}); re-download the checkpoint")

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def load(self, name: str) -> Any:
        """The tensor's data as a torch tensor (memory-mapped source, copied only on conversion)."""
        info = self.tensors[name]
        try:
            return self._open(info.file).get_tensor(name)
        except Exception as exc:
            raise UserError(f"cannot read tensor {name} from {info.file} ({str(exc).splitlines()[0]}); "
                            "the file is damaged: delete it and download again") from exc
