"""``medgemma-gguf push DIR REPO``: an output folder to a model repository on the Hugging Face Hub.

What is uploaded: the models the manifest lists (every part of a split model), the mmproj(s), the importance
matrix, the recipe TOMLs of its quants, the evaluation report (``report/report.md``, ``.csv``, ``pareto.png`` and
``report.json`` with local paths cut to file names), and the model card ``README.md`` rendered for REPO —
nothing else in the folder (no manifest.json with its local paths, no partial files, no stray files).

A dry run by default: it lists what would be uploaded, with sizes, and checks the card's front matter
offline (``model_card.check_card``); ``yes=True`` (``--yes``) uploads: ``HfApi.create_repo`` (``exist_ok``;
``private``), a branch for ``revision`` when it is not ``main``, then one ``create_commit`` of every file (what
``upload_folder`` does, with the file list made explicit), so the repository gets everything or nothing. A
missing or refused token fails before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from medgemma_gguf.errors import AccessError, InputError, UserError, setting
from medgemma_gguf.hub import REPO_ID, hub_errors
from medgemma_gguf.manifest import Manifest
from medgemma_gguf.sizes import format_size

PUBLISHED_ROLES = ("text", "mmproj", "imatrix")
REPORT_FOLDER = "report"
REPORT_FILES = ("report.md", "report.csv", "pareto.png", "report.json")


@dataclass(frozen=True)
class Upload:
    """One file to upload: where it goes in the repository, and its bytes (a local file, or text made here)."""

    path_in_repo: str
    local: Path | None
    content: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.local.stat().st_size  # type: ignore[union-attr]


def _strip_local_paths(value: Any) -> Any:
    """A JSON value with every absolute local path replaced by its file name (reports record where files were)."""
    if isinstance(value, dict):
        return {key: _strip_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strip_local_paths(item) for item in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return PurePosixPath(value.replace("\\", "/")).name
    return value


def _recipe_files(folder: Path, manifest: Manifest) -> list[Path]:
    """The recipe TOMLs in ``folder`` of the quants the manifest lists (AUTO's ``<model>-AUTO-<bpw>.toml``)."""
    from medgemma_gguf.convert.quantize.recipe import load_recipe

    used = {row.recipe for row in manifest.present(folder, "text") if row.recipe}
    found = []
    for path in sorted(folder.glob("*.toml")):
        try:
            if path.is_file() and load_recipe(path).name in used:
                found.append(path)
        except UserError:
            continue  # not a recipe: not published
    return found


def upload_plan(folder: Path, repo_id: str) -> list[Upload]:
    """The files ``push`` uploads from ``folder`` (module docstring), the card rendered for ``repo_id``."""
    from medgemma_gguf.convert.quantize.model_card import CARD_NAME, render_model_card

    folder = Path(folder)
    manifest = Manifest.load(folder)
    if not manifest.present(folder, "text"):
        raise UserError(f"{folder} has no model to publish; run medgemma-gguf convert/quantize into it first")
    uploads: list[Upload] = []
    for role in PUBLISHED_ROLES:
        for row in manifest.present(folder, role):
            uploads += [Upload(path, folder / path) for path in row.part_paths]
    uploads += [Upload(p.name, p) for p in _recipe_files(folder, manifest)]
    for name in REPORT_FILES:
        path = folder / REPORT_FOLDER / name
        if not path.is_file():
            continue
        if name == "report.json":
            data = _strip_local_paths(json.loads(path.read_text(encoding="utf-8")))
            uploads.append(Upload(f"{REPORT_FOLDER}/{name}", None, (json.dumps(data, indent=2) + "\n").encode()))
        else:
            uploads.append(Upload(f"{REPORT_FOLDER}/{name}", path))
    card = render_model_card(folder, manifest, repo_id=repo_id)
    uploads.append(Upload(CARD_NAME, None, card.encode("utf-8")))
    return uploads


@dataclass(frozen=True)
class PushResult:
    """What ``push`` did: the files (uploaded, or listed by a dry run) and, after an upload, the commit's URL."""

    repo_id: str
    uploads: list[Upload]
    commit_url: str | None
    card_problems: list[str]


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None, yes: bool = False,
         token: str | None = None, report: Callable[[str], Any] | None = None) -> PushResult:
    """Publish ``folder`` to ``repo_id`` (module docstring); a dry run unless ``yes``."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from medgemma_gguf.convert.quantize.model_card import CARD_NAME, check_card

    say = report or (lambda _line: None)
    if not REPO_ID.match(repo_id):
        raise InputError(f"{repo_id!r} is not a Hub repository id; write OWNER/NAME, e.g. you/medgemma-4b-it-GGUF")
    uploads = upload_plan(folder, repo_id)
    card = next(u for u in uploads if u.path_in_repo == CARD_NAME)
    problems = check_card((card.content or b"").decode("utf-8"))
    if problems:
        raise UserError(f"the model card would be refused by the Hub: {'; '.join(problems)}; fix the source's card "
                        "and re-run convert, or edit the metadata")
    where = f"{constants.ENDPOINT}/{repo_id}" + (f" (branch {revision})" if revision else "")
    say(f"{'uploading' if yes else 'would upload'} to {where}, {'private' if private else 'public'}:")
    for upload in uploads:
        say(f"  {upload.path_in_repo}  {format_size(upload.size)}")
    say(f"  {len(uploads)} files, {format_size(sum(u.size for u in uploads))}")
    if not yes:
        say("dry run: nothing was uploaded; add --yes to upload")
        return PushResult(repo_id, uploads, None, problems)
    token = token or get_token()
    if not token:
        raise AccessError(f"pushing needs a Hugging Face token with write access: pass {setting('token')}, set "
                          "HF_TOKEN or run `hf auth login`; nothing was uploaded")
    api = HfApi(token=token)
    try:
        api.whoami()
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise AccessError(f"the Hub refused the token (HTTP {status}): pass a valid token with write access "
                          f"({setting('token')} or HF_TOKEN); nothing was uploaded") from exc
    operations = [CommitOperationAdd(path_in_repo=u.path_in_repo,
                                     path_or_fileobj=u.content if u.content is not None else str(u.local))
                  for u in uploads]
    with hub_errors(repo_id, revision):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(repo_id, operations, revision=revision,
                                     commit_message="Upload MedGemma GGUF files (medgemma-gguf push)")
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in (401, 403) or type(exc) is not HfHubHTTPError:
                raise
            raise AccessError(f"the Hub did not let this token write to {repo_id} (HTTP {status}): use a token with "
                              f"write access to it ({setting('token')} or HF_TOKEN); nothing was committed") from exc
    from medgemma_gguf.atomic import write_text_atomic

    write_text_atomic(Path(folder) / CARD_NAME, (card.content or b"").decode("utf-8"))
    say(f"uploaded: {info.commit_url}")
    return PushResult(repo_id, uploads, info.commit_url, problems)
