"""Quantization of a converted folder through llama.cpp's own quantizer.

``types`` … one table of quant types; ``llama_quantize`` the call into llama.cpp and the read-back of
per-tensor types; ``recipe`` (+ ``recipes/*.toml``) per-tensor mixes; ``imatrix`` importance matrices
(collection and file format) on the ``calibration`` set; ``sensitivity`` and ``auto`` AUTO mixes under a
budget; ``folder`` the orchestration over an output folder; ``model_card`` its README.md; ``cli`` the
``quantize`` and ``imatrix`` commands.
"""
