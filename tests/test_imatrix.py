"""Importance matrix: equal to an independent Σx² over HF transformers' nn.Linear inputs on the same
calibration prompts (images included), llama.cpp's GGUF layout, the legacy .dat format, and bad inputs."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from medgemma_gguf.convert.quantize.calibration import DEFAULT_PATH, load_calibration, render_image, without_images
from medgemma_gguf.convert.quantize.imatrix import (
    Imatrix,
    accumulate_mul_mat,
    accumulate_mul_mat_id,
    calibration_description,
    check_imatrix_matches,
    compute_imatrix,
    read_imatrix,
    write_imatrix_gguf,
)
from medgemma_gguf.errors import UserError

# two image items (one multi-turn) and two text items of the bundled set
TEST_ITEMS = ("img-cxr-rll", "med-dka", "img-cxr-multiturn", "gen-json")


def _image_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]


@pytest.fixture(scope="module")
def small_calibration(calibration_subset) -> Path:
    """A calibration file with TEST_ITEMS, copied line for line from the bundled set."""
    return calibration_subset(TEST_ITEMS)


@pytest.fixture(scope="module")
def k256_imatrix(converted, small_calibration) -> Imatrix:
    result = converted("mm-k256")
    return compute_imatrix(result.text_path, result.mmproj_path, calibration=small_calibration, progress=False)


def _hf_reference(model, processor, calibration, image_size: int) -> tuple[dict[str, np.ndarray], int]:
    """Σx² per input column of every text-layer nn.Linear (float64) and the number of rows, by forward hooks."""
    import torch
    from PIL import Image

    from medgemma_gguf.convert.tensor_names import Component, map_tensor_name

    sums: dict[str, np.ndarray] = {}
    hooks = []
    for module_name, module in model.named_modules():
        mapped = map_tensor_name(module_name + ".weight") if isinstance(module, torch.nn.Linear) else None
        if mapped is None or mapped.component is not Component.TEXT or not mapped.gguf.startswith("blk."):
            continue

        def hook(_module, inputs, name=mapped.gguf):
            rows = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (rows * rows).sum(0).numpy()

        hooks.append(module.register_forward_pre_hook(hook))
    total = 0
    try:
        for item in calibration.items:
            messages = [{"role": m["role"], "content": [
                {"type": "image", "image": Image.fromarray(render_image(p["synthetic"], image_size))}
                if p["type"] == "image" else p for p in m["content"]]} for m in item.messages]
            inputs = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            total += inputs["input_ids"].shape[1]
            with torch.no_grad():
                model(**inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return sums, total


def test_imatrix_equals_hf_forward_hooks(tiny_checkpoint, hf_model, k256_imatrix, small_calibration):
    from transformers import AutoProcessor

    folder = tiny_checkpoint("mm-k256")
    calibration = load_calibration(small_calibration)
    reference, n_rows = _hf_reference(hf_model(folder), AutoProcessor.from_pretrained(folder), calibration,
                                      _image_size(folder))
    assert len(reference) == 6 * 7  # q, k, v, o, gate, up, down in each of 6 layers
    assert k256_imatrix.tensor_names == sorted(reference)
    # Tolerance: 1e-3 relative per matrix (vector norm). Single columns are held to 5e-3: ggml's CPU GELU
    # reads an f16 lookup table, so ffn_down inputs differ from PyTorch's by ~1e-3 per element (measured on
    # text-only prompts too: max column error 1.8e-3, per-matrix error 3e-4).
    for name, expected in reference.items():
        assert k256_imatrix.counts[name].tolist() == [n_rows], name
        ours = k256_imatrix.sums[name].astype(np.float64)
        assert np.linalg.norm(ours - expected) <= 1e-3 * np.linalg.norm(expected), name
        np.testing.assert_allclose(ours, expected, rtol=5e-3, err_msg=name)
        np.testing.assert_allclose(k256_imatrix.mean_squares(name), expected / n_rows, rtol=5e-3, err_msg=name)
    described = k256_imatrix.calibration
    assert described["items"] == len(TEST_ITEMS) and described["image_items"] == 2
    assert described["positions"] == n_rows == described["tokens"] + described["image_positions"]


def test_image_positions_are_counted(converted, small_calibration, k256_imatrix):
    result = converted("mm-k256")
    text_only = compute_imatrix(result.text_path, result.mmproj_path,
                                calibration=without_images(load_calibration(small_calibration)), progress=False)
    name = "blk.5.ffn_down.weight"  # the last layer: image rows must reach it too
    with_images = int(k256_imatrix.counts[name][0])
    assert k256_imatrix.calibration["image_positions"] == 2 * 16  # two 224-px images of 16 positions
    assert with_images >= int(text_only.counts[name][0]) + 2 * 16
    assert len({int(counts[0]) for counts in k256_imatrix.counts.values()}) == 1  # every matrix saw every row
    assert text_only.calibration["image_positions"] == 0


def test_gguf_round_trip_and_llama_cpp_layout(k256_imatrix, tmp_path):
    import gguf

    path = write_imatrix_gguf(k256_imatrix, tmp_path / "imatrix.gguf")
    back = read_imatrix(path)
    assert back.tensor_names == k256_imatrix.tensor_names
    for name in back.tensor_names:
        assert np.array_equal(back.sums[name], k256_imatrix.sums[name])
        assert np.array_equal(back.counts[name], k256_imatrix.counts[name])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (
        k256_imatrix.datasets, k256_imatrix.chunk_count, k256_imatrix.chunk_size)
    assert back.calibration == k256_imatrix.calibration

    # the layout tools/imatrix/imatrix.cpp writes: keys and types, sorted names, in_sum2 then counts,
    # F32 tensors; a dense weight's [n_cols, 1] and [1, 1] tensors are stored 1-D (ggml_n_dims)
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    vt = gguf.GGUFValueType
    assert fields["general.type"].types == [vt.STRING] and back.datasets == ["subset"]
    assert fields["imatrix.datasets"].types == [vt.ARRAY, vt.STRING]
    assert fields["imatrix.chunk_count"].types == [vt.UINT32] and fields["imatrix.chunk_size"].types == [vt.UINT32]
    assert "general.architecture" not in fields
    names = [tensor.name for tensor in reader.tensors]
    assert names == [f"{n}{suffix}" for n in sorted(k256_imatrix.sums) for suffix in (".in_sum2", ".counts")]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        width = 768 if "ffn_down" in tensor.name else 256
        assert list(tensor.shape) == ([width] if tensor.name.endswith(".in_sum2") else [1])


def test_write_refuses_to_overwrite_and_leaves_nothing_on_failure(k256_imatrix, tmp_path, monkeypatch):
    import gguf

    path = tmp_path / "imatrix.gguf"
    path.write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists"):
        write_imatrix_gguf(k256_imatrix, path)
    assert path.read_bytes() == b"keep"

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    target = tmp_path / "new.gguf"
    with pytest.raises(OSError):
        write_imatrix_gguf(k256_imatrix, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.gguf"]


def _legacy_bytes(entries: dict[str, tuple[np.ndarray, int]], chunks: int, dataset: str) -> bytes:
    """The legacy .dat layout of imatrix.cpp's save_imatrix_legacy: values stored as Σx²/count × ncall."""
    out = struct.pack("<i", len(entries))
    for name, (values, ncall) in entries.items():
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    return out + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()


