"""The one quant-type table: its numbers agree with llama.cpp's own headers (as llama-cpp-python binds them),
and the views every stage reads are the ones it used to spell out."""

from __future__ import annotations

import llama_cpp
import pytest

from medgemma_gguf import quant_types as q

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("row", q.FILE_TYPES, ids=lambda row: row.name)
def test_file_types_are_llama_cpps(row):
    assert row.ftype == getattr(llama_cpp, f"LLAMA_FTYPE_{row.file_type.name}")
    assert row.default in q.TENSOR_TYPE  # llama.cpp's default type for the mix is one the quantizer writes
    assert row.name.startswith(row.default.name[:2]) and row.bits_class in (16, 8, 6, 5, 4, 3, 2, 1)


@pytest.mark.parametrize("row", q.TENSOR_TYPES, ids=lambda row: row.name)
def test_tensor_types_are_ggmls(row):
    bound = getattr(llama_cpp, f"GGML_TYPE_{row.name}", None)  # llama-cpp-python does not bind GGML_TYPE_BF16
    assert int(row.type) == bound or (bound is None and row.name == "BF16")
    assert int(row.file_type) == getattr(llama_cpp, f"LLAMA_FTYPE_{row.file_type.name}")
    assert not row.ggml_needs_imatrix or row.llama_needs_imatrix  # ggml's rule is the stricter one


def test_size_order_and_derived_views():
    assert [row.size_rank for row in q.FILE_TYPES] == list(range(len(q.FILE_TYPES)))
    bits = [row.bits_class for row in q.FILE_TYPES]
    assert bits == sorted(bits, reverse=True)  # llama-quantize's order of size, largest first
    assert q.FILE_TYPE["Q4_K_M"].ftype == 15 and not q.FILE_TYPE["Q4_K_M"].needs_imatrix
    assert q.FILE_TYPE["IQ2_M"].default.name == "IQ2_S" and q.FILE_TYPE["IQ2_M"].needs_imatrix
    assert q.file_type("q4_k_m") is q.FILE_TYPE["Q4_K_M"] and q.file_type("UD-Q4_K_XL") is None
    assert q.DEFAULT_CANDIDATES == ("IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS",
                                    "Q4_K", "Q5_K", "Q6_K", "Q8_0")
    assert q.UNQUANTIZED_PRECISION == ("F32", "BF16", "F16")
    assert q.MMPROJ_PRECISION_ORDER == ("F32", "BF16", "F16", "Q8_0")
    assert q.MMPROJ_RUN_ORDER == ("F16", "BF16", "F32", "Q8_0")
    assert {t.name for t in q.GGML_IMATRIX_TYPES} == {"IQ2_XXS", "IQ2_XS", "IQ1_S"}
    assert q.tensor_type("q4_k").bits == 4.5 and q.tensor_type("Q4_K_M") is None


def test_kinds():
    assert q.KINDS == q.GLOBAL_KINDS + q.LAYER_KINDS and len(q.LAYER_KINDS) == 7
    assert q.tensor_kind("blk.12.ffn_down.weight") == ("ffn_down", 12)
    assert q.tensor_kind("token_embd.weight") == ("token_embd", None)
