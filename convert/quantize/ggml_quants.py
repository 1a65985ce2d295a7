"""ggml's own quantize and dequantize routines for one tensor, through ctypes (not bound by llama-cpp-python).

``ggml_quantize_chunk`` (``ggml.h``) is the function ``llama_model_quantize`` calls for every tensor, with
the same per-column importance weights (the imatrix's mean squares); the type traits' ``to_float`` is what
llama.cpp's backends dequantize with. So ``roundtrip(rows, type, imatrix)`` returns exactly the weights
llama.cpp will compute with after quantizing those rows — bit-identical to dequantizing llama.cpp's file
with ``gguf.quants.dequantize``.

The library is ``libggml-base.so.0`` from llama-cpp-python's ``lib`` folder: the SONAME libllama links,
not ``libggml-base.so``, which is a separate copy of the file with its own globals. The binding is checked
before use: the type traits must read back the names and block layouts ``gguf`` knows, and a Q8_0
round trip must equal ``gguf``'s own pure-Python Q8_0 (a different struct layout or calling convention in
another ggml version fails here with an error, not a crash later). ``version()`` (ggml's version and
commit) goes into every cache key.

ggml aborts the process (GGML_ASSERT) on a row length that is not a multiple of the type's block and on
IQ2_XXS / IQ2_XS / IQ1_S without importance weights; both are refused here with ``ValueError`` first. The
functions release the GIL (ctypes), are thread-safe (``ggml.h``: "these are thread-safe"), and
``prepare(type)`` builds the i-quant grids once before threads start.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_types import GGML_IMATRIX_TYPES

T = GGMLQuantizationType
_LIBRARY = "libggml-base.so.0"


class _Traits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_init_lock = threading.Lock()
_prepared: set[GGMLQuantizationType] = set()


def library_path() -> Path:
    """``libggml-base.so.0`` of the installed llama-cpp-python."""
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib" / _LIBRARY


@functools.cache
def _lib() -> ctypes.CDLL:
    path = library_path()
    if not path.is_file():
        raise UserError(f"{path} is missing: the installed llama-cpp-python has no {_LIBRARY}; reinstall it "
                        "(scripts/setup.sh) or use --sensitivity proxy")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_version.restype = ctypes.c_char_p
    lib.ggml_commit.restype = ctypes.c_char_p
    _check(lib)
    return lib


def _check(lib: ctypes.CDLL) -> None:
    """The binding reads ggml's tables as ``gguf`` describes them, and round-trips Q8_0 like gguf does."""
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    version = lib.ggml_version().decode()
    problems = []
    for qtype in (T.F16, T.BF16, T.Q8_0, T.Q4_K, T.IQ2_XXS, T.IQ4_XS):
        traits = lib.ggml_get_type_traits(int(qtype)).contents
        block, size = GGML_QUANT_SIZES[qtype]
        name = (traits.type_name or b"").decode()
        if name.upper() != qtype.name or traits.blck_size != block or traits.type_size != size:
            problems.append(f"{qtype.name} reads as {name!r} {traits.blck_size}/{traits.type_size}")
        elif not traits.to_float:
            problems.append(f"{qtype.name} has no to_float")
        if bool(lib.ggml_quantize_requires_imatrix(int(qtype))) != (qtype in GGML_IMATRIX_TYPES):
            problems.append(f"{qtype.name}'s imatrix requirement differs")
    if not problems:
        rows = np.linspace(-3, 3, 2 * 64, dtype=np.float32).reshape(2, 64)
        ours = _roundtrip(lib, rows, T.Q8_0, None)
        theirs = gguf_dequantize(gguf_quantize(rows, T.Q8_0), T.Q8_0)
        if not np.array_equal(ours, theirs):
            problems.append("Q8_0 round trip differs from gguf's")
    if problems:
        raise UserError(f"ggml {version} in {library_path()} does not match what this binding expects "
                        f"({'; '.join(problems)}); use --sensitivity proxy, or install the llama-cpp-python version "
                        "pyproject.toml names")


def version() -> str:
    """ggml's version and commit, e.g. ``0.25.3+0c1e570``."""
    lib = _lib()
    return f"{lib.ggml_version().decode()}+{lib.ggml_commit().decode()}"


def prepare(qtype: GGMLQuantizationType) -> None:
    """Build ggml's lookup grids for ``qtype`` once (i-quants), before quantizing from several threads."""
    lib = _lib()
    with _init_lock:
        if qtype not in _prepared:
            lib.ggml_quantize_init(int(qtype))
            _prepared.add(qtype)


def check_rows(qtype: GGMLQuantizationType, n_per_row: int, has_imatrix: bool) -> str | None:
    """Why ggml would abort quantizing rows of ``n_per_row`` as ``qtype`` (None when it will not)."""
    block = GGML_QUANT_SIZES[qtype][0]
    if n_per_row % block:
        return f"row length {n_per_row} is not a multiple of {qtype.name}'s block of {block}"
    if qtype in GGML_IMATRIX_TYPES and not has_imatrix:
        return f"ggml writes {qtype.name} only with importance weights"
    return None


def _roundtrip(lib: ctypes.CDLL, rows: np.ndarray, qtype: GGMLQuantizationType,
               imatrix: np.ndarray | None) -> np.ndarray:
    n_rows, n_per_row = rows.shape
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    packed = np.empty(n_rows * row_bytes, dtype=np.uint8)
    weights = None if imatrix is None else imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, packed.ctypes.data, 0, n_rows, n_per_row,
                                      weights)
    if written != packed.size:
        raise RuntimeError(f"ggml wrote {written} bytes for {qtype.name}, expected {packed.size}")
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    _TO_FLOAT(traits.to_float)(packed.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out


def roundtrip(rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``rows`` (float32, shape ``(n_rows, n_per_row)``) quantized to ``qtype`` and dequantized by ggml.

    ``imatrix``: one importance weight per column (the imatrix's mean squares), as llama.cpp passes it;
    types that ignore it (Q8_0, F16, ...) give the same result either way. ValueError where ggml would abort.
    """
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D, got shape {rows.shape}")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (rows.shape[1],):
            raise ValueError(f"imatrix has {imatrix.shape} weights for rows of {rows.shape[1]}")
    problem = check_rows(qtype, rows.shape[1], imatrix is not None)
    if problem:
        raise ValueError(problem)
    if qtype == T.F32:
        return rows.copy()
    lib = _lib()
    prepare(qtype)
    return _roundtrip(lib, rows, qtype, imatrix)