def test_legacy_dat_is_read(tmp_path):
    rng = np.random.default_rng(0)
    raw_sums = {"blk.0.attn_q.weight": rng.uniform(1, 50, 8), "blk.0.ffn_down.weight": rng.uniform(1, 50, 16)}
    raw_count, chunk_size = 3000, 512
    ncall = -(-raw_count // chunk_size)  # ceiling division, as save_imatrix_legacy does
    entries = {name: ((sums / raw_count * ncall).astype(np.float32), ncall) for name, sums in raw_sums.items()}
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_legacy_bytes(entries, chunks=5, dataset="wiki.train.raw"))
    loaded = read_imatrix(path)
    assert loaded.tensor_names == sorted(raw_sums)
    assert loaded.datasets == ["wiki.train.raw"] and loaded.chunk_count == 5
    for name, sums in raw_sums.items():  # what llama-quantize passes: stored / ncall = Σx² / count
        np.testing.assert_allclose(loaded.mean_squares(name), sums / raw_count, rtol=1e-6)
    # the trailing chunk count and dataset are optional
    path.write_bytes(_legacy_bytes(entries, 0, "")[:-8])
    assert read_imatrix(path).datasets == []


def test_mismatched_imatrix_is_refused(converted, k256_imatrix, small_calibration, tmp_path):
    check_imatrix_matches(k256_imatrix, converted("mm-k256").text_path)  # its own model: fine
    deep = converted("mm-deep")
    text_only = without_images(load_calibration(small_calibration))
    other = compute_imatrix(deep.text_path, None, calibration=text_only, max_chunks=1, progress=False)
    with pytest.raises(UserError, match="does not belong to"):
        check_imatrix_matches(other, converted("mm-k256").text_path)
    with pytest.raises(UserError, match="does not belong to"):
        check_imatrix_matches(k256_imatrix, deep.text_path)
    partial = Imatrix(dict(list(k256_imatrix.sums.items())[:-1]), k256_imatrix.counts, [], 1, 512)
    with pytest.raises(UserError, match="have no entry"):
        check_imatrix_matches(partial, converted("mm-k256").text_path)


