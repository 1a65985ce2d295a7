"""Run MedGemma GGUF files: ``from medgemma_gguf.runtime import load`` (see ``medgemma_gguf.runtime.chat``; with
``rpc=[...]``, split across machines: ``medgemma_gguf.runtime.rpc_model``)."""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    # lazy, so ``import medgemma_gguf.runtime.images`` does not load llama.cpp
    if name == "load":
        from medgemma_gguf.runtime.rpc_model import load

        return load
    raise AttributeError(f"module 'medgemma_gguf.runtime' has no attribute {name!r}")
