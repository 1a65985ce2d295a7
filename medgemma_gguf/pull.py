"""``medgemma-gguf pull REPO[:QUANT]`` and ``hf:REPO[:QUANT]``: one quant of a GGUF repository on the Hugging
Face Hub — every part of a split model — and the mmproj that goes with it, downloaded with huggingface_hub
into the Hub cache (``~/.cache/huggingface/hub``, or ``$HF_HOME``/``$HF_HUB_CACHE``).

Which files (from the repository's file list, before anything is downloaded; as llama.cpp's ``-hf`` picks):

* the model: GGUFs whose name has no ``mmproj`` or ``imatrix``; ``QUANT`` is matched against the part of
  each name the files do not share (``medgemma-4b-it-UD-Q4_K_XL.gguf`` → ``UD-Q4_K_XL``), case-insensitive,
  a full label before a label that merely ends in it (``Q4_K_XL`` finds ``UD-Q4_K_XL`` only when no
  ``Q4_K_XL`` exists); a file name works too. Without ``QUANT``: ``Q4_K_M``, else ``Q8_0``, else the first;
* a split model (``…-00001-of-0000N.gguf``): all N parts;
* the mmproj: a GGUF with ``mmproj`` in its name in the model's folder or the repository's root; of several,
  F16, then BF16, F32, Q8_0 (by the type at the end of the name: ``mmproj-F16.gguf``, ``mmproj-model-f16.gguf``);
  ``include_mmproj="BF16"`` takes that one, ``"none"`` none.

After the download the files are checked from their headers (parts complete and belonging together, the
mmproj's projector and width those of the model), so a mismatch is reported before a model loads.

Resuming: a dropped connection is resumed where it stopped (huggingface_hub re-requests the rest with an HTTP
Range), and files already in the cache — each part of a split model — are not downloaded again when the
command is run again. huggingface_hub 2.4 discards a half-downloaded file when its process ends, so an
interrupted part restarts from its beginning. Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable), what is
already in the cache is used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medgemma_gguf.errors import InputError, NotFoundError, UserError
from medgemma_gguf.gguf_info import SPLIT_NAME, check_model_pair, read_gguf_info
from medgemma_gguf.hub import REPO_ID, hub_errors
from medgemma_gguf.quant_types import MMPROJ_RUN_ORDER

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")  # llama.cpp's -hf default, then the first model file
NO_MMPROJ = "none"
_TYPE_AT_END = re.compile(r"[-_.]([A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class HubSpec:
    """``REPO[:QUANT]``, as given to ``pull`` or as ``hf:REPO[:QUANT]``."""

    repo: str
    quant: str | None = None

    def __str__(self) -> str:
        return self.repo + (f":{self.quant}" if self.quant else "")


def is_hub_spec(text: object) -> bool:
    """Whether ``text`` is an ``hf:REPO[:QUANT]`` reference."""
    return isinstance(text, str) and text.startswith(HF_PREFIX)


def parse_hub_spec(text: str) -> HubSpec:
    """``hf:owner/name:Q4_K_M``, ``owner/name:Q4_K_M`` or ``owner/name`` → HubSpec; InputError otherwise."""
    body = text[len(HF_PREFIX):] if text.startswith(HF_PREFIX) else text
    repo, _, quant = body.partition(":")
    if not REPO_ID.match(repo) or ":" in quant:
        raise InputError(f"{text!r} is not a Hub reference; write REPO[:QUANT], e.g. "
                         "unsloth/medgemma-4b-it-GGUF:Q4_K_M (hf:REPO:QUANT where a model path is expected)")
    return HubSpec(repo, quant.strip() or None)


@dataclass(frozen=True)
class PullPlan:
    """What ``pull`` downloads, chosen from the repository's file list."""

    repo: str
    quant: str  # the label of the chosen model in this repository
    model_files: tuple[str, ...]  # repository paths, first part first
    mmproj: str | None
    mmproj_note: str


@dataclass(frozen=True)
class PullResult:
    """What ``pull`` downloaded: local paths in the Hub cache."""

    repo: str
    revision: str  # the commit downloaded
    quant: str
    model: Path  # the file to load: the model, or its first part
    parts: tuple[Path, ...]
    mmproj: Path | None
    mmproj_note: str
    folder: Path  # the local snapshot folder of that commit (what has been downloaded of the repository)


