"""Read a GGUF file's header: metadata, tensor names, ggml types and shapes — never the weights.

The header is parsed here with the ``gguf`` package's type tables (``GGUFValueType``,
``GGMLQuantizationType``, ``GGML_QUANT_SIZES``) rather than with ``gguf.GGUFReader``: the reader builds
a numpy view for every string of the tokenizer vocabulary, which took 16 s for Gemma 3's 262k tokens on
a 2-core machine, where this parser skips them in a fraction of a second. It also never touches the
tensor data, so a file whose data section is missing or sparse reads the same (``check_complete`` says
whether the data is all there).

Tensor sizes are computed from the ggml type's block layout (elements per block, bytes per block), not
from file offsets, so they are the bytes llama.cpp allocates for the tensor in a backend buffer.

Split models. llama.cpp's split format (``gguf-split``, ``convert_hf_to_gguf.py --split-max-size``) puts a
model in ``NAME-00001-of-0000N.gguf`` … ``NAME-0000N-of-0000N.gguf``; each part carries ``split.no``
(0-based), ``split.count`` and ``split.tensors.count`` (all parts' tensors), and only the first part the
other metadata. ``read_gguf_info`` of a first part reads every part (their names are derived as
llama.cpp's ``llama_split_path`` derives them) and describes the whole model: the first part's metadata,
every part's tensors. A missing, mislabelled or unreadable part is an ``IntegrityError`` naming it.

Quant type. ``quant_label`` reads a file's quantization from its header, never from its name: this
project's own ``medgemma_gguf.quant`` key (recipes such as ``UD-Q4_K_XL``), else ``general.file_type``
(llama.cpp's mix: ``Q4_K_M``, ``F16``, …), else the ggml type holding most of the quantizable weights.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from medgemma_gguf.errors import IntegrityError, MismatchError, UserError, setting
from medgemma_gguf.quant_types import FILE_TYPES

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
    """The header of one GGUF file, or of a whole split model (see the module docstring). Metadata arrays
    longer than MAX_ARRAY_ITEMS are stored as None.

    ``data_end``: the byte where the file's last tensor ends (the least size of a complete file);
    ``parts``: every part of a split model, first part first (empty for a single file).
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_end: int = 0
    parts: tuple[GgufInfo, ...] = field(default=(), repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture") or "")

    @property
    def kind(self) -> str:
        """What the file is, from its header: ``text`` (a language model), ``mmproj`` (a vision projector),
        ``imatrix`` (an importance matrix) or ``adapter`` (a LoRA adapter)."""
        declared = str(self.metadata.get("general.type") or "")
        if declared == "imatrix" or "imatrix.chunk_count" in self.metadata:
            return "imatrix"
        if declared == "adapter":
            return "adapter"
        if self.architecture == "clip" or declared in ("mmproj", "projector"):
            return "mmproj"
        return "text"

    @property
    def paths(self) -> tuple[Path, ...]:
        """The files that hold the model: its parts, or the file itself."""
        return tuple(part.path for part in self.parts) or (self.path,)

    @property
    def file_bytes(self) -> int:
        """Bytes on disk, all parts together."""
        return sum(path.stat().st_size for path in self.paths)

    @property
    def quant_type(self) -> str:
        """The file's quantization, read from its header (``quant_label``)."""
        return quant_label(self.metadata, self.tensors)

    def check_complete(self) -> None:
        """IntegrityError naming the file when it (or a part) is shorter than its tensors need: a download or
        copy that stopped early."""
        for part in self.parts or (self,):
            size = part.path.stat().st_size
            if size < part.data_end:
                raise IntegrityError(f"{part.path} is truncated ({size:,} of {part.data_end:,} bytes); download or "
                                     "write it again")

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

    def name(self) -> str:
        """A key or tensor name (always kept)."""
        return self.string() or ""

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
        key = cursor.name()
        metadata[key] = cursor.value(cursor.unpack("I"))
    tensors = []
    offsets: list[int] = []
    for _ in range(n_tensors):
        name = cursor.name()
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
    data_end = max((t.offset + t.n_bytes for t in tensors), default=data_start)
    return GgufInfo(path=path, version=version, metadata=metadata, tensors=tuple(tensors), data_end=data_end)


def read_gguf_header(path: Path | str) -> GgufInfo:
    """Read the header of the one GGUF file at ``path`` (a split model's part alone); UserError if it is missing
    or not a readable GGUF."""
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


# --- split models -------------------------------------------------------------------------------------
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
KEY_SPLIT_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO
KEY_SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT
KEY_SPLIT_TENSORS = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT


def split_part_name(prefix: str, number: int, count: int) -> str:
    """``PREFIX-0000i-of-0000N.gguf`` for part ``number`` (1-based), as llama.cpp's ``llama_split_path``."""
    return f"{prefix}-{number:05d}-of-{count:05d}.gguf"


def read_gguf_info(path: Path | str) -> GgufInfo:
    """The header of the GGUF model at ``path``: one file, or every part of a split model when ``path`` is its
    first part (see the module docstring). UserError if a file is missing or unreadable; IntegrityError for
    a split model whose parts do not belong together."""
    first = read_gguf_header(path)
    count = first.metadata.get(KEY_SPLIT_COUNT) or 1
    if count <= 1:
        return first
    number = int(first.metadata.get(KEY_SPLIT_NO) or 0)
    match = SPLIT_NAME.match(first.path.name)
    if number != 0:
        start = split_part_name(match.group("prefix"), 1, count) if match else "its first part"
        raise UserError(f"{first.path.name} is part {number + 1} of a {count}-part model; pass {start} (llama.cpp "
                        "loads the other parts from it)")
    if match is None or int(match.group("no")) != 1 or int(match.group("count")) != count:
        raise IntegrityError(f"{first.path} is part 1 of {count} but its name does not end in "
                             f"-00001-of-{count:05d}.gguf, so llama.cpp cannot find the other parts; rename the parts "
                             "as gguf-split names them")
    parts = [first]
    for i in range(2, count + 1):
        sibling = first.path.with_name(split_part_name(match.group("prefix"), i, count))
        if not sibling.is_file():
            raise IntegrityError(f"{sibling.name} is missing: {first.path.name} is part 1 of {count}; put every part "
                                 f"in {first.path.parent} (download or copy it again)")
        try:
            part = read_gguf_header(sibling)
        except IntegrityError:
            raise
        except UserError as exc:
            raise IntegrityError(f"part {i} of {count} of {first.path.name} is damaged: {exc}") from exc
        if part.metadata.get(KEY_SPLIT_NO) != i - 1 or part.metadata.get(KEY_SPLIT_COUNT) != count:
            raise IntegrityError(f"{sibling} says it is part {(part.metadata.get(KEY_SPLIT_NO) or 0) + 1} of "
                                 f"{part.metadata.get(KEY_SPLIT_COUNT) or 1}, not {i} of {count}; the parts come from "
                                 "different splits — download or write them again")
        parts.append(part)
    tensors = tuple(t for part in parts for t in part.tensors)
    expected = first.metadata.get(KEY_SPLIT_TENSORS)
    if expected is not None and expected != len(tensors):
        raise IntegrityError(f"the {count} parts of {first.path.name} hold {len(tensors)} tensors but the split "
                             f"records {expected}; download or write the parts again")
    return GgufInfo(path=first.path, version=first.version, metadata=first.metadata, tensors=tensors,
                    data_end=first.data_end, parts=tuple(parts))


# --- what a file holds ------------------------------------------------------------------------------------
_GUESSED = 1024  # llama.cpp's LLAMA_FTYPE_GUESSED flag


def quant_label(metadata: dict[str, Any], tensors: Any) -> str:
    """A file's quantization from its header (see the module docstring): ``Q4_K_M``, ``UD-Q4_K_XL``, ``F16`` …"""
    own = metadata.get("medgemma_gguf.quant")
    if isinstance(own, str) and own:
        return own
    ftype = metadata.get("general.file_type")
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        ftype &= ~_GUESSED
        for row in FILE_TYPES:
            if row.ftype == ftype:
                return row.name
        try:
            return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    weights: dict[str, int] = {}
    for tensor in tensors:
        if is_quantizable(tensor.name, tensor.shape):
            weights[tensor.ggml_type.name] = weights.get(tensor.ggml_type.name, 0) + tensor.n_elements
    return max(weights, key=lambda name: weights[name]) if weights else "unknown"


def check_model_pair(model_path: Path, mmproj_path: Path | None) -> None:
    """Refuse a text GGUF that is not Gemma 3, and an mmproj that is not Gemma 3's or belongs to another model.

    Checked from the headers, before anything is loaded: the mmproj's ``clip.vision.projection_dim`` must
    equal the text model's ``gemma3.embedding_length`` and its projector type must be ``gemma3``.
    """
    text = read_gguf_info(model_path)
    if text.kind == "mmproj":
        raise UserError(f"{model_path} is an mmproj (vision) file; pass the text model as the model and this as "
                        f"{setting('mmproj')}")
    if text.architecture != "gemma3" or text.kind != "text":
        what = f"an {text.kind}" if text.kind != "text" else f"a {text.architecture or 'unknown'} model"
        raise UserError(f"{model_path} is {what}, not a Gemma 3 model; pass a MedGemma GGUF (the text model)")
    if mmproj_path is None:
        return
    problem = mmproj_mismatch(text, read_gguf_info(mmproj_path))
    if problem:
        raise MismatchError(problem)


def mmproj_mismatch(text: GgufInfo, vision: GgufInfo) -> str | None:
    """Why ``vision`` cannot be the mmproj of the text model ``text`` (one line with the fix), or None."""
    name = vision.path.name
    if vision.kind != "mmproj":
        return (f"{name} is not an mmproj (general.architecture is {vision.architecture!r}); pass the mmproj-*.gguf "
                "that belongs to the model")
    projector = vision.metadata.get("clip.vision.projector_type") or vision.metadata.get("clip.projector_type")
    if projector != "gemma3":
        return f"{name} has projector type {projector!r}, not gemma3; use MedGemma's own mmproj"
    if not vision.metadata.get("clip.has_vision_encoder", True):
        return f"{name} has no vision encoder; use MedGemma's image mmproj"
    width = text.metadata.get("gemma3.embedding_length")
    projected = vision.metadata.get("clip.vision.projection_dim")
    if width != projected:
        return (f"{name} projects images to width {projected} but {text.path.name} has width {width}: the mmproj "
                "belongs to another model; use the mmproj from the same conversion or repository")
    return None
