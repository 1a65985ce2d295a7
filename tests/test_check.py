"""``medgemma-gguf check``: a correct conversion passes every probe; each deliberately broken GGUF fails loudly
(a swapped tensor, a special token typed NORMAL, a shifted sliding-window pattern), under both precision
classes; a reference that does not fit the memory is refused with what it needs; quants are refused.

The reference side is computed once per (variant, dtype) and compared with several GGUFs, as ``check`` does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from medgemma_gguf.errors import InputError, ResourceError
from medgemma_gguf.fixtures.broken_gguf import BROKEN_CASES, write_broken_gguf
from medgemma_gguf.quant_eval.equivalence import (
    MAX_SCORED_POSITIONS,
    MIN_TEXT_POSITIONS,
    THRESHOLDS,
    check_memory,
    compare_to_reference,
    compute_reference,
    greedy_figures,
    load_transformers,
    precision_class,
    scored_positions,
    text_probe_length,
    top_two_gaps,
)

VARIANT = "mm-deep"

# which probes each broken case must fail (more may fail too)
MUST_FAIL = {
    "swap-tensor": {("text logits", "max |Δlogit|"), ("text logits", "mean KL"),
                    ("greedy reply", "max KL along the reference's reply")},
    "special-token-type": {("tokenizer corpus", "texts tokenized identically"),
                           ("tokenizer markers", "markers parsed as one token"),
                           ("chat prompt", "ids equal the HF chat template's")},
    "swa-pattern": {("text logits", "max |Δlogit|"), ("text logits", "mean KL")},
}


# --- units ----------------------------------------------------------------------------------------------


def test_greedy_agreement_up_to_the_first_near_tie():
    logits = np.zeros((4, 5))
    logits[:, 0] = [3.0, 2.0, 1.0, 4.0]
    logits[:, 1] = [1.0, 1.995, 0.0, 0.0]  # step 1: top two 0.005 apart
    assert top_two_gaps(logits).tolist() == pytest.approx([2.0, 0.005, 1.0, 4.0])
    same = greedy_figures([0, 0, 0, 0], logits, [0, 0, 0, 0], tie_margin=0.01)
    assert same.agree and same.first_difference is None and same.first_near_tie == 1
    at_tie = greedy_figures([0, 0, 0, 0], logits, [0, 1, 4, 4], tie_margin=0.01)
    assert at_tie.agree and at_tie.first_difference == 1
    before_tie = greedy_figures([0, 0, 0, 0], logits, [2, 0, 0, 0], tie_margin=0.01)
    assert not before_tie.agree and before_tie.first_difference == 0
    no_tie = greedy_figures([0, 0, 0, 0], logits, [0, 1, 0, 0], tie_margin=0.001)
    assert not no_tie.agree and no_tie.first_near_tie is None
    shorter = greedy_figures([0, 0, 0], logits, [0, 0], tie_margin=0.001)  # the GGUF ended its reply early
    assert not shorter.agree and shorter.first_difference == 2


def test_probe_sizes_cross_the_sliding_window():
    assert text_probe_length(16) == MIN_TEXT_POSITIONS
    assert text_probe_length(1024) == 2 * 1024 + 64  # MedGemma 4B: 2112 tokens, past the 1024-token window
    assert text_probe_length(None) == MIN_TEXT_POSITIONS
    assert scored_positions(300).tolist() == list(range(300))
    spread = scored_positions(2112)
    assert spread.size == MAX_SCORED_POSITIONS and spread[0] == 0 and spread[-1] == 2111
    assert (spread > 1024).sum() > MAX_SCORED_POSITIONS // 3  # many positions past the window


def test_precision_classes_and_thresholds():
    assert precision_class("f32", ["F32"]) == "f32"
    assert precision_class("f32", ["BF16", "F32"]) == "bf16"
    assert precision_class("bf16", ["F32"]) == "bf16"
    f32, bf16 = THRESHOLDS["f32"], THRESHOLDS["bf16"]
    assert f32.max_abs_logit < bf16.max_abs_logit and f32.mean_kl < bf16.mean_kl
    assert f32.image_cosine > bf16.image_cosine and f32.tie_margin < bf16.tie_margin


def test_memory_refusal_names_what_is_needed():
    with pytest.raises(ResourceError, match=r"needs about 58\.0 GiB but 20\.0 GiB are available") as err:
        check_memory(58 << 30, 20 << 30, "the reference in transformers at bf16")
    assert err.value.for_python().endswith("raise memory_bytes if swap can hold the rest")
    assert "raise --memory if swap" in err.value.for_cli()
    check_memory(1 << 30, 2 << 30, "x")


# --- the probes on the tiny fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(tiny_checkpoint, hf_model):
    """``references(variant, dtype)``: the reference's probe outputs, computed once each."""
    done = {}

    def get(variant, dtype):
        if (variant, dtype) not in done:
            folder = tiny_checkpoint(variant)
            model = hf_model(folder) if dtype == "f32" else load_transformers(folder, "bf16")
            done[variant, dtype] = compute_reference(folder, model, dtype=dtype, greedy_tokens=16)
        return done[variant, dtype]

    return get


