"""Crash safety (issue 11): ``convert --quants ... --imatrix auto`` killed with SIGKILL at seeded random points
of every phase (the text GGUF and the mmproj being written, the manifest saved, the importance matrix, each
quant, the model card), the folder checked after every kill, and the same command run again without
``--force`` until it completes — ending with the files a run that was never killed writes.

After each kill: every file in the folder is described by a valid manifest with its size and sha256, or is a
temporary ``.NAME.PID.partial`` file of the dead process — and a row whose file is not there yet has its
complete temporary file (killed between saving the manifest and the rename; the next run renames it).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.integrity import extra_files, partial_files, verify_folder
from medgemma_gguf.manifest import MANIFEST_NAME, Manifest

pytestmark = pytest.mark.e2e

NAME = "m"
QUANTS = "Q8_0,Q4_K_M"
# (kind, file): where a kill is aimed, in the order a run reaches them
TRIGGERS = [
    ("start", ""), ("partial", f"{NAME}-BF16.gguf"), ("partial", f"mmproj-{NAME}-F16.gguf"),
    ("row", f"{NAME}-BF16.gguf"), ("final", f"{NAME}-BF16.gguf"), ("partial", f"{NAME}.imatrix"),
    ("row", f"{NAME}.imatrix"), ("partial", f"{NAME}-Q8_0.gguf"), ("row", f"{NAME}-Q8_0.gguf"),
    ("partial", f"{NAME}-Q4_K_M.gguf"), ("row", f"{NAME}-Q4_K_M.gguf"), ("partial", "README.md"),
]


def _command(checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "medgemma_gguf", "convert", str(checkpoint), "--outdir", str(out), "--name", NAME,
            "--quants", QUANTS, "--imatrix", "auto", "--threads", "1", "--quiet"]


def _reached(out: Path, pid: int, kind: str, name: str) -> bool:
    if kind == "start":
        return True
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return False
    if kind == "partial":  # this process's temporary file (not one an earlier, killed run left)
        return f".{name}.{pid}.partial" in names
    if kind == "final":
        return name in names
    try:
        return f'"path": "{name}"' in (out / MANIFEST_NAME).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return False


def _run_and_kill(command: list[str], out: Path, trigger: tuple[str, str], delay: float, log: Path) -> str:
    """Run ``command``; SIGKILL it ``delay`` s after ``trigger`` is seen. "killed"; "finished" when the run
    completed first (a temporary file that lives for milliseconds can be missed by the 5 ms polling);
    "skipped" (nothing run) when an earlier run already got past the trigger."""
    if trigger[0] in ("row", "final") and _reached(out, 0, *trigger):
        return "skipped"
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and not _reached(out, process.pid, *trigger):
            assert time.monotonic() < deadline, "the command neither finished nor reached the trigger"
            time.sleep(0.005)
        if process.poll() is None:
            time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return "killed"
        assert process.returncode == 0, log.read_text(errors="replace")[-3000:]
        return "finished"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()  # reaped: its pid is dead for the next run


def check_after_kill(out: Path) -> None:
    """The invariant of the module docstring."""
    if not out.exists():
        return
    partials = partial_files(out)
    assert not any(p.alive for p in partials), partials
    if not (out / MANIFEST_NAME).exists():
        leftovers = [p for p in out.rglob("*") if p.is_file() and not any(p == q.path for q in partials)]
        assert leftovers == [], f"files without a manifest: {leftovers}"
        return
    manifest = Manifest.load(out)  # valid
    assert extra_files(out, manifest) == [], "files no row describes"
    pending = {p.final.name: p.path for p in partials}
    for row in manifest.files:
        path = out / row.path
        if path.is_file():
            assert path.stat().st_size == row.bytes and sha256_of(path) == row.sha256, row.path
        else:
            assert row.path in pending, f"{row.path} is recorded but neither it nor its temporary file exists"
            assert sha256_of(pending[row.path]) == row.sha256, row.path


def _final_state(out: Path) -> dict[str, str]:
    return {row.path: row.sha256 for row in Manifest.load(out).files}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    """The checkpoint and what one uninterrupted run writes (row path -> sha256)."""
    checkpoint = tiny_checkpoint("mm-k256")
    out = tmp_path_factory.mktemp("reference") / "out"
    result = subprocess.run(_command(checkpoint, out), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return checkpoint, _final_state(out)


@pytest.mark.parametrize("seed", [3, 17])
def test_kill_at_random_points_then_rerun_without_force(reference, tmp_path, seed):
    checkpoint, expected = reference
    rng = random.Random(seed)
    chain = sorted(rng.sample(range(len(TRIGGERS)), 5))  # up to five kills, in phase order
    out = tmp_path / "out"
    log = tmp_path / "runs.log"
    command = _command(checkpoint, out)
    kills = 0
    for index in chain:
        outcome = _run_and_kill(command, out, TRIGGERS[index], rng.uniform(0.0, 0.3), log)
        check_after_kill(out)
        kills += outcome == "killed"
        if outcome == "finished":  # the trigger was missed and the run completed: the rest of the chain, anew
            assert _final_state(out) == expected
            shutil.rmtree(out)
    assert kills >= 3, "the runs finished before the kill points"  # the harness really interrupted them
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert partial_files(out) == []
    manifest = Manifest.load(out)
    assert extra_files(out, manifest) == [] and verify_folder(out, progress=False).ok
    assert _final_state(out) == expected
