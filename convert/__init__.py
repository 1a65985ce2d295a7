"""The convert stage: a Hugging Face checkpoint to GGUF text model + mmproj (``converter``), and quantization
(``medgemma_gguf.convert.quantize``)."""
