"""Output folders under a careless or hostile hand (issue 11): ``verify``, the size checks on load, recovery
from killed runs, and malformed manifests (fixed cases and seeded mutations: ``fuzzing.py``) through every
command that reads one — each gets one clear line and exit 2 (``verify``: 1 for files that do not match),
never a traceback, and the folder is left as it was, with no temporary or unrecorded file."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fuzzing import mutations

from medgemma_gguf.cli import main
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.integrity import extra_files, partial_files, recover_folder, verify_folder
from medgemma_gguf.manifest import Manifest

VARIANT = "mm-k256"


def _run(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_folder_consistent(folder: Path) -> None:
    """Every file is described by a valid manifest with its size and sha256; nothing temporary is left."""
    assert partial_files(folder) == [], partial_files(folder)
    manifest = Manifest.load(folder)
    assert extra_files(folder, manifest) == []
    report = verify_folder(folder, progress=False)
    assert report.ok, report.to_json()


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory):
    """A converted folder with a Q8_0 quant (built once; tests work on linked copies)."""
    out = tmp_path_factory.mktemp("folder") / "out"
    code = main(["convert", str(tiny_checkpoint(VARIANT)), "--outdir", str(out), "--name", "m", "--quants", "Q8_0",
                 "--threads", "1", "--quiet"])
    assert code == 0
    assert_folder_consistent(out)
    return out


def _copy(folder: Path, target: Path) -> Path:
    """A copy whose GGUFs are hard links (writers only ever replace files, never write into them)."""
    shutil.copytree(folder, target, copy_function=os.link)
    manifest = target / "manifest.json"
    text = manifest.read_bytes()
    manifest.unlink()
    manifest.write_bytes(text)
    return target


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_verify_reports_ok_changed_missing_and_extra(folder, tmp_path, capsys):
    case = _copy(folder, tmp_path / "case")
    code, out, _ = _run(capsys, "verify", case, "--quiet")
    assert code == 0 and "all 3 files listed" in out
    quant = case / "m-Q8_0.gguf"
    data = quant.read_bytes()
    quant.unlink()
    quant.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    (case / "m-BF16.gguf").unlink()
    (case / "notes.txt").write_text("mine")
    code, out, err = _run(capsys, "verify", case)
    assert code == 1
    assert "changed  m-Q8_0.gguf (same size, different sha256)" in out
    assert "missing  m-BF16.gguf" in out and "extra    notes.txt" in out and "ok       mmproj-m-F16.gguf" in out
    assert "2 of 3 files do not match" in err and "1 changed, 1 missing" in err
    code, out, _ = _run(capsys, "verify", case, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["extra"] == ["notes.txt"]
    assert {f["path"]: f["status"] for f in report["files"]} == {
        "m-BF16.gguf": "missing", "mmproj-m-F16.gguf": "ok", "m-Q8_0.gguf": "changed"}


def test_loading_checks_sizes_and_points_to_verify(folder, tmp_path, capsys):
    case = _copy(folder, tmp_path / "case")
    quant = case / "m-Q8_0.gguf"
    data = quant.read_bytes()
    quant.unlink()
    quant.write_bytes(data[: len(data) - 4096])  # truncated
    for args in (["chat", case, "--quant", "Q8_0", "--prompt", "hi", "--max-tokens", "1", "--threads", "1"],
                 ["chat", quant, "--prompt", "hi", "--max-tokens", "1", "--threads", "1"],
                 ["eval", case, "--reference", case / "m-BF16.gguf", "--out", tmp_path / "report", "--threads", "1"]):
        code, _, err = _run(capsys, *args)
        assert code == 2, err
        assert f"{quant} is {len(data) - 4096} bytes but manifest.json records {len(data)} (truncated)" in err
        assert f"run `medgemma-gguf verify {case}`" in err and err.count("\n") == 1
    quant.unlink()
    quant.write_bytes(data)
    mmproj = case / "mmproj-m-F16.gguf"
    mmproj.unlink()
    mmproj.write_bytes(b"GGUF" + b"\0" * 100)
    for args in (["chat", case, "--quant", "BF16"], ["chat", case / "m-BF16.gguf", "--mmproj", mmproj]):
        code, _, err = _run(capsys, *args, "--prompt", "hi", "--max-tokens", "1", "--threads", "1")
        assert code == 2 and "mmproj-m-F16.gguf is 104 bytes" in err, err


def test_recovery_completes_a_recorded_file_and_removes_dead_partials(folder, tmp_path, capsys):
    """The states a kill can leave (real dead processes): the row saved but the rename not done, and
    temporary files of processes that died before recording anything."""
    case = _copy(folder, tmp_path / "case")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    quant = case / "m-Q8_0.gguf"
    pending = case / f".m-Q8_0.gguf.{pid}.partial"
    os.replace(quant, pending)  # killed between saving the manifest and the rename
    stray = case / f".m-Q4_K_M.gguf.{pid}.partial"
    stray.write_bytes(b"half a quant")
    mine = case / f".m-Q2_K.gguf.{os.getpid()}.partial"  # a live process's file is left alone
    mine.write_bytes(b"in progress")
    code, out, _ = _run(capsys, "verify", case)
    assert code == 1 and "missing  m-Q8_0.gguf" in out
    assert f"partial  .m-Q4_K_M.gguf.{pid}.partial (left by an interrupted run" in out
    assert f"partial  .m-Q2_K.gguf.{os.getpid()}.partial (being written by a running process)" in out
    done = recover_folder(case)
    assert done.adopted == ["m-Q8_0.gguf"] and sorted(done.removed) == [f".m-Q4_K_M.gguf.{pid}.partial"]
    assert quant.is_file() and not pending.exists() and not stray.exists() and mine.exists()
    mine.unlink()
    assert_folder_consistent(case)
    # a partial that does not match its row is removed, never adopted
    os.replace(quant, pending)
    data = pending.read_bytes()
    pending.unlink()
    pending.write_bytes(data[:-1] + b"\0")
    code, out, err = _run(capsys, "fit", case)  # readers recover too
    assert code == 0, err
    assert not pending.exists() and not quant.exists()
    assert Manifest.load(case).present(case, "text")[0].path == "m-BF16.gguf"


def test_convert_rerun_is_up_to_date_and_a_changed_source_needs_force(tiny_checkpoint, folder, tmp_path, capsys):
    case = _copy(folder, tmp_path / "case")
    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint(VARIANT), source)
    before = _snapshot(case)
    code, out, err = _run(capsys, "convert", tiny_checkpoint(VARIANT), "--outdir", case, "--name", "m", "--quants",
                          "Q8_0", "--threads", "1", "--quiet")
    assert code == 0, err
    assert "up to date" in out and "m-BF16.gguf" in out
    assert {k: v for k, v in _snapshot(case).items() if k != "README.md"} == {
        k: v for k, v in before.items() if k != "README.md"}


@pytest.mark.parametrize("name,edit,field", [
    ("a list", lambda m: [m], "the top level must be an object"),
    ("no model", lambda m: {k: v for k, v in m.items() if k != "model"}, "model is missing"),
    ("row without sha256", lambda m: {**m, "files": [{k: v for k, v in m["files"][0].items() if k != "sha256"}]},
     "files[0].sha256 is missing"),
    ("files a string", lambda m: {**m, "files": "m-BF16.gguf"}, "files must be a list"),
    ("bits_per_weight text", lambda m: {**m, "files": [{**m["files"][0], "bits_per_weight": "abc"}, *m["files"][1:]]},
     "files[0].bits_per_weight must be a number"),
    ("path climbs out", lambda m: {**m, "files": [{**m["files"][0], "path": "../../../../etc/passwd"}]},
     "files[0].path must be a path inside the folder"),
    ("absolute path", lambda m: {**m, "files": [*m["files"], {**m["files"][0], "path": "/etc/passwd"}]},
     "files[3].path must be a path inside the folder"),
    ("newer schema", lambda m: {**m, "schema_version": 99}, "upgrade medgemma-gguf"),
])
def test_malformed_manifests_through_every_command(folder, tmp_path, capsys, name, edit, field):
    case = _copy(folder, tmp_path / "case")
    original = json.loads((case / "manifest.json").read_text())
    (case / "manifest.json").write_text(json.dumps(edit(original)))
    before = _snapshot(case)
    for args in (["verify", case, "-q"], ["fit", case], ["quantize", case, "--quants", "Q4_K_M", "--threads", "1"],
                 ["chat", case, "--prompt", "hi", "--max-tokens", "1", "--threads", "1"],
                 ["eval", case, "--reference", case / "m-BF16.gguf", "--out", tmp_path / "report"],
                 ["convert", folder.parent.parent / "no-such-ckpt", "--outdir", case]):
        code, out, err = _run(capsys, *args)
        assert code == 2, (args, out, err)
        if args[0] != "convert":
            assert field in err, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert _snapshot(case) == before, args


def test_non_utf8_manifest(folder, tmp_path, capsys):
    case = _copy(folder, tmp_path / "case")
    (case / "manifest.json").write_bytes(b"\xff\xfe{not text")
    for args in (["fit", case], ["quantize", case, "--quants", "Q8_0"], ["verify", case]):
        code, _, err = _run(capsys, *args)
        assert code == 2 and "is not UTF-8 text" in err and err.count("\n") == 1


def _plausible_edits(manifest: dict, seed: int, count: int):
    """Edits that keep the schema valid but make the manifest wrong: sizes, hashes, names, roles, types."""
    rng = random.Random(seed)
    for _ in range(count):
        edited = json.loads(json.dumps(manifest))
        row = rng.choice(edited["files"])
        field = rng.choice(["bytes", "sha256", "path", "role", "type", "bits_per_weight", "drop", "inputs"])
        if field == "bytes":
            row["bytes"] = rng.choice([0, row["bytes"] - 1, row["bytes"] + 1, 2**62])
        elif field == "sha256":
            row["sha256"] = f"{rng.getrandbits(256):064x}"
        elif field == "path":
            row["path"] = rng.choice(["nothing-here.gguf", "sub/dir/x.gguf", "README.md", "manifest.json"])
        elif field == "role":
            row["role"] = rng.choice([r for r in ("text", "mmproj", "imatrix", "adapter") if r != row["role"]])
        elif field == "type":
            row["type"] = rng.choice(["Q4_K_M", "F32", "XYZ", "iq2_xxs", "UD-Q4_K_XL"])
        elif field == "bits_per_weight":
            row["bits_per_weight"] = rng.choice([0, 0.0001, 999999.0])
        elif field == "inputs":
            row["inputs"] = {}
        else:
            edited["files"].remove(row)
        yield f"{row['path']}: {field}", json.dumps(edited)


def test_random_manifest_mutations(folder, tmp_path, capsys):
    """Seeded mutations of a real manifest (random ones, and plausible but wrong values), through verify, fit,
    quantize and chat: a clear line and exit 2 (verify: 1 when files do not match), or a normal run; never a
    traceback; a refused command changes nothing, and every file a command writes is described."""
    original = json.loads((folder / "manifest.json").read_text())
    outcomes = {0: 0, 1: 0, 2: 0}
    cases = [*mutations(original, seed=11, count=24), *_plausible_edits(original, seed=12, count=16)]
    for index, (what, text) in enumerate(cases):
        case = _copy(folder, tmp_path / f"case{index}")
        (case / "manifest.json").write_text(text)
        for args in (["verify", case, "-q"], ["fit", case], ["quantize", case, "--quants", "Q4_K_M", "--threads", "1",
                                                                "--quiet"],
                     ["chat", case, "--prompt", "hi", "--max-tokens", "1", "--threads", "1", "--ctx", "256"]):
            before = _snapshot(case)
            code, out, err = _run(capsys, *args)  # an uncaught exception fails the test here, with its traceback
            assert code in (0, 1, 2), (what, args, code, err)
            assert code != 1 or args[0] == "verify", (what, args, err)
            outcomes[code] += 1
            if code == 2:
                assert err.startswith("error: ") and err.count("\n") == 1, (what, args, err)
                assert _snapshot(case) == before, (what, args)
            assert partial_files(case) == [], (what, args)
            after = _snapshot(case)
            written = {path for path in after if after[path] != before.get(path)} - {"manifest.json", "README.md"}
            if written:  # what a command wrote is described, with its size and sha256
                rows = {row.path: row for row in Manifest.load(case).files}
                assert all(rows[path].sha256 == after[path] for path in written), (what, args, written)
        shutil.rmtree(case)
    assert outcomes[2] > 40 and outcomes[1] > 3 and outcomes[0] > 10, outcomes
