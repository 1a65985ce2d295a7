"""Which ggml type each converted tensor is stored as, for each output type the user can ask for."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_types import TENSOR_TYPES

F32, F16, BF16, Q8_0 = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                        GGMLQuantizationType.Q8_0)

# --outtype / --mmproj-type values and the general.file_type each is written with (medgemma_gguf.quant_types)
TEXT_OUTTYPES = {row.name.lower(): row.type for row in TENSOR_TYPES if "text" in row.converter}
MMPROJ_OUTTYPES = {row.name.lower(): row.type for row in TENSOR_TYPES if "mmproj" in row.converter}
ADAPTER_OUTTYPES = {row.name.lower(): row.type for row in TENSOR_TYPES if "adapter" in row.converter}
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {row.type: row.file_type for row in TENSOR_TYPES
                                                         if row.converter}


def parse_outtype(value: str, allowed: dict[str, GGMLQuantizationType], option: str) -> GGMLQuantizationType:
    """The ggml type for a user's ``--outtype``/``--mmproj-type`` value."""
    try:
        return allowed[value.lower()]
    except KeyError:
        raise UserError(f"{option} {value!r} is not one of {', '.join(allowed)}; choose one of those") from None


def type_label(qtype: GGMLQuantizationType) -> str:
    """The name used in file names and the manifest: F32, F16, BF16, Q8_0."""
    return qtype.name


def text_tensor_type(shape: tuple[int, ...], outtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Text decoder: vectors (norms) stay F32, as llama.cpp expects; matrices take ``outtype``."""
    return F32 if len(shape) <= 1 else outtype


def mmproj_tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Vision tower + projector types.

    Vectors and the patch/position embeddings stay F32 (llama.cpp's clip loader needs them at full
    precision); the projector matrix, which clip transposes before use, is never block-quantized (F16, or
    F32 for an F32 file); a Q8_0 matrix whose row length is not a multiple of the block size falls back
    to F16.
    """
    if len(shape) <= 1 or gguf_name.startswith(("v.patch_embd", "v.position_embd")):
        return F32
    if gguf_name.startswith("mm.input_projection"):
        return F32 if outtype is F32 else F16
    if outtype is Q8_0:
        block = GGML_QUANT_SIZES[Q8_0][0]
        return Q8_0 if shape[-1] % block == 0 else F16
    return outtype
