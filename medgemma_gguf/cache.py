"""Where medgemma-gguf keeps what it can recompute: one root for every cache."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MEDGEMMA_GGUF_CACHE"


def cache_root() -> Path:
    """``$MEDGEMMA_GGUF_CACHE`` if set, else ``~/.cache/medgemma-gguf``.

    Reference outputs go under ``reference/``, sensitivity tables under ``sensitivity/``.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/medgemma-gguf").expanduser()
