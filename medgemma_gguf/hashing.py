"""sha256 of files: every hash the project records or compares (manifest rows, cache keys)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.errors import UserError

log = logging.getLogger(__name__)

FOLDER_HASH_PATTERNS = ("*.safetensors", "config.json", "tokenizer*", "special_tokens_map.json",
                         "added_tokens.json", "chat_template.*", "preprocessor_config.json", "processor_config.json")


def sha256_of(path: Path, chunk_bytes: int = 1 << 22, on_progress: Callable[[int], Any] | None = None) -> str:
    """Hex sha256 of a file, read in chunks; ``on_progress(n_bytes)`` after each chunk (a progress bar)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
            if on_progress is not None:
                on_progress(len(chunk))
    return digest.hexdigest()


def cached_file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of ``path``, remembered in ``cache_dir/file-hashes.json`` by resolved path + size + mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_path = Path(cache_dir) / "file-hashes.json"
    index: dict[str, Any] = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            index = {}
    entry = index.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and entry.get("sha256"):
        return str(entry["sha256"])
    sha = sha256_of(path)
    index[key] = {**stamp, "sha256": sha}
    try:
        write_text_atomic(index_path, json.dumps(index, indent=1, sort_keys=True) + "\n")
    except (OSError, UserError) as exc:  # a read-only cache only costs re-hashing next time
        log.warning("cannot update %s: %s", index_path, exc)
    return sha


def folder_sha256(folder: Path, cache_dir: Path) -> str:
    """One sha256 over the weight, config and tokenizer files of a checkpoint folder (names + file hashes)."""
    files = sorted({p for pattern in FOLDER_HASH_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()})
    if not any(p.suffix == ".safetensors" for p in files):
        raise UserError(f"{folder} holds no .safetensors weights; pass a checkpoint folder or a BF16/F32 GGUF")
    digest = hashlib.sha256(b"medgemma-gguf folder v1\n")
    for path in files:
        digest.update(f"{path.name}:{cached_file_sha256(path, cache_dir)}\n".encode())
    return digest.hexdigest()
