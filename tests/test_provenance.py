"""medgemma_gguf.provenance: the record every report and batch output carries."""

from __future__ import annotations

import hashlib
import json

import pytest

from medgemma_gguf import __version__
from medgemma_gguf.errors import IntegrityError
from medgemma_gguf.provenance import Provenance, collect_provenance, cpu_name, hash_folder_input, hash_input


def test_the_record_names_tool_build_hardware_threads_seeds_and_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_GGUF_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"id": "a"}\n')
    record = collect_provenance(threads=3, seeds={"batch": 7}, inputs=[hash_input("batch input", data)],
                                libraries=("numpy", "no-such-distribution"))
    out = record.to_json()
    assert out["tool"] == "medgemma-gguf" and out["tool_version"] == __version__
    assert set(out["llama_cpp"]) == {"llama_cpp_python", "ggml_version", "ggml_commit", "system_info"}
    assert out["llama_cpp"]["ggml_version"] not in ("", "unknown") and "CPU" in out["llama_cpp"]["system_info"]
    assert out["hardware"]["cpu"] == cpu_name() != "" and isinstance(out["hardware"]["gpus"], list)
    assert out["threads"] == 3 and out["seeds"] == {"batch": 7}
    assert out["inputs"] == [{"role": "batch input", "path": str(data), "bytes": data.stat().st_size,
                              "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert out["libraries"]["numpy"][0].isdigit() and out["libraries"]["no-such-distribution"] == "not installed"
    assert Provenance.from_json(json.loads(json.dumps(out))) == record
    assert record.input("batch input").sha256 == out["inputs"][0]["sha256"] and record.input("model") is None


def test_default_threads_and_cached_hashes(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("MEDGEMMA_GGUF_CACHE", str(tmp_path / "cache"))
    assert collect_provenance(threads=None).threads == max(1, os.cpu_count() or 1)
    data = tmp_path / "weights.bin"
    data.write_bytes(b"x" * 1000)
    first = hash_input("model", data)
    assert (tmp_path / "cache" / "file-hashes" / "file-hashes.json").is_file()
    assert hash_input("model", data) == first
    data.write_bytes(b"y" * 1001)  # changed: hashed again
    assert hash_input("model", data).sha256 == hashlib.sha256(b"y" * 1001).hexdigest()


def test_folder_hash_covers_weights_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_GGUF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 10)
    (folder / "notes.txt").write_text("not hashed")
    first = hash_folder_input("reference", folder)
    assert first.bytes == 12 and first.path == str(folder)
    (folder / "notes.txt").write_text("changed")
    assert hash_folder_input("reference", folder).sha256 == first.sha256
    (folder / "config.json").write_text('{"a": 1}')
    assert hash_folder_input("reference", folder).sha256 != first.sha256


def test_a_damaged_record_names_the_problem():
    with pytest.raises(IntegrityError, match="is not an object"):
        Provenance.from_json([1, 2])
    with pytest.raises(IntegrityError, match="damaged"):
        Provenance.from_json({"tool_version": "1"})
