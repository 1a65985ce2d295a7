"""medgemma-gguf: MedGemma (Gemma 3) as GGUF — convert, quantize, run, evaluate.

The product's three stages are subpackages: ``medgemma_gguf.convert``, ``medgemma_gguf.runtime`` and
``medgemma_gguf.quant_eval`` (the repository's top-level ``convert/``, ``runtime/`` and ``quant_eval/``
folders, mapped by ``pyproject.toml``); the modules directly in ``medgemma_gguf`` are the core every stage
shares. ``from medgemma_gguf import load`` loads a model for chatting (``medgemma_gguf.runtime.load``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    # lazy, so ``import medgemma_gguf`` (the CLI's start-up) does not load llama.cpp
    if name == "load":
        from medgemma_gguf.runtime.rpc_model import load

        return load
    raise AttributeError(f"module 'medgemma_gguf' has no attribute {name!r}")
