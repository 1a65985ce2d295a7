"""Evaluation slices: bundled data, public-benchmark loaders (on hand-written fixtures), specs, hashing."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_eval import loaders
from medgemma_gguf.quant_eval.items import ImageRef, Item, mean_by_half, render_synthetic, synthetic_answer
from medgemma_gguf.quant_eval.loaders import BENCHMARKS, closed_options, load_benchmark
from medgemma_gguf.quant_eval.slices import (
    Slice,
    load_heldout_text,
    load_slice,
    parse_spec,
    read_slice_jsonl,
    save_slice,
    slice_hash,
)

FIXTURES = Path(__file__).parent / "data" / "benchmarks"


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(loaders.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _item(i: int, **changes) -> Item:
    base = Item(id=f"q{i}", question=f"Question {i}?", options=["a", "b", "c"], answer_index=i % 3,
                provenance={"source": "test", "license": "CC0-1.0", "author": "tests"})
    return replace(base, **changes)


# --------------------------------------------------------------------------- bundled slices


@pytest.mark.parametrize("name, expected_len", [("medqa-mini", 40), ("vqa-mini", 24)])
def test_bundled_slices_validate(name: str, expected_len: int) -> None:
    items = load_slice(name).items
    assert len(items) == expected_len
    assert len({item.id for item in items}) == len(items)
    for item in items:
        assert 0 <= item.answer_index < len(item.options)
        assert len(set(item.options)) == len(item.options)
        assert item.provenance["source"] and item.provenance["license"]
        assert item.provenance.get("author") or item.provenance.get("url")


def test_medqa_mini_is_four_option_text_with_balanced_answers() -> None:
    items = load_slice("medqa-mini").items
    assert all(item.image is None and len(item.options) == 4 for item in items)
    assert all(item.provenance["license"] == "CC0-1.0" for item in items)
    positions = Counter(item.answer_index for item in items)
    assert set(positions) == {0, 1, 2, 3} and min(positions.values()) >= 8


def test_vqa_mini_images_render_deterministically() -> None:
    items = load_slice("vqa-mini").items
    assert all(item.image is not None and item.image.synthetic is not None for item in items)
    first = [item.image.digest() for item in items]
    second = [item.image.digest() for item in load_slice("vqa-mini").items]
    assert first == second
    assert len(set(first)) == len(first), "every synthetic image should differ"
    params = items[0].image.synthetic
    assert render_synthetic(params).tobytes() == render_synthetic(dict(params)).tobytes()
    assert render_synthetic({**params, "seed": params["seed"] + 1}).tobytes() != render_synthetic(params).tobytes()


def _bright_blobs(pixels: np.ndarray, threshold: float = 150.0) -> int:
    """Count 4-connected regions brighter than ``threshold``."""
    mask = pixels > threshold
    seen = np.zeros_like(mask)
    blobs = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        blobs += 1
        stack = [start]
        seen[start] = True
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
    return blobs


def _answer_from_pixels(item: Item) -> str:
    """Read the answer off the image alone (never from the generator parameters)."""
    image = item.image.load()
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    left, right = mean_by_half(image)
    asks = item.image.synthetic["asks"]
    if asks == "side":
        return "left" if left > right else "right"
    if asks in ("present_left", "present_right"):
        asked = asks.removeprefix("present_")
        assert f"{asked} half" in item.question
        assert _bright_blobs(pixels) == 1
        return "yes" if ("left" if left > right else "right") == asked else "no"
    if asks == "present":
        columns = pixels.mean(axis=0)
        return "yes" if columns.max() - np.median(columns) > 40 else "no"
    if asks == "count":
        return str(_bright_blobs(pixels))
    if asks == "darker_side":
        return "left" if left < right else "right"
    raise AssertionError(f"unknown question kind {asks}")


def test_vqa_mini_answers_are_verifiable_from_pixels() -> None:
    items = load_slice("vqa-mini").items
    for item in items:
        assert _answer_from_pixels(item) == item.answer, item.id
        assert synthetic_answer(item.image.synthetic) == item.answer, item.id
    answers = Counter(item.answer for item in items)
    assert answers["yes"] == answers["no"] and answers["left"] == answers["right"]


def test_heldout_text_has_a_few_kb_with_provenance() -> None:
    chunks = load_heldout_text()
    assert sum(len(chunk.text) for chunk in chunks) >= 3000
    assert len({chunk.id for chunk in chunks}) == len(chunks) >= 6
    assert all(chunk.provenance["source"] and chunk.provenance["license"] for chunk in chunks)
    assert any("medical" in chunk.id for chunk in chunks) and any("general" in chunk.id for chunk in chunks)


# --------------------------------------------------------------------------- public benchmark loaders


@pytest.mark.parametrize(
    "name, ids, answers",
    [
        ("medqa", ["medqa-test-0", "medqa-test-1", "medqa-test-2", "medqa-test-3"],
         ["Iron deficiency anemia", "Right coronary artery", "Treponema pallidum",
          "TSH receptor-stimulating antibody"]),
        ("medmcqa", ["medmcqa-f1a2b3c4-0001", "medmcqa-f1a2b3c4-0002", "medmcqa-f1a2b3c4-0004"],
         ["Vitamin A", "Ethosuximide", "Spinal accessory nerve"]),
        ("pubmedqa", ["pubmedqa-90000001", "pubmedqa-90000002", "pubmedqa-90000003"], ["yes", "no", "maybe"]),
        ("vqa-rad", ["vqa-rad-test-0", "vqa-rad-test-3", "vqa-rad-test-4"], ["no", "right", "yes"]),
        ("slake", ["slake-11", "slake-14", "slake-15"], ["yes", "liver", "no"]),
    ],
)
def test_loader_reads_its_own_schema(name: str, ids: list[str], answers: list[str]) -> None:
    items = load_benchmark(name, local_dir=FIXTURES)
    assert [item.id for item in items] == ids
    assert [item.answer for item in items] == answers
    for item in items:
        assert item.provenance["url"] == f"https://huggingface.co/datasets/{BENCHMARKS[name].repo_id}"
        assert item.provenance["license"]


def test_medmcqa_and_pubmedqa_details() -> None:
    medmcqa = load_benchmark("medmcqa", local_dir=FIXTURES)
    assert medmcqa[1].options == ["Phenytoin", "Carbamazepine", "Ethosuximide", "Phenobarbitone"]
    assert medmcqa[0].provenance["subject"] == "Biochemistry"
    pubmedqa = load_benchmark("pubmedqa", local_dir=FIXTURES)
    assert pubmedqa[0].options == ["yes", "no", "maybe"]
    assert pubmedqa[0].question.startswith("Context: Regular aerobic activity")
    assert pubmedqa[0].question.endswith("Does daily walking lower resting blood pressure in older adults?")


def test_mmlu_medical_reads_all_six_subjects() -> None:
    items = load_benchmark("mmlu-medical", local_dir=FIXTURES)
    subjects = [item.provenance["subject"] for item in items]
    assert list(dict.fromkeys(subjects)) == list(loaders.MMLU_MEDICAL_SUBJECTS)
    assert items[0].options == ["Radius", "Ulna", "Humerus", "Scapula"] and items[0].answer == "Ulna"
    assert items[1].id == "mmlu-anatomy-1" and items[1].answer == "12"


def test_vqa_loaders_keep_only_closed_questions_with_images() -> None:
    for name in ("vqa-rad", "slake"):
        items = load_benchmark(name, local_dir=FIXTURES)
        for item in items:
            assert item.image is not None and item.image.load().size == (16, 16)
            assert item.options == ["yes", "no"] or len(item.options) == 2
    slake = load_benchmark("slake", local_dir=FIXTURES)
    assert all("图" not in item.question for item in slake)
    assert slake[1].options == ["kidney", "liver"]


def test_closed_options() -> None:
    assert closed_options("is there a mass?", "Yes") == (["yes", "no"], 0)
    assert closed_options("Is it normal?", "no.") == (["yes", "no"], 1)
    assert closed_options("Which side, left or right?", "left") == (["left", "right"], 0)
    assert closed_options("Which lung is affected, left or right?", "both") is None
    assert closed_options("What organ is shown?", "liver") is None


def test_data_dir_from_env_and_dataset_folder_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loaders.DATA_DIR_ENV, str(FIXTURES))
    assert [item.id for item in load_slice("medqa:2").items] == ["medqa-test-0", "medqa-test-1"]
    monkeypatch.delenv(loaders.DATA_DIR_ENV)
    direct = load_benchmark("medqa", local_dir=FIXTURES / "GBaker" / "MedQA-USMLE-4-options")
    assert len(direct) == 4


def test_parquet_files_read_like_jsonl(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    repo = tmp_path / "flaviagiammarino" / "vqa-rad" / "data"
    repo.mkdir(parents=True)
    source = FIXTURES / "flaviagiammarino" / "vqa-rad" / "data"
    rows = [json.loads(line) for line in (source / "test-00000-of-00001.jsonl").read_text().splitlines()]
    for row in rows:  # the Hub stores the image bytes inside the parquet file
        row["image"] = {"bytes": (source / row["image"]["path"]).read_bytes(), "path": row["image"]["path"]}
    pq.write_table(pa.Table.from_pylist(rows), repo / "test-00000-of-00001-abc123.parquet")
    from_parquet = load_benchmark("vqa-rad", local_dir=tmp_path)
    from_jsonl = load_benchmark("vqa-rad", local_dir=FIXTURES)
    assert all(item.image.data is not None for item in from_parquet)
    assert slice_hash(from_parquet) == slice_hash(from_jsonl)


def test_hub_download_is_asked_for_the_right_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        return str(FIXTURES / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert len(load_benchmark("pubmedqa")) == 3
    repo_id, kwargs = calls[-1]
    assert repo_id == "qiaojin/PubMedQA"
    assert kwargs["repo_type"] == "dataset"
    assert kwargs["allow_patterns"] == ["pqa_labeled/train-*.parquet"]
    assert kwargs["local_files_only"] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_benchmark("mmlu-medical")
    assert calls[-1][0] == "cais/mmlu" and calls[-1][1]["local_files_only"] is True
    assert calls[-1][1]["allow_patterns"][0] == "anatomy/*test*.parquet" and len(calls[-1][1]["allow_patterns"]) == 6


def test_missing_dataset_offline_says_what_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        load_benchmark("medmcqa", cache_dir=tmp_path / "empty-cache")
    message = str(error.value)
    assert "openlifescienceai/medmcqa" in message and "data/validation-*.parquet" in message
    assert "HF_HUB_OFFLINE" in message and "data_dir" in message and "\n" not in message
    assert "--data-dir" in error.value.for_cli()


def test_missing_dataset_in_local_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"flaviagiammarino/vqa-rad .*data/test-\*\.parquet.*data_dir"):
        load_slice("vqa-rad:5", local_dir=tmp_path)


def test_dataset_file_in_the_wrong_schema_names_file_and_row(tmp_path: Path) -> None:
    folder = tmp_path / "GBaker" / "MedQA-USMLE-4-options"
    folder.mkdir(parents=True)
    _write_jsonl(folder / "phrases_no_exclude_test.jsonl", [{"question": "q?", "options": {"A": "x", "B": "y"}}])
    with pytest.raises(UserError, match=r"phrases_no_exclude_test.jsonl row 0: missing column\(s\) answer_idx"):
        load_benchmark("medqa", local_dir=tmp_path)
    (folder / "phrases_no_exclude_test.jsonl").write_text('{"question": "q?"}\n{not json\n')
    with pytest.raises(UserError, match="phrases_no_exclude_test.jsonl line 2: not valid JSON"):
        load_benchmark("medqa", local_dir=tmp_path)


# --------------------------------------------------------------------------- specs, sampling, hashing


def test_first_n_items() -> None:
    everything = load_slice("medqa", local_dir=FIXTURES).items
    first3 = load_slice("medqa:3", local_dir=FIXTURES)
    assert first3.items == everything[:3] and first3.spec == "medqa:3"
    assert parse_spec("medqa:200@seed=7") == parse_spec(" medqa:200@seed=7 ")
    assert (parse_spec("medqa:200@seed=7").limit, parse_spec("medqa:200@seed=7").seed) == (200, 7)


def test_seeded_sampling_is_deterministic_and_depends_on_seed() -> None:
    items = load_slice("medqa-mini").items
    a = load_slice("medqa-mini:10@seed=7").items
    assert a == load_slice("medqa-mini:10@seed=7").items
    b = load_slice("medqa-mini:10@seed=8").items
    assert len(a) == len(b) == 10 and {i.id for i in a} != {i.id for i in b}
    positions = [items.index(item) for item in a]
    assert positions == sorted(positions), "a sample keeps the source order"
    assert {i.id for i in a} < {i.id for i in load_slice("medqa-mini:11@seed=7").items}
    shuffled = load_slice("medqa-mini@seed=3").items
    assert sorted(i.id for i in shuffled) == sorted(i.id for i in items) and shuffled != items


def test_slice_hash_tracks_item_content() -> None:
    items = list(load_slice("vqa-mini").items)
    base = slice_hash(items)
    assert base == slice_hash(load_slice("vqa-mini")) and len(base) == 64
    assert slice_hash([replace(items[0], question=items[0].question + " ")] + items[1:]) != base
    assert slice_hash([replace(items[0], answer_index=1 - items[0].answer_index)] + items[1:]) != base
    assert slice_hash([replace(items[0], options=["no", "yes"])] + items[1:]) != base
    moved = ImageRef(synthetic={**items[0].image.synthetic, "radius": 30})
    assert slice_hash([replace(items[0], image=moved)] + items[1:]) != base
    assert slice_hash(items[::-1]) != base
    assert slice_hash([replace(items[0], provenance={"source": "x"})] + items[1:]) == base


def test_local_jsonl_round_trip(tmp_path: Path) -> None:
    original = load_slice("vqa-rad", local_dir=FIXTURES)
    out = save_slice(original, tmp_path / "frozen.jsonl")
    reloaded = load_slice(str(out))
    assert slice_hash(reloaded) == slice_hash(original)
    assert reloaded.items[0].provenance == original.items[0].provenance
    assert len(load_slice(f"{out}:2")) == 2


def test_save_slice_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.jsonl"
    items = [_item(i) for i in range(3)]
    save_slice(items, target)
    with pytest.raises(UserError, match="already exists"):
        save_slice(items, target)
    target.unlink()
    import medgemma_gguf.quant_eval.slices as slices_module

    real = slices_module.item_to_json

    def failing(item: Item) -> dict:
        if item.id == "q2":
            raise RuntimeError("disk full")
        return real(item)

    monkeypatch.setattr(slices_module, "item_to_json", failing)
    with pytest.raises(RuntimeError):
        save_slice(items, target)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad inputs


def test_unknown_slice_lists_valid_names() -> None:
    with pytest.raises(UserError) as error:
        load_slice("medqa-maxi")
    for name in ("medqa-mini", "vqa-mini", "medqa", "medmcqa", "pubmedqa", "mmlu-medical", "vqa-rad", "slake"):
        assert name in str(error.value)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "question": "q?", "options": ["x", "y"], "answer_index": 0,
                       "provenance": {"source": "t", "license": "CC0-1.0", "author": "me"}})
    path.write_text(good + "\n{\"id\": \"b\", oops\n")
    with pytest.raises(UserError, match=r"bad.jsonl line 2: not valid JSON"):
        load_slice(str(path))
    path.write_text(good + "\n" + json.dumps({"id": "b", "question": "q?"}) + "\n")
    with pytest.raises(UserError, match=r"line 2: missing field\(s\) options, answer_index, provenance"):
        read_slice_jsonl(path)


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "holds no items"),
        ([{"answer_index": 2}], "answer_index 2 but only 2 options"),
        ([{}, {}], "appears twice"),
        ([{"provenance": {"source": "t"}}], "lacks provenance license, author or url"),
        ([{"options": ["only one"]}], "at least two"),
        ([{"image": {"path": "missing.png"}}], "does not exist"),
    ],
)
def test_bad_slice_files(tmp_path: Path, records: list[dict], message: str) -> None:
    base = {"id": "a", "question": "q?", "options": ["x", "y"], "answer_index": 0,
            "provenance": {"source": "t", "license": "CC0-1.0", "author": "me"}}
    path = _write_jsonl(tmp_path / "s.jsonl", [{**base, **changes} for changes in records])
    with pytest.raises(UserError, match=message):
        load_slice(str(path))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty slice spec"),
        ("medqa-mini:0", "asks for 0 items"),
        ("medqa-mini:41", "has 40 items but 41 were asked for"),
        ("does/not/exist.jsonl", "does not exist"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_slice(spec)


def test_unknown_synthetic_kind_is_an_error() -> None:
    with pytest.raises(UserError, match="unknown synthetic image kind"):
        render_synthetic({"kind": "hexagon"})
    with pytest.raises(UserError, match="cannot answer"):
        synthetic_answer({"kind": "tube", "present": True, "asks": "count"})


def test_slice_object_basics() -> None:
    s = Slice(spec="x", items=tuple(_item(i) for i in range(4)))
    assert len(s) == 4 and [i.id for i in s] == ["q0", "q1", "q2", "q3"] and not s.has_images
    assert load_slice("vqa-mini:1").has_images


def test_images_resolve_relative_to_the_data_file(tmp_path: Path) -> None:
    copy = shutil.copytree(FIXTURES, tmp_path / "copy")
    items = load_benchmark("slake", local_dir=copy)
    assert len(items) == 3 and all(item.image.path.startswith(str(copy)) for item in items)
