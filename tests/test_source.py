"""Source handling: local folders, the Hub cache (offline), and the messages for Hub errors."""

import fnmatch

import httpx
import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from medgemma_gguf.errors import UserError
from medgemma_gguf.hub import NEEDED_FILES, resolve_source

# The file list of the published google/medgemma-4b-it repository.
MEDGEMMA_4B_FILES = [
    ".gitattributes", "README.md", "added_tokens.json", "chat_template.json", "config.json",
    "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
]


def test_local_folder_is_used_as_is(tmp_path):
    resolved = resolve_source(str(tmp_path))
    assert resolved.folder == tmp_path.resolve() and resolved.revision is None and not resolved.is_hub


def test_local_folder_with_revision_is_refused(tmp_path):
    with pytest.raises(UserError, match="revision applies to Hub repo ids only"):
        resolve_source(str(tmp_path), revision="main")


def test_file_instead_of_folder_is_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_source(str(file))


def test_neither_folder_nor_repo_id(tmp_path):
    with pytest.raises(UserError, match="neither an existing folder nor a Hub repo id"):
        resolve_source(str(tmp_path / "missing" / "deeper" / "path"))


def test_needed_files_cover_the_published_repo_and_nothing_else():
    selected = {f for f in MEDGEMMA_4B_FILES if any(fnmatch.fnmatch(f, p) for p in NEEDED_FILES)}
    assert selected == set(MEDGEMMA_4B_FILES) - {".gitattributes"}
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in NEEDED_FILES)


def test_hub_download_from_offline_cache(tmp_path, monkeypatch):
    sha = "a" * 40
    repo = tmp_path / "models--google--medgemma-4b-it"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    resolved = resolve_source("google/medgemma-4b-it", cache_dir=tmp_path)
    assert resolved.is_hub and resolved.revision == sha and resolved.folder == snapshot
    assert resolved.repo_or_path == "google/medgemma-4b-it"


def test_token_revision_and_patterns_are_passed(tmp_path, monkeypatch):
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        folder = tmp_path / ("b" * 40)
        folder.mkdir(exist_ok=True)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    resolved = resolve_source("google/medgemma-4b-it", token="hf_secret", revision="v1")
    assert seen["token"] == "hf_secret" and seen["revision"] == "v1" and seen["allow_patterns"] == NEEDED_FILES
    assert resolved.revision == "b" * 40


def _response(status):
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/google/x"))


@pytest.mark.parametrize(("error", "message"), [
    (GatedRepoError("gated", response=_response(403)), "accept the license on https://huggingface.co/google/medgemma"),
    (RepositoryNotFoundError("nope", response=_response(401)), "not found or not accessible"),
    (RevisionNotFoundError("nope", response=_response(404)), "revision 'v9' not found"),
    (HfHubHTTPError("denied", response=_response(403)), r"denied \(HTTP 403\).*HF_TOKEN"),
    (HfHubHTTPError("server", response=_response(500)), r"HTTP 500.*resume"),
    (LocalEntryNotFoundError("offline"), "no connection to the Hub"),
])
def test_hub_errors_become_one_actionable_line(monkeypatch, error, message):
    def failing_download(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_download)
    with pytest.raises(UserError, match=message) as caught:
        resolve_source("google/medgemma-4b-it", revision="v9")
    assert "\n" not in str(caught.value)
