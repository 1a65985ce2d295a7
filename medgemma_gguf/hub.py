"""Where a checkpoint comes from: a local folder, or a Hugging Face Hub repo downloaded (resumably) into
the Hub cache — only the files the conversion needs. ``hub_errors`` turns huggingface_hub's errors into one
line with the fix, the same for every command that talks to the Hub (convert, eval, pull, push)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medgemma_gguf.errors import AccessError, NotFoundError, UserError, setting
from medgemma_gguf.privacy import OFFLINE_ENV, is_offline

# Everything convert reads; weights as safetensors only.
NEEDED_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "README.md",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a snapshot folder of the Hub cache: .../models--OWNER--NAME/snapshots/<commit>
_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<sha>[0-9a-f]{40})[/\\]*$")


def snapshot_repo(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) of a Hub-cache snapshot folder (``…/models--google--medgemma-4b-it/snapshots/<sha>``,
    as huggingface_hub lays it out); None for any other path."""
    match = _SNAPSHOT.search(str(path))
    return (f"{match.group('owner')}/{match.group('name')}", match.group("sha")) if match else None


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint folder on disk and what it was resolved from."""

    folder: Path
    repo_or_path: str
    revision: str | None  # commit sha for Hub downloads, None for local folders
    is_hub: bool


def resolve_source(source: str, *, token: str | None = None, revision: str | None = None,
                   cache_dir: Path | None = None, patterns: list[str] | None = None,
                   what: str = "the checkpoint folder (with config.json)") -> ResolvedSource:
    """A local folder as is, or a Hub repo id downloaded into the cache (resuming partial downloads).

    ``patterns``: the files to download (default: everything ``convert`` reads, ``NEEDED_FILES``); ``what``
    names the expected folder in errors. The token comes from ``token``, else ``HF_TOKEN``, else the cached
    ``hf auth login``.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{source} is a file; pass {what} or a Hub repo id")
        if revision:
            raise UserError(f"{setting('revision')} applies to Hub repo ids only; a local folder is used as it is")
        return ResolvedSource(path.resolve(), str(path), None, False)
    if not REPO_ID.match(source):
        raise UserError(f"{source} is neither an existing folder nor a Hub repo id like google/medgemma-4b-it")
    folder = _download(source, token=token, revision=revision, cache_dir=cache_dir,
                       patterns=NEEDED_FILES if patterns is None else patterns)
    return ResolvedSource(folder, source, folder.name, True)


def hub_offline() -> bool:
    """True when downloads are off: this package's offline mode, or huggingface_hub's ``HF_HUB_OFFLINE``."""
    if is_offline():
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's HTTP client's connection errors (httpx2 in huggingface_hub 2.x, httpx before)."""
    try:
        import httpx2

        return (httpx2.TransportError,)
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        import httpx

        return (httpx.TransportError,)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, offline_ok: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's errors inside the block into UserErrors naming ``repo_id`` and the fix.

    ``offline_ok``: let "no connection" errors (offline mode, the Hub unreachable) through unchanged, for a
    caller that falls back to the Hub cache.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    unreachable: tuple[type[BaseException], ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled,
                                                    *_transport_errors())
    try:
        yield
    except GatedRepoError as exc:
        raise AccessError(f"{repo_id} is gated: accept the license on {page} while logged in, then pass "
                          f"{setting('token')} or set HF_TOKEN (or run `hf auth login`)") from exc
    except RevisionNotFoundError as exc:
        raise NotFoundError(f"revision {revision!r} not found in {repo_id}; check the branch, tag or commit "
                            f"on {page}") from exc
    except RepositoryNotFoundError as exc:
        raise NotFoundError(f"{repo_id} not found or not accessible (HTTP 401/404): check the name, accept the "
                            f"license on {page}, and pass {setting('token')} or set HF_TOKEN") from exc
    except unreachable as exc:
        if offline_ok:
            raise
        if hub_offline():
            raise NotFoundError(f"{repo_id} is not in the Hugging Face cache and offline mode is on (--offline, "
                                f"{OFFLINE_ENV} or HF_HUB_OFFLINE): download it once while online (`hf download "
                                f"{repo_id}`), or pass a local folder") from exc
        raise UserError(f"cannot download from {repo_id}: no connection to the Hub and no cached copy; connect, "
                        "or use local files instead") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise AccessError(f"access to {repo_id} denied (HTTP {status}): accept the license on {page} and "
                              f"pass {setting('token')} or set HF_TOKEN with a token that has read access") from exc
        raise UserError(f"the Hub refused a request for {repo_id} (HTTP {status}); re-run to resume") from exc
    except OSError as exc:
        raise UserError(f"download of {repo_id} failed ({exc}); re-run to resume") from exc


def _download(repo_id: str, *, token: str | None, revision: str | None, cache_dir: Path | None,
              patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        folder = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                   allow_patterns=patterns)
    return Path(folder)
