"""Own evaluation sets: ``eval --slice my.jsonl`` / ``my.csv`` (closed questions, image questions by path or
DICOM, free text scored by KL only), validated with line-numbered errors; the bundled example files; the
report names the file and its sha256 and carries the provenance record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_eval.slices import DATA_DIR, load_slice, read_eval_file, slice_hash

EXAMPLE_JSONL = DATA_DIR / "own-set-example.jsonl"
EXAMPLE_CSV = DATA_DIR / "own-set-example.csv"


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.unit
def test_bundled_examples_load_with_every_kind():
    own = load_slice(str(EXAMPLE_JSONL))
    kinds = {item.id: (item.answer_index, item.free_text, item.reference_answer is not None, item.image is not None)
             for item in own}
    assert kinds == {"antidote-paracetamol": (0, False, False, False), "heparin-reversal": (1, False, False, False),
                     "opacity-side": (1, False, False, True), "explain-troponin": (-1, True, True, False),
                     "describe-image": (-1, True, False, True)}
    import hashlib

    described = own.describe()
    assert described["sha256"] == hashlib.sha256(EXAMPLE_JSONL.read_bytes()).hexdigest()
    assert described["file"] == str(EXAMPLE_JSONL) and described["format"] == "jsonl"
    assert described["n_items"] == 5 and described["n_free_text"] == 2 and described["has_images"]
    csv_set = load_slice(str(EXAMPLE_CSV))
    assert [(i.id, i.options[i.answer_index] if i.options else i.reference_answer[:9]) for i in csv_set] == [
        ("antidote-opioid", "Naloxone"), ("warfarin-reversal", "Vitamin K"), ("opacity-side", "right"),
        ("explain-lactate", "It sugges")]
    assert csv_set.describe()["format"] == "csv" and csv_set.items[2].options == ["left", "right"]
    image = csv_set.items[2].image.load()
    assert image.mode == "RGB" and image.size == (128, 128)
    gray = np.asarray(image.convert("L"), dtype=float)
    assert gray[:, 64:].mean() > gray[:, :64].mean()  # the opacity is on the right, as the answer says
    assert load_slice(f"{EXAMPLE_JSONL}:2").describe()["n_items"] == 2


@pytest.mark.unit
def test_answers_by_letter_text_or_index_and_the_defaults(tmp_path):
    path = _jsonl(tmp_path / "set.jsonl", [
        {"question": "q1?", "options": ["x", "y", "z"], "answer": "c"},
        {"prompt": "q2?", "options": ["Alpha", "Beta"], "answer": " beta "},
        {"question": "q3?", "options": ["x", "y"], "answer_index": 1, "answer": "B"},
        {"question": "Explain.", "answer": "Because."},
        {"question": "Explain more.", "provenance": {"source": "ward 3", "license": "internal", "author": "me"}},
    ])
    items = read_eval_file(path)
    assert [(i.id, i.answer_index) for i in items] == [("line-1", 2), ("line-2", 1), ("line-3", 1), ("line-4", -1),
                                                        ("line-5", -1)]
    assert items[3].reference_answer == "Because." and items[4].reference_answer is None
    assert items[4].provenance == {"source": "ward 3", "license": "internal", "author": "me"}
    # the reference reply is part of the content hash; a closed question's hash is what it always was
    changed = _jsonl(tmp_path / "b.jsonl", [{"question": "Explain.", "answer": "Because not."}])
    same = _jsonl(tmp_path / "c.jsonl", [{"question": "Explain.", "answer": "Because."}])
    assert slice_hash(read_eval_file(changed)) != slice_hash(read_eval_file(same))


@pytest.mark.unit
@pytest.mark.parametrize(("lines", "message"), [
    (['{"question": "a?", "options": ["x", "y"], "answer": "A"}', '{"question": oops}'],
     r"set.jsonl line 2: not valid JSON"),
    (['{"question": "a?", "options": ["x", "y"], "answr": "A"}'], r"line 1: unknown field\(s\) answr"),
    (['{"options": ["x", "y"], "answer": "A"}'], r"line 1: missing field\(s\) question"),
    (['{"question": "a?", "options": ["x", "y"], "answer": "C"}'],
     r"line 1: item 'line-1' has answer 'C', neither a letter A-B nor the text of one of its options"),
    (['{"question": "a?", "options": ["x", "y"]}'], r"line 1: item 'line-1' has options but no answer"),
    (['{"question": "a?", "options": ["x", "y"], "answer": "A", "answer_index": 1}'],
     r"has answer 'A' but answer_index 1"),
    (['{"question": "a?", "options": ["x"], "answer": "A"}'],
     r"has 1 option\(s\); a closed question needs at least two"),
    (['{"question": "a?", "answer_index": 0}'], r"has answer_index but no options"),
    (['{"id": "q", "question": "a?"}', '', '{"id": "q", "question": "b?"}'],
     r"set.jsonl line 3: item id 'q' appears twice \(first on line 1\)"),
    (['{"question": "a?", "image": "missing.png"}'], r"line 1: image file .*missing.png does not exist"),
    (['{"question": "a?", "provenance": {"source": "x"}}'], r"lacks provenance license, author or url"),
    (['{"question": "  "}'], r"has an empty question"),
    (['', '  '], r"holds no items"),
])
def test_bad_jsonl_sets_name_the_line(tmp_path, lines, message):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_slice(str(path))


@pytest.mark.unit
@pytest.mark.parametrize(("text", "message"), [
    ("question,A,B,answer,notes\nq?,x,y,A,n\n", r"set.csv line 1: unknown column\(s\) notes"),
    ("question,A,B,C,answer\nq?,x,y,z,A\nq2?,x,,z,A\n", r"set.csv line 3: options in columns A, C; fill them from A"),
    ('question,A,B,answer\n"multi\nline q?",x,y,A\nq2?,x,y,Z\n', r"set.csv line 4: item 'line-4' has answer 'Z'"),
    ("question,A,B,answer\nq?,x,y,A,extra\n", r"set.csv line 2: more cells than columns"),
    ("", r"set.csv line 1: no header row"),
])
def test_bad_csv_sets_name_the_line(tmp_path, text, message):
    path = tmp_path / "set.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_slice(str(path))


@pytest.mark.unit
def test_dicom_image_by_path(tmp_path):
    from imaging_data import new_dataset

    pixels = np.tile(np.linspace(0, 4000, 32, dtype=np.uint16), (32, 1))
    ds = new_dataset("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    (tmp_path / "scans").mkdir()
    ds.save_as(tmp_path / "scans" / "cxr.dcm", enforce_file_format=True)
    record = {"id": "d", "question": "Left or right brighter?", "options": ["left", "right"], "answer": "right",
              "image": "scans/cxr.dcm"}
    path = _jsonl(tmp_path / "set.jsonl", [record])
    (item,) = load_slice(str(path)).items
    image = item.image.load()  # 12-bit grayscale through the runtime's DICOM loader: min-max to 8 bits
    gray = np.asarray(image.convert("L"))
    assert image.size == (32, 32) and gray[0, 0] == 0 and gray[0, -1] == 255
    (tmp_path / "scans" / "cxr.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"broken")
    with pytest.raises(UserError):
        load_slice(str(path)).items[0].image.load()


# --- through the evaluation -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_eval_scores_an_own_set_and_names_it(tiny_checkpoint, converted, tmp_path, monkeypatch):
    from medgemma_gguf.hashing import sha256_of
    from medgemma_gguf.quant_eval.evaluate import EvalOptions, run_eval
    from medgemma_gguf.quant_eval.report import render_markdown

    monkeypatch.setenv("MEDGEMMA_GGUF_CACHE", str(tmp_path / "cache"))
    variant = "mm-k256"
    files = converted(variant)
    report = run_eval([files.text_path], str(tiny_checkpoint(variant)), tmp_path / "report",
                      EvalOptions(slices=[str(EXAMPLE_JSONL)], reference_dtype="f32", cache_dir=tmp_path / "ref",
                                  heldout=False, measure_speed=False, n_threads=1, progress=False))
    (row,) = report.rows
    assert row.error is None
    spec = str(EXAMPLE_JSONL)
    # the F32 GGUF is the checkpoint: KL ~ 0 over every item, free text included; accuracy over the 3 closed ones
    assert row.kld.mean <= 1e-5 and row.parts[spec].n_positions > 0 and row.parts[spec].top1_agreement >= 0.999
    accuracy = row.accuracy[spec]
    assert accuracy.n == 3 and accuracy.accuracy == accuracy.reference_accuracy
    (entry,) = report.slices
    assert entry["file"] == spec and entry["sha256"] == sha256_of(EXAMPLE_JSONL) and entry["n_free_text"] == 2
    provenance = report.provenance
    inputs = {i["role"]: i for i in provenance["inputs"]}
    assert inputs["slice"]["sha256"] == entry["sha256"] and inputs["model"]["sha256"] == sha256_of(files.text_path)
    assert inputs["reference"]["sha256"] == report.reference["sha256"] and provenance["threads"] == 1
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["provenance"]["inputs"] == provenance["inputs"] and saved["slices"][0]["sha256"] == entry["sha256"]
    markdown = render_markdown(report)
    assert f"sha256 {entry['sha256']}" in markdown and "2 free text, KL only" in markdown
    assert "Produced by medgemma-gguf" in markdown
