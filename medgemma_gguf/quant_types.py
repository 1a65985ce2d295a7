"""The one table of quantization types and tensor kinds every stage reads.

Three tables, all data:

* ``FILE_TYPES`` — the names ``quantize --quants`` accepts for llama.cpp's own mixes (``Q4_K_M``,
  ``IQ2_XXS``, ...), in llama-quantize's order of size (largest first). Each row holds llama.cpp's file type
  (``gguf.LlamaFileType``, the ``LLAMA_FTYPE_MOSTLY_*`` value passed to ``llama_model_quantize``), the
  ggml type most of its tensors get (``llama_ftype_get_default_type`` in llama.cpp's src/llama-quant.cpp),
  its bits-per-weight class and a description. Whether it needs an importance matrix follows from its
  default type.
* ``TENSOR_TYPES`` — the ggml types llama.cpp's quantizer can write for one tensor (recipe rules, AUTO
  candidates, converter output types), with the file type a recipe whose base is that type is written as,
  and the two different imatrix rules: llama.cpp's ``tensor_requires_imatrix`` (it refuses these types
  without an imatrix, except on the token embedding and output) and ggml's
  ``ggml_quantize_requires_imatrix`` (ggml aborts the process when a tensor is written as one of these
  without imatrix data for that very tensor).
* ``TENSOR_KINDS`` — the kinds of quantizable tensors of a Gemma 3 text model: a layer tensor is
  ``blk.<i>.<kind>.weight``, a global one ``<kind>.weight``.

Numbers come from ``gguf`` (``LlamaFileType``, ``GGMLQuantizationType``, ``GGML_QUANT_SIZES``), never
copied by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

T = GGMLQuantizationType
F = LlamaFileType


@dataclass(frozen=True)
class TensorType:
    """One ggml type llama.cpp's quantizer can write for a tensor."""

    type: GGMLQuantizationType
    file_type: LlamaFileType  # general.file_type of a recipe file with this base type
    llama_needs_imatrix: bool = False  # llama.cpp's tensor_requires_imatrix (not token_embd / output)
    ggml_needs_imatrix: bool = False  # ggml_quantize_requires_imatrix: aborts without data for the tensor
    candidate: bool = False  # an AUTO sensitivity candidate by default
    converter: tuple[str, ...] = ()  # convert writes it for: "text", "mmproj", "adapter" (GGUF LoRA matrices)
    precision_rank: int | None = None  # unquantized sources and mmprojs, most precise first

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.type][0]

    @property
    def bits(self) -> float:
        """Bits per weight of the type alone (block bytes × 8 / block elements)."""
        block, size = GGML_QUANT_SIZES[self.type]
        return 8 * size / block

    @property
    def quantized(self) -> bool:
        return self.type not in (T.F32, T.F16, T.BF16)


# In recipe error messages' order: unquantized, then by decreasing size.
TENSOR_TYPES: tuple[TensorType, ...] = (
    TensorType(T.F32, F.ALL_F32, converter=("text", "mmproj", "adapter"), precision_rank=0),
    TensorType(T.F16, F.MOSTLY_F16, converter=("text", "mmproj", "adapter"), precision_rank=2),
    TensorType(T.BF16, F.MOSTLY_BF16, converter=("text", "mmproj"), precision_rank=1),
    TensorType(T.Q8_0, F.MOSTLY_Q8_0, candidate=True, converter=("mmproj", "adapter"), precision_rank=3),
    TensorType(T.Q6_K, F.MOSTLY_Q6_K, candidate=True),
    TensorType(T.Q5_K, F.MOSTLY_Q5_K_M, candidate=True),
    TensorType(T.Q5_1, F.MOSTLY_Q5_1),
    TensorType(T.Q5_0, F.MOSTLY_Q5_0),
    TensorType(T.Q4_K, F.MOSTLY_Q4_K_M, candidate=True),
    TensorType(T.Q4_1, F.MOSTLY_Q4_1),
    TensorType(T.Q4_0, F.MOSTLY_Q4_0),
    TensorType(T.IQ4_XS, F.MOSTLY_IQ4_XS, candidate=True),
    TensorType(T.IQ4_NL, F.MOSTLY_IQ4_NL),
    TensorType(T.Q3_K, F.MOSTLY_Q3_K_M, candidate=True),
    TensorType(T.IQ3_S, F.MOSTLY_IQ3_S, candidate=True),
    TensorType(T.IQ3_XXS, F.MOSTLY_IQ3_XXS, llama_needs_imatrix=True, candidate=True),
    TensorType(T.Q2_K, F.MOSTLY_Q2_K, candidate=True),
    TensorType(T.IQ2_S, F.MOSTLY_IQ2_S, llama_needs_imatrix=True, candidate=True),
    TensorType(T.IQ2_XS, F.MOSTLY_IQ2_XS, llama_needs_imatrix=True, ggml_needs_imatrix=True, candidate=True),
    TensorType(T.IQ2_XXS, F.MOSTLY_IQ2_XXS, llama_needs_imatrix=True, ggml_needs_imatrix=True, candidate=True),
    TensorType(T.IQ1_M, F.MOSTLY_IQ1_M, llama_needs_imatrix=True),
    TensorType(T.IQ1_S, F.MOSTLY_IQ1_S, llama_needs_imatrix=True, ggml_needs_imatrix=True),
)
TENSOR_TYPE: dict[GGMLQuantizationType, TensorType] = {row.type: row for row in TENSOR_TYPES}


