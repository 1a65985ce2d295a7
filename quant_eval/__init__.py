"""The evaluation stage: each quant against the unquantized reference (``evaluate``, ``metrics``, ``report``)."""
