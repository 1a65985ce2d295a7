"""medgemma-gguf: MedGemma (Gemma 3) as GGUF — convert, quantize, run, evaluate."""

__version__ = "0.1.0"
