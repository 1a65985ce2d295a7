"""llama.cpp's split format: convert and quantize write parts under a size limit (default: 45 GB parts for files
over 49 GB), llama.cpp loads them from the first part with the same logits as the whole file, the manifest
records every part, and a missing, truncated or foreign part is one clear line before anything loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medgemma_gguf.errors import IntegrityError, UserError
from medgemma_gguf.gguf_info import read_gguf_header, read_gguf_info
from medgemma_gguf.gguf_split import SPLIT_DEFAULT_MAX, parse_split_size, split_gguf, split_size
from medgemma_gguf.manifest import Manifest

VARIANT = "mm-k256"
PART = 8_000_000  # the tiny model's F32 text GGUF is 20 MB: three parts
TEXT = "The chest radiograph showed a right lower lobe consolidation and a small effusion."


def test_when_to_split():
    assert split_size(54 * 10**9, None) == SPLIT_DEFAULT_MAX  # 27B BF16: split by default
    assert split_size(48 * 10**9, None) == 0
    assert split_size(20_000_000, PART) == PART and split_size(5_000_000, PART) == 0
    assert split_size(54 * 10**9, 0) == 0  # --split-max-size 0: never
    assert parse_split_size("45GB") == 45 * 10**9 and parse_split_size("0") == 0 and parse_split_size(None) is None
    with pytest.raises(UserError, match="cannot read the size"):
        parse_split_size("lots")


@pytest.fixture(scope="module")
def split_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    from medgemma_gguf.convert.converter import convert_checkpoint

    outdir = tmp_path_factory.mktemp("split") / "out"
    convert_checkpoint(str(tiny_checkpoint(VARIANT)), outdir, outtype="f32", mmproj_type="f32", progress=False,
                       split_max_size=PART)
    return outdir


def _logits(path: Path) -> np.ndarray:
    from medgemma_gguf.runtime.engine import Engine

    with Engine(path, n_ctx=128, n_threads=1) as engine:
        return engine.eval_tokens([engine.bos_token, *engine.tokenize(TEXT)], logits="all")


def test_convert_writes_parts_that_load_with_the_same_logits(split_folder, converted):
    whole = converted(VARIANT).text_path
    parts = sorted(split_folder.glob("*-0000?-of-00003.gguf"))
    assert [p.name for p in parts] == [f"{whole.stem}-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert not (split_folder / whole.name).exists()
    headers = [read_gguf_header(p) for p in parts]
    assert [(h.metadata["split.no"], h.metadata["split.count"]) for h in headers] == [(0, 3), (1, 3), (2, 3)]
    assert all(sum(t.n_bytes for t in h.tensors) <= PART for h in headers)
    assert "tokenizer.ggml.tokens" not in headers[1].metadata  # metadata in the first part only
    merged, original = read_gguf_info(parts[0]), read_gguf_info(whole)
    assert [t.name for t in merged.tensors] == [t.name for t in original.tensors]
    assert merged.bits_per_weight == original.bits_per_weight
    (row,) = Manifest.load(split_folder).find("text")
    assert row.path == parts[0].name and [p["path"] for p in row.parts] == [p.name for p in parts]
    assert row.bytes == sum(p.stat().st_size for p in parts)
    np.testing.assert_array_equal(_logits(parts[0]), _logits(whole))


def test_a_split_quant_is_one_quant_for_chat_and_fit(split_folder, tmp_path):
    from medgemma_gguf.convert.quantize.folder import quantize_folder
    from medgemma_gguf.runtime.quant_choice import rank_quants

    folder = Path(shutil.copytree(split_folder, tmp_path / "out"))
    [result] = quantize_folder(folder, "Q8_0", progress=False, n_threads=1, split_max_size=2_000_000,
                               imatrix="none")
    parts = sorted(folder.glob("*-Q8_0-0000?-of-*.gguf"))
    assert len(parts) >= 2 and result.path == parts[0]
    row = next(r for r in Manifest.load(folder).find("text") if r.type == "Q8_0")
    assert row.path == parts[0].name and len(row.parts) == len(parts)
    ranked = rank_quants(folder, n_ctx=256, vram_bytes=8 << 30)
    assert [c.path.name for c in ranked] == [next(folder.glob("*-F32-00001-of-00003.gguf")).name, parts[0].name]
    assert ranked[1].bytes == sum(p.stat().st_size for p in parts)
    # the same folder without its manifest: the parts are found and read as one model
    (folder / "manifest.json").unlink()
    discovered = Manifest.discover(folder)
    assert sorted(r.type for r in discovered.find("text")) == ["F32", "Q8_0"]
    from medgemma_gguf.runtime.chat import load

    with load(folder, quant="Q8_0", n_ctx=256, n_threads=1, n_gpu_layers=0) as model:
        assert model.model_path == parts[0] and model.mmproj_path is not None
        assert model.chat([{"role": "user", "content": "Hello"}], max_tokens=2).completion_tokens >= 1


@pytest.fixture
def copy(split_folder, tmp_path) -> Path:
    return Path(shutil.copytree(split_folder, tmp_path / "out"))


def _first(folder: Path) -> Path:
    return next(folder.glob("*-00001-of-00003.gguf"))


def test_a_missing_part_is_one_line_before_loading(copy, cli_main, capsys):
    next(copy.glob("*-00002-of-00003.gguf")).unlink()
    with pytest.raises(IntegrityError, match=r"-00002-of-00003.gguf is missing: .* is part 1 of 3"):
        read_gguf_info(_first(copy))
    assert cli_main(["chat", str(_first(copy)), "--prompt", "x", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-00002-of-00003.gguf" in err[0] and "missing" in err[0]


def test_a_truncated_part_is_one_line_before_loading(copy, cli_main, capsys):
    part = next(copy.glob("*-00003-of-00003.gguf"))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    assert cli_main(["chat", str(_first(copy)), "--prompt", "x", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-00003-of-00003.gguf is" in err[0] and "truncated" in err[0]
    assert cli_main(["fit", str(copy)]) == 2  # the folder's only text model is the damaged one
    assert "truncated" in capsys.readouterr().err
    (copy / "manifest.json").unlink()  # without a manifest the header check finds it
    assert cli_main(["chat", str(_first(copy)), "--prompt", "x", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-00003-of-00003.gguf is truncated" in err[0] and "download or write it again" in err[0]


def test_a_part_of_another_split_or_a_later_part_is_refused(copy):
    second = next(copy.glob("*-00002-of-00003.gguf"))
    with pytest.raises(UserError, match="is part 2 of a 3-part model; pass .*-00001-of-00003.gguf"):
        read_gguf_info(second)
    shutil.copy(next(copy.glob("*-00003-of-00003.gguf")), second)
    with pytest.raises(IntegrityError, match="says it is part 3 of 3, not 2 of 3"):
        read_gguf_info(_first(copy))
    second.write_bytes(b"not a gguf")
    with pytest.raises(IntegrityError, match="part 2 of 3 of .* is damaged: .* is not a GGUF file"):
        read_gguf_info(_first(copy))


def test_split_gguf_rewrites_a_file_atomically(converted, tmp_path):
    source = tmp_path / "model.gguf"
    shutil.copy(converted(VARIANT).text_path, source)
    assert split_gguf(source, 100_000_000) == [source]  # fits in one part: unchanged
    parts = split_gguf(source, PART)
    assert [p.name for p in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)] and not source.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in parts]  # nothing else left behind
    np.testing.assert_array_equal(_logits(parts[0]), _logits(converted(VARIANT).text_path))


@pytest.fixture
def cli_main():
    from medgemma_gguf import cli

    return cli.main
