"""Hub-ready output: the model card's YAML front matter (parsed by huggingface_hub.ModelCard, checked offline with
the Hub's rules), its file table (bits per weight, size, KL from the report) and usage, and the GGUF keys
general.quantized_by / finetune / tags / sampling that convert writes and every quant inherits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medgemma_gguf.gguf_info import read_gguf_info

# the front matter of google/medgemma-4b-it's card, as published
MEDGEMMA_CARD = """---
license: other
license_name: health-ai-developer-foundations
license_link: https://developers.google.com/health-ai-developer-foundations/terms
library_name: transformers
pipeline_tag: image-text-to-text
extra_gated_heading: Access MedGemma on Hugging Face
extra_gated_prompt: To access MedGemma on Hugging Face, you're required to review and agree to the
  Health AI Developer Foundation's terms of use.
extra_gated_button_content: Acknowledge license
base_model: google/medgemma-4b-pt
tags:
- medical
- radiology
- clinical-reasoning
---
# MedGemma model card
"""


def _convert_and_quantize(checkpoint: Path, outdir: Path) -> Path:
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.convert.quantize.folder import quantize_folder

    convert_checkpoint(str(checkpoint), outdir, outtype="f32", mmproj_type="f16", progress=False)
    quantize_folder(outdir, "Q8_0,Q4_K_M", imatrix="none", progress=False, n_threads=1)
    return outdir


@pytest.fixture(scope="module")
def hub_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    """mm-k256 converted from a Hub-cache snapshot of "google/medgemma-4b-it" with Google's card, quantized, with
    an evaluation report."""
    snapshot = tmp_path_factory.mktemp("hub") / "models--google--medgemma-4b-it" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_checkpoint("mm-k256"), snapshot)
    (snapshot / "README.md").write_text(MEDGEMMA_CARD, encoding="utf-8")
    folder = _convert_and_quantize(snapshot, tmp_path_factory.mktemp("out") / "medgemma-4b-it-GGUF")
    model = json.loads((folder / "manifest.json").read_text())["model"]
    (folder / "report").mkdir()
    (folder / "report" / "report.json").write_text(json.dumps({"rows": [
        {"file": f"{model}-Q8_0.gguf", "kld_mean": 0.0021}, {"file": f"{model}-Q4_K_M.gguf", "kld_mean": 0.0314}]}))
    from medgemma_gguf.convert.quantize.model_card import write_model_card

    write_model_card(folder)
    return folder


def test_card_front_matter_parses_and_passes_the_hubs_rules(hub_folder):
    from huggingface_hub import ModelCard

    from medgemma_gguf.convert.quantize.model_card import check_card

    text = (hub_folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert data["base_model"] == "google/medgemma-4b-it" and data["base_model_relation"] == "quantized"
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "health-ai-developer-foundations",
        "https://developers.google.com/health-ai-developer-foundations/terms")
    assert data["pipeline_tag"] == "image-text-to-text" and data["library_name"] == "gguf"
    assert {"gguf", "llama.cpp", "medical", "radiology", "clinical-reasoning"} <= set(data["tags"])
    assert data["quantized_by"] == "medgemma-gguf"
    assert check_card(text) == []


def test_card_lists_the_files_with_bpw_size_and_kl_and_how_to_run_them(hub_folder):
    from medgemma_gguf.manifest import Manifest

    text = (hub_folder / "README.md").read_text(encoding="utf-8")
    manifest = Manifest.load(hub_folder)
    for row in manifest.find("text"):
        line = next(line for line in text.splitlines() if line.startswith(f"| `{row.path}`"))
        assert f"{row.bits_per_weight:.2f}" in line and row.type in line and ("MiB" in line or "KiB" in line)
    q8 = next(line for line in text.splitlines() if "-Q8_0.gguf`" in line)
    assert "0.0021" in q8 and "mmproj (vision)" in text
    for usage in ("medgemma-gguf chat", "llama-server -m", "--mmproj mmproj-", "LM Studio", "mmproj",
                  "medgemma-gguf export ollama", "ollama create", "0.30.4", "not a medical device"):
        assert usage in text, usage
    from medgemma_gguf.convert.quantize.model_card import render_model_card

    published = render_model_card(hub_folder, manifest, repo_id="someone/medgemma-4b-it-GGUF")
    assert "llama-server -hf someone/medgemma-4b-it-GGUF:" in published
    assert "medgemma-gguf chat hf:someone/medgemma-4b-it-GGUF:" in published


def test_gguf_keys_written_at_convert_reach_every_quant(hub_folder):
    from medgemma_gguf.manifest import Manifest

    for row in Manifest.load(hub_folder).find("text"):
        metadata = read_gguf_info(hub_folder / row.path).metadata
        assert metadata["general.quantized_by"] == "medgemma-gguf"
        assert metadata["general.finetune"] == "it"  # medgemma-4b-it: what follows the size label
        assert {"medical", "radiology"} <= set(metadata["general.tags"])
        assert metadata["general.sampling.top_k"] == 64 and metadata["general.sampling.top_p"] == pytest.approx(0.95)
        assert metadata["general.license.name"] == "health-ai-developer-foundations"


def test_a_local_checkpoint_without_a_card_says_what_is_missing(converted, tmp_path):
    from huggingface_hub import ModelCard

    from medgemma_gguf.convert.quantize.model_card import check_card, write_model_card

    folder = Path(shutil.copytree(converted("text").manifest_path.parent, tmp_path / "out"))
    text = write_model_card(folder).read_text(encoding="utf-8")
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data and "license" not in data and "base_model_relation" not in data
    assert data["pipeline_tag"] == "text-generation" and "gguf" in data["tags"]
    assert "Not known, so not in this card's metadata: base_model" in text and "license" in text
    assert check_card(text) == []


@pytest.mark.parametrize(("front", "problem"), [
    ("base_model: google/medgemma-4b-it\nbase_model_relation: quantised\npipeline_tag: text-generation\ntags: [gguf]",
     "base_model_relation must be one of"),
    ("license: other\npipeline_tag: text-generation\ntags: [gguf]", "needs license_name and license_link"),
    ("base_model: not a repo\npipeline_tag: text-generation\ntags: [gguf]", "base_model must be a Hub id"),
    ("base_model_relation: quantized\npipeline_tag: text-generation\ntags: [gguf]", "needs a base_model"),
    ("pipeline_tag: chat\ntags: [gguf]", "pipeline_tag must be one of"),
    ("pipeline_tag: text-generation\ntags: gguf", "tags must be a list"),
    ("license: [other", "does not parse"),
])
def test_check_card_finds_what_the_hub_would_refuse(front, problem):
    from medgemma_gguf.convert.quantize.model_card import check_card

    problems = check_card(f"---\n{front}\n---\n# card\n")
    assert any(problem in p for p in problems), problems
    assert check_card("# no front matter\n") == ["the card has no YAML front matter"]