def _compare(reference, text_path, mmproj_path, precision):
    from medgemma_gguf.runtime.chat import load

    with load(text_path, mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as model:
        return compare_to_reference(reference, model, THRESHOLDS[precision])


def _failed(results):
    return {(r.probe.split(" (")[0], r.metric) for r in results if not r.passed}


@pytest.mark.parametrize(("variant", "dtype", "outtype"), [(VARIANT, "f32", "f32"), (VARIANT, "bf16", "bf16"),
                                                           ("text", "f32", "f32")])
def test_a_correct_conversion_passes_every_probe(variant, dtype, outtype, references, converted):
    files = converted(variant, outtype, "f32" if outtype == "f32" else "f16")
    results = _compare(references(variant, dtype), files.text_path, files.mmproj_path,
                       precision_class(dtype, [outtype.upper()]))
    assert results and all(r.passed for r in results), [r.to_json() for r in results if not r.passed]
    probes = {r.probe.split(" (")[0] for r in results}
    assert {"tokenizer corpus", "tokenizer markers", "chat prompt", "text logits", "greedy reply"} <= probes
    images = [r for r in results if "image" in r.probe]
    if variant == VARIANT:  # per image size the processor uses: at native size and resized
        assert {r.probe for r in images} == {"112x112 image", "168x112 image, resized"}
        assert {r.metric.split(" (")[0] for r in images} >= {
            "prompt ids equal the HF processor's", "min cosine of image embeddings",
            "max |Δpixel| of the normalized image", "max next-token KL after the image"}
    else:
        assert not images
    text = next(r for r in results if r.metric == "mean KL")
    assert text.probe.startswith(f"text logits ({MIN_TEXT_POSITIONS} positions")


@pytest.mark.parametrize("case", BROKEN_CASES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_each_broken_gguf_fails(case, dtype, references, converted, tmp_path):
    files = converted(VARIANT, dtype, "f32" if dtype == "f32" else "f16")
    broken = write_broken_gguf(files.text_path, tmp_path / f"broken-{case}.gguf", case)
    results = _compare(references(VARIANT, dtype), broken, files.mmproj_path, dtype)
    failed = _failed(results)
    assert MUST_FAIL[case] <= failed, (case, failed)
    if case == "special-token-type":  # the weights are right: the logits of the same ids still match
        assert ("text logits", "mean KL") not in failed


def test_broken_gguf_cases_are_checked(converted, tmp_path):
    source = converted(VARIANT).text_path
    with pytest.raises(InputError, match="unknown broken-GGUF case 'nope'"):
        write_broken_gguf(source, tmp_path / "x.gguf", "nope")
    with pytest.raises(InputError, match="differ in shape or type"):
        write_broken_gguf(source, tmp_path / "x.gguf", "swap-tensor", swap=("blk.0.ffn_gate.weight",
                                                                             "token_embd.weight"))
    assert not (tmp_path / "x.gguf").exists()


# --- the command ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_check_command_exit_codes_table_and_json(tiny_checkpoint, converted, tmp_path, capsys, monkeypatch):
    from medgemma_gguf import cli

    monkeypatch.setenv("MEDGEMMA_GGUF_CACHE", str(tmp_path / "cache"))
    folder, files = tiny_checkpoint(VARIANT), converted(VARIANT)
    base = ["--reference", str(folder), "--dtype", "f32", "--threads", "1", "--greedy-tokens", "8"]
    assert cli.main(["check", str(files.manifest_path.parent), *base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["precision"] == "f32" and report["reference_dtype"] == "f32"
    assert all(p["passed"] for p in report["probes"]) and len(report["probes"]) >= 13
    assert report["model"] == str(files.text_path) and report["mmproj"] == str(files.mmproj_path)
    provenance = report["provenance"]
    assert provenance["tool_version"] and provenance["llama_cpp"]["ggml_version"] and provenance["hardware"]["cpu"]
    assert provenance["threads"] == 1 and set(provenance["libraries"]) == {"torch", "transformers"}
    from medgemma_gguf.hashing import sha256_of

    roles = {i["role"]: i for i in provenance["inputs"]}
    assert roles["model"]["sha256"] == sha256_of(files.text_path) and roles["mmproj"]["sha256"] == sha256_of(
        files.mmproj_path) and roles["reference"]["path"] == str(folder)

    broken = write_broken_gguf(files.text_path, tmp_path / "broken" / "model-F32.gguf", "swa-pattern")
    assert cli.main(["check", str(broken), "--mmproj", str(files.mmproj_path), *base]) == 1
    table = capsys.readouterr().out
    assert "FAIL" in table.splitlines()[-1] and "text logits" in table
    assert any(line.rstrip().endswith("FAIL") and "mean KL" in line for line in table.splitlines())

    assert cli.main(["check", str(files.text_path), *base, "--memory", "1MiB"]) == 2
    assert "needs about" in capsys.readouterr().err
    assert cli.main(["check", str(files.text_path), "--reference", str(folder), "--dtype", "f16"]) == 2
    text_only = tiny_checkpoint("text")
    assert cli.main(["check", str(files.text_path), "--reference", str(text_only)]) == 2
    assert "is text-only" in capsys.readouterr().err


def test_check_refuses_a_quant(converted, tmp_path):
    from medgemma_gguf.convert.quantize.llama_quantize import quantize_file, resolve_quants
    from medgemma_gguf.quant_eval.check import text_types

    quant = quantize_file(converted("text").text_path, tmp_path / "text-Q8_0.gguf", resolve_quants(["Q8_0"])[0],
                          progress=False)
    with pytest.raises(InputError, match="holds Q8_0 tensors: check proves an unquantized conversion"):
        text_types(quant.path)
    assert text_types(converted("text").text_path) == ["F32"]
