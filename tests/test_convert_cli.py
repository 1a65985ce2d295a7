"""The convert command: outputs, manifest, overwrite rules, and every bad input's one-line error."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest

from medgemma_gguf.cli import main
from medgemma_gguf.hashing import sha256_of


def _copy(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def _run(capsys, *args):
    code = main(["convert", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_convert_writes_text_mmproj_and_manifest(tiny_checkpoint, tmp_path, capsys):
    source = tiny_checkpoint("mm-k256")
    code, out, err = _run(capsys, source, "--outdir", tmp_path / "out", "--name", "tiny")
    assert code == 0, err
    assert _outputs(tmp_path / "out") == ["manifest.json", "mmproj-tiny-F16.gguf", "tiny-BF16.gguf"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"] == "tiny" and manifest["source"] == {"repo_or_path": str(source), "revision": None}
    rows = {row["role"]: row for row in manifest["files"]}
    assert rows["text"]["type"] == "BF16" and rows["mmproj"]["type"] == "F16"
    for row in rows.values():
        path = tmp_path / "out" / row["path"]
        assert row["bytes"] == path.stat().st_size and row["sha256"] == sha256_of(path)
    # 16 bits per quantizable weight, and every quantizable tensor counted once by its type
    assert rows["text"]["bits_per_weight"] == 16.0 and set(rows["text"]["tensor_types"]) == {"BF16"}
    assert 16 < rows["mmproj"]["bits_per_weight"] < 32  # F16, with the patch and position embeddings kept F32
    assert set(rows["mmproj"]["tensor_types"]) == {"F16", "F32"}
    reader = gguf.GGUFReader(tmp_path / "out" / "tiny-BF16.gguf")
    matrices = [t for t in reader.tensors if len(t.shape) >= 2 and "_norm" not in t.name]
    assert sum(rows["text"]["tensor_types"].values()) == len(matrices)

    text = gguf.GGUFReader(tmp_path / "out" / "tiny-BF16.gguf")
    assert text.get_field("general.architecture").contents() == "gemma3"
    pattern = text.get_field("gemma3.attention.sliding_window_pattern").contents()
    layer_types = json.loads((source / "config.json").read_text())["text_config"]["layer_types"]
    assert pattern == [t == "sliding_attention" for t in layer_types]
    assert text.get_field("gemma3.rope.freq_base").contents() == 1_000_000.0
    assert text.get_field("gemma3.rope.freq_base_swa").contents() == 10_000.0
    assert text.get_field("gemma3.rope.scaling.factor").contents() == 8.0
    assert "tokenizer.chat_template" in text.fields
    types = {t.name: t.tensor_type for t in text.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32

    mmproj = gguf.GGUFReader(tmp_path / "out" / "mmproj-tiny-F16.gguf")
    assert mmproj.get_field("clip.projector_type").contents() == "gemma3"
    mm_types = {t.name: t.tensor_type for t in mmproj.tensors}
    assert mm_types["v.position_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert mm_types["v.blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16


def test_text_only_checkpoint_gives_no_mmproj(tiny_checkpoint, tmp_path, capsys):
    code, _, err = _run(capsys, tiny_checkpoint("text"), "--outdir", tmp_path, "--name", "t", "--outtype", "f16")
    assert code == 0, err
    assert _outputs(tmp_path) == ["manifest.json", "t-F16.gguf"]


def test_mmproj_q8_0_falls_back_where_rows_do_not_fit_blocks(tiny_checkpoint, tmp_path, capsys):
    code, _, err = _run(capsys, tiny_checkpoint("mm-k256"), "--outdir", tmp_path, "--name", "q",
                        "--mmproj-type", "q8_0")
    assert code == 0, err
    mmproj = gguf.GGUFReader(tmp_path / "mmproj-q-Q8_0.gguf")
    types = {t.name: t.tensor_type for t in mmproj.tensors}
    assert types["v.blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["v.position_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert types["mm.input_projection.weight"] == gguf.GGMLQuantizationType.F16


def test_existing_outputs_need_force(tiny_checkpoint, tmp_path, capsys):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint("text"), source)
    out = tmp_path / "out"
    assert _run(capsys, source, "--outdir", out, "--name", "t")[0] == 0
    before = sha256_of(out / "t-BF16.gguf")
    code, printed, err = _run(capsys, source, "--outdir", out, "--name", "t")  # same inputs: nothing to do
    assert code == 0 and f"up to date {out / 't-BF16.gguf'}" in printed, err
    (source / "config.json").write_text((source / "config.json").read_text() + "\n")  # the source changed
    code, _, err = _run(capsys, source, "--outdir", out, "--name", "t")
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert sha256_of(out / "t-BF16.gguf") == before
    assert _run(capsys, source, "--outdir", out, "--name", "t", "--force")[0] == 0


def _break_missing_config(folder):
    (folder / "config.json").unlink()


def _break_missing_weights(folder):
    for file in folder.glob("*.safetensors"):
        file.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)


def _break_missing_shard(folder):
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


def _break_truncated(folder):
    file = sorted(folder.glob("*.safetensors"))[-1]
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _break_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(config))


def _break_softcapping(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["attn_logit_softcapping"] = 50.0
    (folder / "config.json").write_text(json.dumps(config))


def _break_tokenizer(folder):
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").unlink()


def _break_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 256
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("breaker", "message"), [
    (_break_missing_config, "config.json not found"),
    (_break_missing_weights, "no model weights"),
    (_break_missing_shard, "missing weight shard"),
    (_break_truncated, "truncated"),
    (_break_architecture, "unsupported architecture LlavaForConditionalGeneration"),
    (_break_softcapping, "attn_logit_softcapping"),
    (_break_tokenizer, "neither tokenizer.model nor tokenizer.json"),
    (_break_shape, "config and weights do not match"),
])
def test_bad_checkpoints_fail_cleanly(breaker, message, tiny_checkpoint, tmp_path, capsys):
    source = _copy(tiny_checkpoint("mm-k256"), tmp_path)
    breaker(source)
    out = tmp_path / "out"
    code, _, err = _run(capsys, source, "--outdir", out)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert _outputs(out) == []


def test_unwritable_outdir(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = _run(capsys, tiny_checkpoint("text"), "--outdir", blocker / "out")
    assert code == 2 and "choose a writable --outdir" in err and err.count("\n") == 1


def test_failure_midway_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import medgemma_gguf.convert.gguf_stream as stream

    calls = {"n": 0}
    original = stream.converted

    def failing(data, planned):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(data, planned)

    monkeypatch.setattr(stream, "converted", failing)
    out = tmp_path / "out"
    code, _, err = _run(capsys, tiny_checkpoint("mm-k256"), "--outdir", out)
    assert code == 130 and "interrupted" in err
    assert _outputs(out) == []


def test_bad_outtype_lists_choices(tiny_checkpoint, tmp_path, capsys):
    code = main(["convert", str(tiny_checkpoint("text")), "--outdir", str(tmp_path), "--outtype", "q4"])
    assert code == 2
    assert "bf16" in capsys.readouterr().err


CARD = """---
license: other
license_name: health-ai-developer-foundations
license_link: https://developers.google.com/health-ai-developer-foundations/terms
base_model: google/medgemma-4b-pt
library_name: transformers
---
# MedGemma model card
"""


def _hub_cache_with(folder, cache, repo_id, sha):
    """A Hugging Face Hub cache holding ``folder`` as commit ``sha`` of ``repo_id`` (what a download leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(folder, repo / "snapshots" / sha)


def test_hub_source_records_repo_revision_license_and_base_model(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    source = _copy(tiny_checkpoint("mm-k256"), tmp_path)
    (source / "README.md").write_text(CARD)
    _hub_cache_with(source, tmp_path / "hub", "google/medgemma-4b-it", sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = _run(capsys, "google/medgemma-4b-it", "--outdir", tmp_path / "out")
    assert code == 0, err
    assert _outputs(tmp_path / "out") == ["manifest.json", "medgemma-4b-it-BF16.gguf", "mmproj-medgemma-4b-it-F16.gguf"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"] == {"repo_or_path": "google/medgemma-4b-it", "revision": sha}
    reader = gguf.GGUFReader(tmp_path / "out" / "medgemma-4b-it-BF16.gguf")

    def field(key):
        return reader.get_field(key).contents()

    assert field("general.name") == "medgemma-4b-it" and field("general.basename") == "medgemma"
    assert field("general.license") == "other"
    assert field("general.license.name") == "health-ai-developer-foundations"
    assert field("general.base_model.count") == 1 and field("general.base_model.0.name") == "medgemma-4b-pt"
    assert field("general.base_model.0.repo_url") == "https://huggingface.co/google/medgemma-4b-pt"
    assert field("general.source.repo_url") == "https://huggingface.co/google/medgemma-4b-it"
    assert field("general.source.revision") == sha
    assert field("general.size_label").endswith("M")  # the tiny model: millions of parameters


def test_other_models_manifest_is_not_replaced_without_force(tiny_checkpoint, tmp_path, capsys):
    assert _run(capsys, tiny_checkpoint("text"), "--outdir", tmp_path, "--name", "a")[0] == 0
    code, _, err = _run(capsys, tiny_checkpoint("mm-k256"), "--outdir", tmp_path, "--name", "b")
    assert code == 2 and "describes a" in err
    assert _outputs(tmp_path) == ["a-BF16.gguf", "manifest.json"]
