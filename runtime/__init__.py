"""Run MedGemma GGUF files: ``from runtime import load`` (see ``runtime.chat``)."""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    # lazy, so ``import runtime.images`` does not load llama.cpp
    if name == "load":
        from runtime.chat import load

        return load
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
