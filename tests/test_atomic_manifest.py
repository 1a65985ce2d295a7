"""Atomic outputs and the manifest."""

import json

import pytest

from medgemma_gguf.atomic import StagedOutputs, atomic_output
from medgemma_gguf.errors import UserError
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.manifest import Manifest, entry_for


def test_atomic_output_renames_only_on_success(tmp_path):
    final = tmp_path / "a.gguf"
    with atomic_output(final) as tmp:
        tmp.write_bytes(b"done")
        assert not final.exists()
    assert final.read_bytes() == b"done"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "a.gguf"
    with pytest.raises(RuntimeError), atomic_output(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    final = tmp_path / "a.gguf"
    final.write_bytes(b"old")
    with pytest.raises(UserError, match="force=True") as caught, atomic_output(final):
        pass
    assert "pass --force" in caught.value.for_cli()
    assert final.read_bytes() == b"old"
    with atomic_output(final, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"


def test_staged_outputs_appear_together_or_not_at_all(tmp_path):
    old = tmp_path / "b.gguf"
    old.write_bytes(b"user's file")
    with pytest.raises(KeyboardInterrupt), StagedOutputs(force=True) as staged:
        staged.stage(tmp_path / "a.gguf").write_bytes(b"a")
        staged.stage(old).write_bytes(b"b")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf"] and old.read_bytes() == b"user's file"
    with StagedOutputs(force=True) as staged:
        staged.stage(tmp_path / "a.gguf").write_bytes(b"a")
        staged.stage(old).write_bytes(b"b")
        staged.commit()
    assert (tmp_path / "a.gguf").read_bytes() == b"a" and old.read_bytes() == b"b"


def test_unwritable_folder_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create output folder"), atomic_output(blocker / "sub" / "a.gguf"):
        pass


def test_manifest_round_trip_and_upsert(tmp_path):
    file = tmp_path / "m-F32.gguf"
    file.write_bytes(b"GGUF1234")
    manifest = Manifest(model="m", source={"repo_or_path": "google/m", "revision": "abc"})
    manifest.upsert(entry_for(tmp_path, file, "text", "F32", bpw=32.0))
    manifest.upsert(entry_for(tmp_path, file, "text", "F32", bpw=32.0))
    manifest.save(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["files"] == [{"path": "m-F32.gguf", "role": "text", "type": "F32", "bytes": 8,
                              "sha256": sha256_of(file), "bpw": 32.0}]
    loaded = Manifest.load(tmp_path)
    assert loaded.find("text")[0].extra == {"bpw": 32.0} and loaded.source["revision"] == "abc"


def test_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        Manifest.load(tmp_path)


GOOD_ROW = {"path": "m-Q4_K_M.gguf", "role": "text", "type": "Q4_K_M", "bytes": 8, "sha256": "a" * 64}


@pytest.mark.parametrize(("data", "message"), [
    ([], "the top level must be an object, got list"),
    ({"files": []}, "model is missing"),
    ({"model": "", "files": []}, "model must be a non-empty string"),
    ({"model": "m", "files": "m.gguf"}, "files must be a list, got str"),
    ({"model": "m", "source": ["x"]}, "source must be an object"),
    ({"model": "m", "files": [{k: v for k, v in GOOD_ROW.items() if k != "sha256"}]}, r"files\[0\]\.sha256 is missing"),
    ({"model": "m", "files": [{**GOOD_ROW, "sha256": "12"}]}, r"files\[0\]\.sha256 must be a sha256"),
    ({"model": "m", "files": [{**GOOD_ROW, "bytes": -1}]}, r"files\[0\]\.bytes must be a whole number"),
    ({"model": "m", "files": [{**GOOD_ROW, "bits_per_weight": "4.5"}]},
     r"files\[0\]\.bits_per_weight must be a number"),
    ({"model": "m", "files": [{**GOOD_ROW, "role": "weights"}]}, r"files\[0\]\.role must be one of text, mmproj"),
    ({"model": "m", "files": [{**GOOD_ROW, "path": "../../../../etc/passwd"}]},
     r"files\[0\]\.path must be a path inside"),
    ({"model": "m", "files": [{**GOOD_ROW, "path": "/etc/passwd"}]}, r"files\[0\]\.path must be a path inside"),
    ({"model": "m", "files": [{**GOOD_ROW, "mmproj": "../other/mmproj.gguf"}]}, r"files\[0\]\.mmproj must be a path"),
    ({"model": "m", "files": [GOOD_ROW, GOOD_ROW]}, "lists 'm-Q4_K_M.gguf' twice"),
    ({"model": "m", "files": [], "schema_version": 99}, "schema version 99, newer than .* upgrade medgemma-gguf"),
    ({"model": "m", "files": [], "schema_version": "2"}, "schema_version must be a whole number"),
])
def test_a_malformed_manifest_names_the_field(tmp_path, data, message):
    from medgemma_gguf.errors import IntegrityError

    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=message) as caught:
        Manifest.load(tmp_path)
    assert "\n" not in str(caught.value) and "manifest.json" in str(caught.value)


def test_non_utf8_and_deeply_nested_manifests_are_refused(tmp_path):
    from medgemma_gguf.errors import IntegrityError

    (tmp_path / "manifest.json").write_bytes(b'{"model": "\xff"}')
    with pytest.raises(IntegrityError, match="not UTF-8"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IntegrityError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_schema_version_is_written_and_a_version_1_manifest_reads(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "m", "source": {}, "files": [GOOD_ROW],
                                                        "note": "kept"}))
    manifest = Manifest.load(tmp_path)
    assert manifest.files[0].type == "Q4_K_M" and manifest.extra == {"note": "kept"}
    manifest.save(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema_version"] == 2 and data["note"] == "kept" and data["files"] == [GOOD_ROW]


def test_every_cache_lives_under_one_root(monkeypatch, tmp_path):
    from medgemma_gguf.cache import cache_root
    from medgemma_gguf.quant_eval.reference import default_cache_dir

    monkeypatch.setenv("MEDGEMMA_GGUF_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and default_cache_dir() == tmp_path / "c" / "reference"
    monkeypatch.delenv("MEDGEMMA_GGUF_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "medgemma-gguf"


def test_atomic_directory_appears_complete_or_not_at_all(tmp_path):
    from medgemma_gguf.atomic import atomic_directory

    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as partial:
        (partial / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as partial:
        (partial / "whole.bin").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["whole.bin"]
    with pytest.raises(UserError, match="not an empty folder"), atomic_directory(target):
        pass
    assert (target / "whole.bin").is_file()


def test_mmproj_rows_best_first_by_the_callers_order_and_only_present_files(tmp_path):
    from medgemma_gguf.manifest import MMPROJ_PRECISION_ORDER, FileEntry

    names = {"m-Q8_0.gguf": "Q8_0", "m-F32.gguf": "F32", "m-F16.gguf": "f16", "m-X.gguf": "X", "gone.gguf": "F16"}
    for name in names:
        if name != "gone.gguf":
            (tmp_path / name).write_bytes(b"GGUF")
    manifest = Manifest(model="m", source={}, files=[FileEntry(n, "mmproj", t, 4, "0") for n, t in names.items()])
    assert [r.path for r in manifest.mmprojs(tmp_path)] == ["m-F16.gguf", "m-F32.gguf", "m-Q8_0.gguf", "m-X.gguf"]
    assert [r.path for r in manifest.mmprojs(tmp_path, MMPROJ_PRECISION_ORDER)][:2] == ["m-F32.gguf", "m-F16.gguf"]
    assert "gone.gguf" not in [r.path for r in manifest.present(tmp_path, "mmproj")]
