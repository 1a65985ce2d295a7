"""`pull`, `hf:REPO:QUANT` and `push` against a local stand-in for the Hugging Face Hub (tests/hub_standin.py):
the real huggingface_hub client in a fresh process with HF_ENDPOINT pointed at it, no network.

pull: one quant (every part of a split model) and its mmproj into the Hub cache, chosen as llama.cpp's -hf
chooses; a dropped download resumed with an HTTP Range; files already in the cache not fetched again; a
missing repo, a missing quant (with the list of the repo's quants), a gated repo and an incomplete split give
one line and exit 2. push: a dry run listing exactly what would go up, nothing sent; --yes creates the repo
and commits the models, mmproj, imatrix, report and a card whose front matter the stand-in's validate-yaml
accepts; no token or a refused token fail before anything is written to the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandIn
from published import MODEL, QuantStore, make_layout

from medgemma_gguf.gguf_split import split_gguf
from medgemma_gguf.manifest import Manifest

VARIANT = "mm-k256"
UNSLOTH = "unsloth/medgemma-4b-it-GGUF"
SPLIT = "someone/medgemma-4b-it-split-GGUF"
BIG = "someone/medgemma-4b-it-f32-GGUF"
GATED = "google/medgemma-gated-GGUF"
WRITER = "hf_writer_token"
MIB = 1 << 20
pytestmark = pytest.mark.e2e


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def store(converted, tmp_path_factory) -> QuantStore:
    mmprojs = {label: converted(VARIANT, "f32", label.lower()).mmproj_path for label in ("F16", "BF16", "F32")}
    return QuantStore(tmp_path_factory.mktemp("quants"), converted(VARIANT).text_path, mmprojs)


@pytest.fixture(scope="module")
def hub(store, converted, tmp_path_factory):
    """The stand-in with: Unsloth's layout; the same gated; a Q8_0 split into 3 parts in a subfolder
    (bartowski's layout for big files) + one repo whose upload lacks a part; a 20 MB F32 model (resume)."""
    unsloth = make_layout("unsloth", tmp_path_factory.mktemp("unsloth") / "repo", store)
    split = tmp_path_factory.mktemp("split") / "repo"
    (split / f"{MODEL}-Q8_0").mkdir(parents=True)
    shutil.copy(store.get("Q8_0"), split / f"{MODEL}-Q8_0" / f"{MODEL}-Q8_0.gguf")
    parts = split_gguf(split / f"{MODEL}-Q8_0" / f"{MODEL}-Q8_0.gguf", 2_500_000)
    assert len(parts) == 3
    store.place("mmproj:F16", split / f"mmproj-{MODEL}-f16.gguf")
    shutil.copy(store.get("Q4_K_M"), split / f"{MODEL}-Q4_K_M.gguf")
    big = tmp_path_factory.mktemp("big") / "repo"
    big.mkdir()
    shutil.copy(converted(VARIANT).text_path, big / f"{MODEL}-F32.gguf")
    store.place("mmproj:F16", big / "mmproj-F16.gguf")
    assert (big / f"{MODEL}-F32.gguf").stat().st_size > 15 * MIB
    with HubStandIn() as stand_in:
        stand_in.tokens[WRITER] = "tester"
        stand_in.tokens["hf_reader"] = "reader"
        stand_in.add_repo(UNSLOTH, unsloth)
        stand_in.add_repo(GATED, unsloth, gated=True, allowed={"hf_accepted"})
        stand_in.add_repo(SPLIT, split)
        incomplete = {p.relative_to(split).as_posix(): p.read_bytes() for p in split.rglob("*.gguf")
                      if "-00002-of-" not in p.name}
        stand_in.add_repo("someone/incomplete-GGUF", files=incomplete)
        stand_in.add_repo(BIG, big)
        stand_in.sources = {UNSLOTH: unsloth, SPLIT: split, BIG: big}
        yield stand_in


def run(hub: HubStandIn, home: Path, *args: str, token: str | None = "hf_reader",
        **extra_env: str) -> subprocess.CompletedProcess:
    """``medgemma-gguf ARGS`` in a fresh process whose huggingface_hub talks to the stand-in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(hub.client_env(home, token), **extra_env)
    return subprocess.run([sys.executable, "-m", "medgemma_gguf", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=home)


def _paths(stdout: str) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(": ")
        out.setdefault(key, []).append(Path(value))
    return out


def test_pull_one_quant_and_its_mmproj_into_the_hub_cache(hub, tmp_path):
    done = run(hub, tmp_path, "pull", UNSLOTH)
    assert done.returncode == 0, done.stderr
    paths = _paths(done.stdout)
    (model,), (mmproj,) = paths["model"], paths["mmproj"]
    assert model.name == f"{MODEL}-Q4_K_M.gguf" and mmproj.name == "mmproj-F16.gguf"  # the defaults: Q4_K_M, F16
    assert str(tmp_path / "hub" / "models--unsloth--medgemma-4b-it-GGUF" / "snapshots") in str(model)
    source = hub.sources[UNSLOTH]
    assert _sha(model) == _sha(source / model.name) and _sha(mmproj) == _sha(source / mmproj.name)
    assert "preferred to mmproj-BF16.gguf, mmproj-F32.gguf" in done.stderr
    assert f"medgemma-gguf chat hf:{UNSLOTH}:Q4_K_M" in done.stderr
    fetched = len(hub.gets("/mmproj-F16.gguf"))
    # again: what is in the cache is not downloaded again
    again = run(hub, tmp_path, "pull", f"{UNSLOTH}:Q4_K_M")
    assert again.returncode == 0 and _paths(again.stdout)["model"] == [model]
    assert len(hub.gets("/mmproj-F16.gguf")) == fetched
    # offline: from the cache, nothing sent
    sent = len(hub.requests)
    offline = run(hub, tmp_path, "pull", "--offline", UNSLOTH)
    assert offline.returncode == 0, offline.stderr
    assert _paths(offline.stdout)["model"] == [model] and len(hub.requests) == sent
    # a recipe label, another mmproj type; nothing else of the repo is downloaded
    other = run(hub, tmp_path, "pull", f"{UNSLOTH}:UD-Q4_K_XL", "--include-mmproj", "BF16")
    assert other.returncode == 0, other.stderr
    assert [p.name for p in _paths(other.stdout)["model"]] == [f"{MODEL}-UD-Q4_K_XL.gguf"]
    assert [p.name for p in _paths(other.stdout)["mmproj"]] == ["mmproj-BF16.gguf"]
    assert not hub.gets(f"/{MODEL}-Q8_0.gguf") and not hub.gets("/mmproj-F32.gguf")


def test_pull_resumes_a_dropped_download(hub, tmp_path):
    name = f"{MODEL}-F32.gguf"
    hub.drop_once[name] = 15 * MIB  # the connection closes after 15 MiB
    before = len(hub.gets(f"/{name}"))
    done = run(hub, tmp_path, "pull", f"{BIG}:F32")
    assert done.returncode == 0, done.stderr
    gets = hub.gets(f"/{name}")[before:]
    assert len(gets) == 2 and "range" not in gets[0] and gets[1]["range"] == f"bytes={10 * MIB}-"
    (model,) = _paths(done.stdout)["model"]
    assert _sha(model) == _sha(hub.sources[BIG] / name)


def test_pull_a_split_model_and_chat_with_hf_reference(hub, tmp_path):
    done = run(hub, tmp_path, "pull", f"{SPLIT}:Q8_0")
    assert done.returncode == 0, done.stderr
    paths = _paths(done.stdout)
    assert [p.name for p in paths["model"] + paths["part"]] == [
        f"{MODEL}-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert paths["mmproj"][0].name == f"mmproj-{MODEL}-f16.gguf"  # from the repository's root
    chat = run(hub, tmp_path, "chat", f"hf:{SPLIT}:Q8_0", "--prompt", "Hello", "--max-tokens", "2", "--threads", "1",
               "--n-gpu-layers", "0")
    assert chat.returncode == 0, chat.stderr
    assert f"loaded {MODEL}-Q8_0-00001-of-00003.gguf + mmproj-{MODEL}-f16.gguf" in chat.stderr
    fit = run(hub, tmp_path, "fit", f"hf:{SPLIT}:Q4_K_M", "--json")
    assert fit.returncode == 0, fit.stderr
    ranked = json.loads(fit.stdout)["quants"]
    assert [row["type"] for row in ranked] == ["Q8_0", "Q4_K_M"]  # both quants pulled so far, best first


@pytest.mark.parametrize(("args", "token", "message"), [
    ([f"{UNSLOTH}:Q2_K"], "hf_reader",
     f"{UNSLOTH} has no quant 'Q2_K'; it has Q4_K_M, Q8_0, UD-Q4_K_XL; pick one as {UNSLOTH}:QUANT"),
    ([f"{UNSLOTH}", "--include-mmproj", "Q4_0"], "hf_reader", f"{UNSLOTH} has no Q4_0 mmproj; it has BF16, F16, F32"),
    (["nobody/missing-GGUF:Q4_K_M"], "hf_reader", "nobody/missing-GGUF not found or not accessible"),
    ([f"{GATED}:Q4_K_M"], None, f"{GATED} is gated: accept the license on https://huggingface.co/{GATED}"),
    ([f"{GATED}:Q4_K_M"], "hf_reader", f"{GATED} is gated"),
    (["someone/incomplete-GGUF:Q8_0"], "hf_reader", "lists 2 of the 3 parts"),
    (["not a repo"], "hf_reader", "is not a Hub reference; write REPO[:QUANT]"),
])
def test_pull_refuses_with_one_line(hub, tmp_path, args, token, message):
    done = run(hub, tmp_path, "pull", *args, token=token)
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("fetching ")]  # progress
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert not list((tmp_path / "hub").glob("models--*/snapshots/*/*.gguf"))  # nothing half-downloaded


def test_pull_a_gated_repo_with_access(hub, tmp_path):
    done = run(hub, tmp_path, "pull", f"{GATED}:Q8_0", token="hf_accepted")
    assert done.returncode == 0, done.stderr
    assert _paths(done.stdout)["model"][0].name == f"{MODEL}-Q8_0.gguf"


# --- push --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def out_folder(converted, calibration_subset, tmp_path_factory) -> Path:
    """mm-k256 converted, quantized to Q4_K_M with an importance matrix, with a report and a stray file."""
    from medgemma_gguf.convert.quantize.folder import quantize_folder

    folder = Path(shutil.copytree(converted(VARIANT).manifest_path.parent, tmp_path_factory.mktemp("p") / "out"))
    quantize_folder(folder, "Q4_K_M", imatrix="auto", calibration=calibration_subset(["med-dka"]), progress=False,
                    n_threads=1)
    model = Manifest.load(folder).model
    (folder / "report").mkdir()
    (folder / "report" / "report.json").write_text(json.dumps({"rows": [
        {"file": str(folder / f"{model}-Q4_K_M.gguf"), "kld_mean": 0.0314}]}))
    (folder / "notes.txt").write_text("my own notes, not for the Hub")
    return folder


def _expected(folder: Path) -> set[str]:
    manifest = Manifest.load(folder)
    return {*(row.path for row in manifest.files), "README.md", "report/report.json"}


def test_push_dry_run_lists_what_would_be_uploaded(hub, out_folder, tmp_path):
    before = len(hub.requests)
    done = run(hub, tmp_path, "push", str(out_folder), "tester/medgemma-4b-it-GGUF", token=None)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and "files," not in line}
    assert listed == _expected(out_folder)
    assert not any(name.endswith(("manifest.json", "notes.txt")) for name in listed)
    imatrix = next(name for name in listed if name.endswith(".imatrix"))
    assert not imatrix.endswith(".gguf")
    assert "dry run: nothing was uploaded; add --yes to upload" in done.stdout
    assert not [r for r in hub.requests[before:] if r[1] != "/api/agent-harnesses"]  # nothing sent


def test_push_uploads_to_the_hub_in_one_commit(hub, out_folder, tmp_path):
    repo_id = "tester/medgemma-4b-it-GGUF"
    done = run(hub, tmp_path, "push", str(out_folder), repo_id, "--yes", token=WRITER)
    assert done.returncode == 0, done.stderr
    repo = hub.repos[repo_id]
    assert set(repo.files) == _expected(out_folder) and len(repo.commits) == 2  # created, then one commit
    for name in repo.files:
        if name not in ("README.md", "report/report.json"):
            assert repo.files[name] == (out_folder / name).read_bytes(), name
    card = repo.files["README.md"].decode()
    assert card.startswith("---\n") and not hub.yaml_errors
    assert f"medgemma-gguf chat hf:{repo_id}:" in card and "not a medical device" in card
    assert str(out_folder) not in repo.files["report/report.json"].decode()  # local paths cut to file names
    assert Manifest.load(out_folder).source["repo_or_path"] not in card  # the local source folder by name only
    assert [r for r in hub.requests if r[0] == "PUT"]  # the GGUFs went through the LFS upload
    # to a branch: created, committed there, main unchanged
    main_files = dict(repo.files)
    branch = run(hub, tmp_path, "push", str(out_folder), repo_id, "--yes", "--revision", "v1-test", token=WRITER)
    assert branch.returncode == 0, branch.stderr
    assert repo.files == main_files and set(repo.branches["v1-test"]) == _expected(out_folder)
    # pull what was pushed
    pulled = run(hub, tmp_path, "pull", f"{repo_id}:Q4_K_M")
    assert pulled.returncode == 0, pulled.stderr
    (model,) = _paths(pulled.stdout)["model"]
    assert _sha(model) == _sha(out_folder / model.name)


@pytest.mark.parametrize(("token", "message"), [
    (None, "pushing needs a Hugging Face token with write access"),
    ("hf_bad", "the Hub refused the token (HTTP 401)"),
    ("hf_reader", "did not let this token write to someone-else/medgemma-GGUF (HTTP 403)"),
])
def test_push_refuses_without_a_usable_token(hub, out_folder, tmp_path, token, message):
    repo_id = "tester/medgemma-4b-it-GGUF" if token != "hf_reader" else "someone-else/medgemma-GGUF"
    if token == "hf_reader":
        hub.add_repo(repo_id, files={"README.md": b"# theirs\n"}, owner_token="hf_owner")
    before = {k: dict(v.files) for k, v in hub.repos.items()}
    done = run(hub, tmp_path, "push", str(out_folder), repo_id, "--yes", token=token)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert {k: dict(v.files) for k, v in hub.repos.items() if k in before} == before