def _split_key(path: str) -> tuple[str, int, int]:
    """(prefix, part number, part count) of a repository path; a single file is part 1 of 1."""
    name = PurePosixPath(path)
    match = SPLIT_NAME.match(name.name)
    if match:
        return str(name.parent / match.group("prefix")), int(match.group("no")), int(match.group("count"))
    return str(name.parent / name.name.removesuffix(".gguf")), 1, 1


def is_model_file(path: str) -> bool:
    """A model GGUF, as llama.cpp's ``gguf_filename_is_model``: not an mmproj, not an importance matrix."""
    name = PurePosixPath(path).name.lower()
    return name.endswith(".gguf") and "mmproj" not in name and "imatrix" not in name


def quant_labels(files: list[str]) -> dict[str, str]:
    """Each model's label in the repository (first parts only): its name without what every model file's name
    shares (``medgemma-4b-it-``) or, for a lone file, the field after its last ``-``."""
    firsts = sorted(path for path in files if is_model_file(path) and _split_key(path)[1] == 1)
    stems = [PurePosixPath(_split_key(path)[0]).name for path in firsts]
    if len(stems) > 1:
        shared = stems[0]
        for stem in stems[1:]:
            while not stem.startswith(shared):
                shared = shared[:-1]
        cut = max(shared.rfind("-"), shared.rfind("_")) + 1 if shared else 0
        labels = [stem[cut:] or stem for stem in stems]
    else:
        labels = [stem.rsplit("-", 1)[-1] for stem in stems]
    return dict(zip(firsts, labels, strict=True))


def _mmproj_type(path: str) -> str:
    match = _TYPE_AT_END.search(PurePosixPath(path).name.removesuffix(".gguf"))
    return match.group(1).upper() if match else ""


def plan_pull(repo: str, files: list[str], quant: str | None = None, include_mmproj: str | None = None) -> PullPlan:
    """The files to download for ``quant`` from a repository holding ``files`` (module docstring).
    NotFoundError listing the repository's quants (or mmproj types) when the one asked for is not there."""
    labels = quant_labels(files)
    if not labels:
        raise NotFoundError(f"{repo} holds no GGUF model file; pick a GGUF repository (its name usually ends in -GGUF)")
    have = ", ".join(sorted(labels.values()))
    chosen = None
    for wanted in ([quant] if quant else list(DEFAULT_QUANTS)):
        key = wanted.strip().upper()
        exact = [p for p, label in labels.items() if PurePosixPath(p).name == wanted.strip() or label.upper() == key]
        ending = [p for p, label in labels.items() if label.upper().endswith(("-" + key, "_" + key, "." + key))]
        matches = exact or sorted(ending, key=len)
        if matches:
            chosen = matches[0]
            break
    if chosen is None:
        if quant:
            raise NotFoundError(f"{repo} has no quant {quant!r}; it has {have}; pick one as {repo}:QUANT")
        chosen = sorted(labels)[0]
    prefix, _, count = _split_key(chosen)
    parts = sorted(p for p in files if _split_key(p)[0] == prefix and _split_key(p)[2] == count)
    if count > 1 and len(parts) != count:
        raise NotFoundError(f"{repo} lists {len(parts)} of the {count} parts of {chosen}; the upload is incomplete — "
                            "pick another quant or ask the repository's owner")
    mmproj, note = _pick_mmproj(repo, files, chosen, include_mmproj)
    return PullPlan(repo=repo, quant=labels[chosen], model_files=tuple(parts), mmproj=mmproj, mmproj_note=note)


def _pick_mmproj(repo: str, files: list[str], model: str, include: str | None) -> tuple[str | None, str]:
    if include is not None and include.strip().lower() == NO_MMPROJ:
        return None, "not downloaded (--include-mmproj none)"
    folders = {str(PurePosixPath(model).parent), "."}
    found = [p for p in files if p.lower().endswith(".gguf") and "mmproj" in PurePosixPath(p).name.lower()
             and str(PurePosixPath(p).parent) in folders]
    if not found:
        if include:
            raise NotFoundError(f"{repo} has no mmproj; drop the mmproj type, or pick a repository with one")
        return None, f"{repo} has no mmproj next to {model} (a text-only model)"
    if include:
        wanted = [p for p in found if _mmproj_type(p) == include.strip().upper()]
        if not wanted:
            types = ", ".join(sorted({_mmproj_type(p) or p for p in found}))
            raise NotFoundError(f"{repo} has no {include} mmproj; it has {types}")
        return wanted[0], f"{PurePosixPath(wanted[0]).name} (asked for {include})"
    rank = {name: i for i, name in enumerate(MMPROJ_RUN_ORDER)}
    ordered = sorted(found, key=lambda p: (rank.get(_mmproj_type(p), len(rank)), p))
    others = [PurePosixPath(p).name for p in ordered[1:]]
    note = PurePosixPath(ordered[0]).name + (f" (preferred to {', '.join(others)})" if others else "")
    return ordered[0], note