@dataclass(frozen=True)
class FileType:
    """One of llama.cpp's standard quantization mixes, as ``quantize --quants`` names it."""

    name: str
    file_type: LlamaFileType
    default: GGMLQuantizationType  # llama_ftype_get_default_type: the type most tensors get
    bits_class: int  # the nominal bit width the mix belongs to (16, 8, 6, 5, 4, 3, 2, 1)
    description: str

    @property
    def ftype(self) -> int:
        """llama.cpp's ``llama_ftype`` value."""
        return int(self.file_type)

    @property
    def needs_imatrix(self) -> bool:
        """llama.cpp refuses the mix without an importance matrix (its default type needs one)."""
        return TENSOR_TYPE[self.default].llama_needs_imatrix

    @property
    def size_rank(self) -> int:
        """Position in llama-quantize's order of size, 0 = largest."""
        return FILE_TYPES.index(self)


FILE_TYPES: tuple[FileType, ...] = (
    FileType("BF16", F.MOSTLY_BF16, T.BF16, 16, "bfloat16, unquantized (the converter's default)"),
    FileType("F16", F.MOSTLY_F16, T.F16, 16, "float16, unquantized"),
    FileType("Q8_0", F.MOSTLY_Q8_0, T.Q8_0, 8, "8-bit blocks of 32; indistinguishable from BF16 in practice"),
    FileType("Q6_K", F.MOSTLY_Q6_K, T.Q6_K, 6, "6-bit k-quant everywhere"),
    FileType("Q5_K_M", F.MOSTLY_Q5_K_M, T.Q5_K, 5, "5-bit k-quant, Q6_K for half of attn_v / ffn_down and the output"),
    FileType("Q5_K_S", F.MOSTLY_Q5_K_S, T.Q5_K, 5, "5-bit k-quant, few exceptions"),
    FileType("Q4_K_M", F.MOSTLY_Q4_K_M, T.Q4_K, 4, "4-bit k-quant, Q6_K for half of attn_v / ffn_down and the output"),
    FileType("Q4_K_S", F.MOSTLY_Q4_K_S, T.Q4_K, 4, "4-bit k-quant, few exceptions"),
    FileType("Q4_0", F.MOSTLY_Q4_0, T.Q4_0, 4, "legacy 4-bit blocks of 32"),
    FileType("IQ4_XS", F.MOSTLY_IQ4_XS, T.IQ4_XS, 4, "4.25-bit non-linear i-quant"),
    FileType("IQ4_NL", F.MOSTLY_IQ4_NL, T.IQ4_NL, 4, "4.5-bit non-linear i-quant, blocks of 32"),
    FileType("Q3_K_L", F.MOSTLY_Q3_K_L, T.Q3_K, 3, "3-bit k-quant, Q5_K for attn_v / ffn_down"),
    FileType("Q3_K_M", F.MOSTLY_Q3_K_M, T.Q3_K, 3, "3-bit k-quant, Q4_K/Q5_K for attn_v, ffn_down, attn_output"),
    FileType("Q3_K_S", F.MOSTLY_Q3_K_S, T.Q3_K, 3, "3-bit k-quant, few exceptions"),
    FileType("IQ3_M", F.MOSTLY_IQ3_M, T.IQ3_S, 3, "3.44-bit i-quant mix"),
    FileType("IQ3_XXS", F.MOSTLY_IQ3_XXS, T.IQ3_XXS, 3, "3.06-bit i-quant (needs an imatrix)"),
    FileType("Q2_K", F.MOSTLY_Q2_K, T.Q2_K, 2, "2-bit k-quant, Q3_K/Q4_K for attention"),
    FileType("IQ2_M", F.MOSTLY_IQ2_M, T.IQ2_S, 2, "2.5-bit i-quant mix (needs an imatrix)"),
    FileType("IQ2_XS", F.MOSTLY_IQ2_XS, T.IQ2_XS, 2, "2.31-bit i-quant (needs an imatrix)"),
    FileType("IQ2_XXS", F.MOSTLY_IQ2_XXS, T.IQ2_XXS, 2, "2.06-bit i-quant (needs an imatrix)"),
    FileType("IQ1_M", F.MOSTLY_IQ1_M, T.IQ1_M, 1, "1.75-bit i-quant (needs an imatrix)"),
    FileType("IQ1_S", F.MOSTLY_IQ1_S, T.IQ1_S, 1, "1.56-bit i-quant (needs an imatrix)"),
)
FILE_TYPE: dict[str, FileType] = {row.name: row for row in FILE_TYPES}

