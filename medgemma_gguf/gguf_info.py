"""Read a GGUF file's header: metadata, tensor names, ggml types and shapes — never the weights.

The header is parsed here with the ``gguf`` package's type tables (``GGUFValueType``,
``GGMLQuantizationType``, ``GGML_QUANT_SIZES``) rather than with ``gguf.GGUFReader``: the reader builds
a numpy view for every string of the tokenizer vocabulary, which took 16 s for Gemma 3's 262k tokens on
a 2-core machine, where this parser skips them in a fraction of a second. It also never touches the
tensor data, so a file whose data section is missing or sparse reads the same.

Tensor sizes are computed from the ggml type's block layout (elements per block, bytes per block), not
from file offsets, so they are the bytes llama.cpp allocates for the tensor in a backend buffer.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from medgemma_gguf.errors import UserError

# metadata arrays longer than this (tokenizer vocabularies, merges, scores) are skipped, not converted
MAX_ARRAY_ITEMS = 4096
GGML_MAX_DIMS = 4

_VT = gguf.GGUFValueType
_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it. ``shape`` is in ggml order: ``shape[0]`` is the row length."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int = field(default=0, compare=False)  # where the tensor's data starts in the file (bytes)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.shape)


@dataclass(frozen=True)
class GgufInfo:
    """The header of one GGUF file. Metadata arrays longer than MAX_ARRAY_ITEMS are stored as None."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture") or "")

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor called ``name``, or None."""
        for info in self.tensors:
            if info.name == name:
                return info
        return None

    @property
    def total_tensor_bytes(self) -> int:
        return sum(info.n_bytes for info in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """The file's bits per weight (see :func:`bits_per_weight`)."""
        return bits_per_weight(self.tensors)

    def quantizable_type_counts(self) -> dict[str, int]:
        """How many quantizable tensors (see :func:`is_quantizable`) have each ggml type, by type name."""
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            if is_quantizable(tensor.name, tensor.shape):
                counts[tensor.ggml_type.name] = counts.get(tensor.ggml_type.name, 0) + 1
        return dict(sorted(counts.items()))


def is_quantizable(name: str, shape: tuple[int, ...] | list[int]) -> bool:
    """Whether llama.cpp's quantizer may change this tensor's type: a 2-D+ ``*.weight`` that is no norm."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def bits_per_weight(tensors: Any) -> float:
    """Bits per weight, the project's one definition: 8 × bytes / elements over the quantizable tensors.

    The 1-D norms (always F32) are left out, so a Q4_K_M file reads near llama.cpp's ~4.8 whatever the
    model's size; the file size (``bytes`` in manifests and reports) includes everything.
    """
    chosen = [t for t in tensors if is_quantizable(t.name, t.shape)]
    elements = sum(t.n_elements for t in chosen)
    return 8 * sum(t.n_bytes for t in chosen) / elements if elements else 0.0


def tensor_nbytes(ggml_type: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``ggml_type`` and ggml ``shape``: rows × (row length / block size) × block bytes."""
    try:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    except KeyError as exc:
        raise UserError(f"unknown ggml tensor type {ggml_type!r}; update the gguf package") from exc
    row_length = shape[0] if shape else 1
    if row_length % block_size:
        raise UserError(
            f"a {gguf.GGMLQuantizationType(ggml_type).name} row of {row_length} elements is not a multiple of "
            f"its block size {block_size}; the file is corrupt — re-convert or re-quantize it"
        )
    n_rows = math.prod(shape[1:]) if len(shape) > 1 else 1
    return n_rows * (row_length // block_size) * block_bytes


class _HeaderCursor:
    """Sequential little-endian reads over a memory-mapped GGUF header."""

    def __init__(self, buffer: mmap.mmap):
        self.buffer = buffer
        self.offset = 0

    def unpack(self, fmt: str) -> Any:
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self, keep: bool = True) -> str | None:
        length = self.unpack("Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = bytes(self.buffer[self.offset : end]).decode("utf-8") if keep else None
        self.offset = end
        return text

    def value(self, value_type: int) -> Any:
        value_type = _VT(value_type)
        if value_type == _VT.STRING:
            return self.string()
        if value_type == _VT.ARRAY:
            item_type = _VT(self.unpack("I"))
            count = self.unpack("Q")
            keep = count <= MAX_ARRAY_ITEMS
            if item_type == _VT.STRING:
                items = [self.string(keep) for _ in range(count)]
            elif item_type == _VT.ARRAY:
                items = [self.value(_VT.ARRAY) for _ in range(count)]
            else:
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize("<" + fmt) * count
                if self.offset + size > len(self.buffer):
                    raise ValueError("an array runs past the end of the file")
                items = list(struct.unpack_from(f"<{count}{fmt}", self.buffer, self.offset)) if keep else []
                self.offset += size
            return items if keep else None
        return self.unpack(_SCALAR_FORMATS[value_type])


def _parse_header(path: Path, buffer: mmap.mmap) -> GgufInfo:
    cursor = _HeaderCursor(buffer)
    cursor.offset = 4  # magic
    version = cursor.unpack("I")
    if version not in (2, 3):
        if version >= 1 << 16:
            raise UserError(f"{path} is a big-endian GGUF; re-convert it for a little-endian machine")
        raise UserError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported — re-convert it")
    n_tensors, n_kv = cursor.unpack("QQ")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("I"))
    tensors = []
    offsets: list[int] = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("I")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        shape = cursor.unpack(f"{n_dims}Q") if n_dims > 1 else (cursor.unpack("Q"),)
        ggml_type = gguf.GGMLQuantizationType(cursor.unpack("I"))
        offsets.append(cursor.unpack("Q"))  # relative to the aligned start of the data section
        tensors.append(TensorInfo(name=name, ggml_type=ggml_type, shape=tuple(int(dim) for dim in shape)))
    alignment = int(metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-cursor.offset // alignment) * alignment
    tensors = [TensorInfo(t.name, t.ggml_type, t.shape, data_start + offset) for t, offset in zip(tensors, offsets,
                                                                                                    strict=True)]
    return GgufInfo(path=path, version=version, metadata=metadata, tensors=tuple(tensors))


def read_gguf_info(path: Path | str) -> GgufInfo:
    """Read the header of the GGUF file at ``path``; UserError if it is missing or not a readable GGUF."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}; check the path")
    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _parse_header(path, buffer)
    except UserError:
        raise
    except (struct.error, ValueError, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise UserError(f"cannot read the GGUF header of {path} ({exc}); the file is truncated or corrupt") from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check the file's permissions") from exc