def _cached_snapshot(repo: str, revision: str | None, cache_dir: Path | None) -> Path | None:
    """The Hub cache's snapshot folder of ``repo`` at ``revision`` (a branch or tag the cache recorded, or a
    commit; default main), or None. Read with ``scan_cache_dir``: ``snapshot_download(local_files_only=True)``
    refuses a snapshot that holds only some of the repository's files, which is what ``pull`` leaves."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    wanted = revision or "main"
    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None
    for cached in cache.repos:
        if cached.repo_id == repo and cached.repo_type == "model":
            for rev in cached.revisions:
                if wanted in rev.refs or rev.commit_hash == wanted:
                    return Path(rev.snapshot_path)
    return None


def _repo_files(repo: str, revision: str | None, token: str | None, cache_dir: Path | None) -> tuple[str, list[str]]:
    """(commit, file paths) of the repository: from the Hub, else — offline — what the Hub cache holds of it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        with hub_errors(repo, revision, offline_ok=True):
            info = HfApi().model_info(repo, revision=revision, token=token)
        if info.sha is None:
            raise UserError(f"the Hub did not say which commit of {repo} it lists; re-run")
        return info.sha, [sibling.rfilename for sibling in info.siblings or []]
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        folder = _cached_snapshot(repo, revision, cache_dir)
        if folder is None:
            raise UserError(f"cannot reach the Hub for {repo} ({type(exc).__name__}) and the Hub cache has no copy; "
                            "connect and run again") from exc
        log.warning("offline or the Hub is unreachable: using the copy of %s in the Hub cache", repo)
        return folder.name, sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def pull(spec: str | HubSpec, *, quant: str | None = None, revision: str | None = None,
         include_mmproj: str | None = None, token: str | None = None, cache_dir: Path | None = None,
         report: Callable[[str], None] | None = None) -> PullResult:
    """Download one quant of a GGUF repository and its mmproj into the Hub cache (module docstring).

    ``spec``: ``REPO[:QUANT]`` or ``hf:REPO[:QUANT]`` (``quant`` when given wins over the one in ``spec``);
    ``revision``: a branch, tag or commit; ``token``: for gated or private repositories (default:
    ``HF_TOKEN`` or ``hf auth login``'s). ``report`` gets a line per file before it is downloaded.
    """
    import glob

    from huggingface_hub import snapshot_download

    hub = parse_hub_spec(spec) if isinstance(spec, str) else spec
    quant = quant or hub.quant
    _listed, files = _repo_files(hub.repo, revision, token, cache_dir)
    plan = plan_pull(hub.repo, files, quant, include_mmproj)
    wanted = [*plan.model_files, *([plan.mmproj] if plan.mmproj else [])]
    if report is not None:
        for name in wanted:
            report(f"fetching {hub.repo}/{name}")
    # snapshot_download, not one hf_hub_download per file: it records the branch -> commit ref in the cache (so a
    # later pull works offline) and downloads every file from one commit
    with hub_errors(hub.repo, revision):
        folder = Path(snapshot_download(hub.repo, revision=revision, token=token, cache_dir=cache_dir,
                                        allow_patterns=[glob.escape(name) for name in wanted]))
    commit = folder.name
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{hub.repo} at commit {commit[:12]} has no {missing[0]} (the repository changed while "
                        "pulling); run the command again")
    parts = tuple(folder / name for name in plan.model_files)
    mmproj = folder / plan.mmproj if plan.mmproj else None
    info = read_gguf_info(parts[0])
    info.check_complete()
    check_model_pair(parts[0], mmproj)
    return PullResult(repo=hub.repo, revision=commit, quant=plan.quant, model=parts[0], parts=parts, mmproj=mmproj,
                      mmproj_note=plan.mmproj_note, folder=folder)