# --- derived views ------------------------------------------------------------------------------------
# llama.cpp's tensor_requires_imatrix / ggml's ggml_quantize_requires_imatrix (see TensorType)
LLAMA_IMATRIX_TYPES = frozenset(row.type for row in TENSOR_TYPES if row.llama_needs_imatrix)
GGML_IMATRIX_TYPES = frozenset(row.type for row in TENSOR_TYPES if row.ggml_needs_imatrix)
# tensors llama.cpp's tensor_requires_imatrix exempts
IMATRIX_EXEMPT_TENSORS = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")
# AUTO's default candidate types, fewest bits first
DEFAULT_CANDIDATES = tuple(row.name for row in sorted((r for r in TENSOR_TYPES if r.candidate),
                                                       key=lambda r: (r.bits, r.name)))
# unquantized types, most precise first: the source a quantization starts from (BF16 before F16: Gemma 3's
# activations overflow float16's range, bfloat16 keeps float32's)
UNQUANTIZED_PRECISION = tuple(row.name for row in sorted((r for r in TENSOR_TYPES if not r.quantized),
                                                          key=lambda r: r.precision_rank or 0))
# mmproj types, best first: to evaluate with (precision), and to run with (F16 first: what llama.cpp's tools
# default to; then the other unquantized types, smallest first; a quantized vision tower last)
_MMPROJ = [r for r in TENSOR_TYPES if "mmproj" in r.converter]
MMPROJ_PRECISION_ORDER = tuple(row.name for row in sorted(_MMPROJ, key=lambda r: r.precision_rank or 0))
MMPROJ_RUN_ORDER = tuple(row.name for row in sorted(_MMPROJ, key=lambda r: (r.name != "F16", r.quantized, r.bits)))


def tensor_type(name: str | GGMLQuantizationType) -> TensorType | None:
    """The row of a ggml type (by type or name, any case), or None when the quantizer cannot write it."""
    if isinstance(name, GGMLQuantizationType):
        return TENSOR_TYPE.get(name)
    for row in TENSOR_TYPES:
        if row.name == str(name).upper():
            return row
    return None


def file_type(name: str) -> FileType | None:
    """The standard mix called ``name`` (any case), or None."""
    for row in FILE_TYPES:
        if row.name == name.strip().upper():
            return row
    return None


def recipe_file_type(base: GGMLQuantizationType) -> LlamaFileType:
    """``general.file_type`` of a recipe file whose base type is ``base``."""
    return TENSOR_TYPE[base].file_type


# --- tensor kinds -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorKind:
    """A kind of quantizable tensor."""

    name: str
    per_layer: bool
    description: str


TENSOR_KINDS: tuple[TensorKind, ...] = (
    TensorKind("token_embd", False, "token embedding; Gemma 3 ties the output projection to it"),
    TensorKind("output", False, "output projection (absent when tied to token_embd)"),
    TensorKind("attn_q", True, "attention query projection"),
    TensorKind("attn_k", True, "attention key projection"),
    TensorKind("attn_v", True, "attention value projection"),
    TensorKind("attn_output", True, "attention output projection (writes into the residual stream)"),
    TensorKind("ffn_gate", True, "feed-forward gate projection"),
    TensorKind("ffn_up", True, "feed-forward up projection"),
    TensorKind("ffn_down", True, "feed-forward down projection (writes into the residual stream)"),
)
KINDS = tuple(kind.name for kind in TENSOR_KINDS)
LAYER_KINDS = tuple(kind.name for kind in TENSOR_KINDS if kind.per_layer)
GLOBAL_KINDS = tuple(kind.name for kind in TENSOR_KINDS if not kind.per_layer)

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
_GLOBAL_NAME = re.compile(r"^([a-z_]+)\.weight$")


def tensor_kind(name: str) -> tuple[str, int | None]:
    """(kind, layer) of a tensor name: ('ffn_down', 3) for blk.3.ffn_down.weight, ('token_embd', None)."""
    match = _LAYER_NAME.match(name)
    if match:
        return match.group(2), int(match.group(1))
    match = _GLOBAL_NAME.match(name)
    return (match.group(1) if match else name), None