def test_unreadable_files_are_refused(k256_imatrix, converted, tmp_path):
    good = write_imatrix_gguf(k256_imatrix, tmp_path / "good.gguf").read_bytes()
    cases = {
        "truncated.gguf": good[: len(good) // 2],
        "random.dat": np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "empty.dat": b"",
        "short.dat": _legacy_bytes({"blk.0.attn_q.weight": (np.ones(64, np.float32), 1)}, 1, "x")[:40],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError):
            read_imatrix(tmp_path / name)
    with pytest.raises(UserError, match="not an imatrix|no imatrix entries"):
        read_imatrix(converted("mm-k256").text_path)
    with pytest.raises(UserError, match="not found"):
        read_imatrix(tmp_path / "missing.gguf")


def test_accumulation_matches_llama_imatrix_loops():
    rng = np.random.default_rng(2)
    # MUL_MAT with a 3D weight of 2 matrices: slice i2 goes to matrix i2 % 2
    x = rng.standard_normal((1, 4, 3, 5)).astype(np.float32)
    sums, counts = np.zeros((2, 5)), np.zeros(2, dtype=np.int64)
    accumulate_mul_mat(sums, counts, x, [5, 7, 2, 1])
    expected = np.zeros((2, 5))
    for i2 in range(4):
        for row in range(3):
            expected[i2 % 2] += x[0, i2, row].astype(np.float64) ** 2
    np.testing.assert_allclose(sums, expected)
    assert counts.tolist() == [6, 6]
    # MUL_MAT_ID: 6 tokens, 2 experts used each, activations broadcast over slots (n_x = 1)
    x = rng.standard_normal((6, 1, 5)).astype(np.float32)
    ids = rng.integers(0, 4, (6, 2)).astype(np.int32)
    sums, counts = np.zeros((4, 5)), np.zeros(4, dtype=np.int64)
    accumulate_mul_mat_id(sums, counts, x, ids)
    expected, expected_counts = np.zeros((4, 5)), np.zeros(4, dtype=np.int64)
    for token in range(6):
        for slot in range(2):
            expected[ids[token, slot]] += x[token, slot % 1].astype(np.float64) ** 2
            expected_counts[ids[token, slot]] += 1
    np.testing.assert_allclose(sums, expected)
    assert counts.tolist() == expected_counts.tolist()


def test_mean_squares_divides_by_counts_and_fills_empty_experts():
    imatrix = Imatrix({"w": np.array([4, 8, 3, 3], np.float32)}, {"w": np.array([2, 0], np.float32)}, ["d"], 1, 512)
    assert imatrix.mean_squares("w").tolist() == [2, 4, 1, 1]


def test_bundled_calibration_set(converted):
    calibration = load_calibration()
    assert 40 <= len(calibration.items) <= 80 and calibration.image_items >= 10
    assert len({item.id for item in calibration.items}) == len(calibration.items)
    assert calibration.sha256 == hashlib.sha256(DEFAULT_PATH.read_bytes()).hexdigest()
    generators = set()
    for item in calibration.items:
        for spec in item.image_specs:
            generators.add(spec["generator"])
            first, second = render_image(spec, 224), render_image(spec, 224)
            assert first.shape == (224, 224, 3) and first.dtype == np.uint8 and np.array_equal(first, second)
            assert first.std() > 10  # a picture, not a flat field
    assert generators == {"chest_radiograph", "histology", "skin_lesion"}
    described = calibration_description(model_path=converted("mm-k256").text_path)
    assert (described["items"], described["image_items"], described["sha256"]) == (
        len(calibration.items), calibration.image_items, calibration.sha256)
    assert described["tokens"] > 50 * len(calibration.items)
    assert calibration_description()["tokens"] is None


def test_bad_calibration_files_are_refused(tmp_path, converted):
    cases = {
        "not-json.jsonl": "{not json\n",
        "no-messages.jsonl": json.dumps({"id": "a"}) + "\n",
        "bad-generator.jsonl": json.dumps({"id": "a", "messages": [{"role": "user", "content": [
            {"type": "image", "synthetic": {"generator": "mri", "seed": 1}}]}]}) + "\n",
        "bad-role.jsonl": json.dumps({"id": "a", "messages": [{"role": "doctor", "content": []}]}) + "\n",
        "empty.jsonl": "\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(UserError):
            load_calibration(tmp_path / name)
    with pytest.raises(UserError, match="cannot read"):
        load_calibration(tmp_path / "missing.jsonl")
    result = converted("mm-k256")
    with pytest.raises(UserError, match="chunk size"):
        compute_imatrix(result.text_path, result.mmproj_path, chunk_size=8, progress=False)
    with pytest.raises(UserError, match="chunks"):
        compute_imatrix(result.text_path, result.mmproj_path, max_chunks=0, progress=False)


def test_cli_writes_a_readable_imatrix(converted, small_calibration, tmp_path):
    from click.testing import CliRunner

    from medgemma_gguf.convert.quantize.cli import imatrix_command

    result = converted("mm-k256")
    output = tmp_path / "out" / "imatrix.gguf"
    args = [str(result.text_path), "--mmproj", str(result.mmproj_path), "-o", str(output),
            "--calibration", str(small_calibration), "--chunks", "1", "-q"]
    run = CliRunner().invoke(imatrix_command, args)
    assert run.exit_code == 0, run.output
    imatrix = read_imatrix(output)
    check_imatrix_matches(imatrix, result.text_path)
    assert imatrix.chunk_count == 1 and "image positions" in run.output
    again = CliRunner().invoke(imatrix_command, args)
    assert isinstance(again.exception, UserError) and "already exists" in str(again.exception)
