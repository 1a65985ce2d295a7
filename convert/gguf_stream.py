"""Writing a GGUF file one tensor at a time: header and tensor table first, then each tensor's data is
loaded, converted and written before the next is touched, so peak memory is about one tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from tqdm import tqdm

from medgemma_gguf.convert.tensor_types import BF16, F16, F32, Q8_0
from medgemma_gguf.gguf_split import SplitWriter


class TensorSource(Protocol):
    """Where tensor data comes from: a ``Checkpoint``, or one with an adapter merged (``MergedTensors``)."""

    def load(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its GGUF name, where its data comes from, and how it is stored."""

    gguf_name: str
    source_name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    add_one: bool = False


def converted(data: torch.Tensor, planned: PlannedTensor) -> np.ndarray:
    """The tensor's bytes as stored in GGUF (numpy array of the stored element type)."""
    if planned.add_one:
        data = data.to(torch.float32) + 1.0
    if planned.qtype is F32:
        return data.to(torch.float32).numpy()
    if planned.qtype is F16:
        return data.to(torch.float16).numpy()
    if planned.qtype is BF16:
        return data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if planned.qtype is Q8_0:
        return gguf.quants.quantize(data.to(torch.float32).numpy(), Q8_0)
    raise ValueError(f"unsupported output type {planned.qtype.name}")


def stored_nbytes(planned: PlannedTensor) -> int:
    """Bytes the tensor occupies in the file (before alignment padding)."""
    block, type_size = gguf.GGML_QUANT_SIZES[planned.qtype]
    n = int(np.prod(planned.shape)) if planned.shape else 1
    return n // block * type_size


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: Sequence[PlannedTensor], checkpoint: TensorSource, *, progress: bool = True,
               label: str = "", split_max_size: int = 0,
               name_parts: Callable[[int], Sequence[Path]] | None = None) -> None:
    """Write a complete GGUF at ``path`` (callers pass a temporary path and rename it afterwards).

    ``split_max_size`` > 0: llama.cpp's split format (``medgemma_gguf.gguf_split``), parts of at most that many
    bytes of tensor data, written where ``name_parts(count)`` says (``path`` is then only the model's name).
    """
    if split_max_size > 0:
        if name_parts is None:
            raise ValueError("a split GGUF needs name_parts")
        writer: gguf.GGUFWriter = SplitWriter(arch, name_parts, split_max_size)
    else:
        writer = gguf.GGUFWriter(path=None, arch=arch)
    add_metadata(writer)
    for planned in tensors:
        stored_dtype = {F32: np.float32, F16: np.float16, BF16: np.uint16}.get(planned.qtype, np.uint8)
        shape = planned.shape
        if planned.qtype is Q8_0:
            block, type_size = gguf.GGML_QUANT_SIZES[Q8_0]
            shape = (*planned.shape[:-1], planned.shape[-1] // block * type_size)
        writer.add_tensor_info(planned.gguf_name, shape, np.dtype(stored_dtype), stored_nbytes(planned),
                               raw_dtype=planned.qtype)
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(stored_nbytes(t) for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc=label or Path(path).name, disable=not progress,
              leave=False) as bar:
        for planned in tensors:
            data = converted(checkpoint.load(planned.source_name), planned)
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
            del data
    writer.close()
