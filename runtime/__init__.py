"""Run MedGemma GGUF files: ``from medgemma_gguf.runtime import load`` (see ``medgemma_gguf.runtime.chat``)."""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    # lazy, so ``import medgemma_gguf.runtime.images`` does not load llama.cpp
    if name == "load":
        from medgemma_gguf.runtime.chat import load

        return load
    raise AttributeError(f"module 'medgemma_gguf.runtime' has no attribute {name!r}")
