"""Which files `pull` takes from a repository's file list (no download): llama.cpp -hf's choice of the model
(Q4_K_M by default, labels from what the names do not share, split parts together) and of the mmproj (F16,
then BF16, F32, Q8_0; in the model's folder or the root), on the published layouts' names."""

from __future__ import annotations

import pytest

from medgemma_gguf.errors import InputError, NotFoundError
from medgemma_gguf.pull import parse_hub_spec, plan_pull

UNSLOTH = ["README.md", "medgemma-4b-it-Q4_K_M.gguf", "medgemma-4b-it-UD-Q4_K_XL.gguf", "medgemma-4b-it-Q8_0.gguf",
           "mmproj-F16.gguf", "mmproj-BF16.gguf", "mmproj-F32.gguf"]
BARTOWSKI = ["google_medgemma-27b-it-Q4_K_M.gguf", "google_medgemma-27b-it-Q6_K_L.gguf",
             "google_medgemma-27b-it.imatrix", "mmproj-google_medgemma-27b-it-f16.gguf",
             "mmproj-google_medgemma-27b-it-bf16.gguf",
             *(f"google_medgemma-27b-it-bf16/google_medgemma-27b-it-bf16-0000{i}-of-00002.gguf" for i in (1, 2))]
GGML_ORG = ["gemma-3-4b-it-Q4_K_M.gguf", "gemma-3-4b-it-Q8_0.gguf", "gemma-3-4b-it-f16.gguf", "mmproj-model-f16.gguf"]


def test_default_quant_and_mmproj():
    plan = plan_pull("unsloth/x", UNSLOTH)
    assert plan.model_files == ("medgemma-4b-it-Q4_K_M.gguf",) and plan.mmproj == "mmproj-F16.gguf"
    assert plan.quant == "Q4_K_M" and "preferred to mmproj-BF16.gguf, mmproj-F32.gguf" in plan.mmproj_note
    assert plan_pull("g/x", GGML_ORG).mmproj == "mmproj-model-f16.gguf"
    assert plan_pull("g/x", GGML_ORG[1:]).model_files == ("gemma-3-4b-it-Q8_0.gguf",)  # no Q4_K_M: Q8_0


def test_labels_case_and_recipes():
    assert plan_pull("unsloth/x", UNSLOTH, "ud-q4_k_xl").model_files == ("medgemma-4b-it-UD-Q4_K_XL.gguf",)
    assert plan_pull("unsloth/x", UNSLOTH, "Q4_K_XL").quant == "UD-Q4_K_XL"  # a label that ends in it
    assert plan_pull("unsloth/x", UNSLOTH, "medgemma-4b-it-Q8_0.gguf").quant == "Q8_0"  # a file name
    assert plan_pull("unsloth/x", UNSLOTH, include_mmproj="bf16").mmproj == "mmproj-BF16.gguf"
    assert plan_pull("unsloth/x", UNSLOTH, include_mmproj="none").mmproj is None


def test_split_parts_and_the_imatrix_is_no_model():
    plan = plan_pull("bartowski/x", BARTOWSKI, "BF16")
    assert plan.model_files == tuple(BARTOWSKI[-2:]) and plan.mmproj == "mmproj-google_medgemma-27b-it-f16.gguf"
    assert plan_pull("bartowski/x", BARTOWSKI, "Q6_K_L").quant == "Q6_K_L"
    with pytest.raises(NotFoundError, match=r"has no quant 'imatrix'; it has Q4_K_M, Q6_K_L, bf16"):
        plan_pull("bartowski/x", BARTOWSKI, "imatrix")
    with pytest.raises(NotFoundError, match="lists 1 of the 2 parts"):
        plan_pull("bartowski/x", BARTOWSKI[:-1], "BF16")


def test_bad_references_and_repos():
    assert parse_hub_spec("hf:unsloth/medgemma-4b-it-GGUF:Q4_K_M").quant == "Q4_K_M"
    assert parse_hub_spec("unsloth/medgemma-4b-it-GGUF").quant is None
    for bad in ("hf:just-a-name", "a/b:c:d", ""):
        with pytest.raises(InputError, match="is not a Hub reference"):
            parse_hub_spec(bad)
    with pytest.raises(NotFoundError, match="holds no GGUF model file"):
        plan_pull("google/medgemma-4b-it", ["config.json", "model.safetensors"])
    with pytest.raises(NotFoundError, match="has no mmproj"):
        plan_pull("x/y", ["m-Q4_K_M.gguf"], include_mmproj="F16")
