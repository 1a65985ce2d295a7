"""``medgemma-gguf check``: prove a converted GGUF is the checkpoint it came from, on this machine.

The reference (the checkpoint in transformers, at ``bf16`` or ``f32``) runs the probe set of
``quant_eval.equivalence`` first, is freed, then the GGUF runs the same probes in llama.cpp through the runtime
(``runtime.chat.load``); every comparison becomes a row of a pass/fail table with its figure and threshold.
The check passes only when every row passes. The report carries the provenance record (tool, llama.cpp build,
hardware, threads, input hashes).

What is checked: an unquantized conversion (F32, BF16 or F16 text weights; quants are measured by
``medgemma-gguf eval``). A folder written by ``convert`` gives its highest-precision text file and mmproj.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import InputError, MismatchError, NotFoundError, setting
from medgemma_gguf.quant_eval.equivalence import (
    DEFAULT_GREEDY_TOKENS,
    MAX_SCORED_POSITIONS,
    REFERENCE_DTYPES,
    THRESHOLDS,
    UNQUANTIZED_TEXT_TYPES,
    ProbeResult,
    ReferenceOutputs,
    Thresholds,
    check_memory,
    compare_to_reference,
    compute_reference,
    config_of,
    precision_class,
    reference_memory_bytes,
    text_probe_length,
)

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """The outcome of a check: every probe's row, what was compared, and the provenance."""

    model: str
    mmproj: str | None
    reference: str
    dtype: str
    precision: str
    thresholds: Thresholds
    results: list[ProbeResult]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failed(self) -> list[ProbeResult]:
        return [r for r in self.results if not r.passed]

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "model": self.model, "mmproj": self.mmproj, "reference": self.reference,
                "reference_dtype": self.dtype, "precision": self.precision, "thresholds": self.thresholds.to_json(),
                "probes": [r.to_json() for r in self.results], "provenance": self.provenance}

    def table(self) -> str:
        """The pass/fail table as text."""
        head = ("probe", "metric", "figure", "threshold", "result")
        rows = [(r.probe, r.metric, r.figure, r.threshold, "pass" if r.passed else "FAIL") for r in self.results]
        widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                 for row in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in self.results:
            if r.detail and not r.passed:
                lines.append(f"  {r.probe} / {r.metric}: {r.detail}")
        what = Path(self.model).name + (f" + {Path(self.mmproj).name}" if self.mmproj else "")
        verdict = (f"PASS: {what} matches {self.reference} on all {len(self.results)} probes" if self.passed else
                   f"FAIL: {len(self.failed)} of {len(self.results)} probes differ from {self.reference}")
        head_line = (f"{what} against {self.reference} (transformers {self.dtype}); thresholds for "
                     f"{self.precision}")
        return "\n".join([head_line, *lines, verdict])


def resolve_gguf(target: Path, mmproj: Path | None) -> tuple[Path, Path | None]:
    """The text GGUF and mmproj to check: a file (its mmproj from ``mmproj`` or its folder), or a ``convert``
    folder's highest-precision text file and mmproj."""
    from medgemma_gguf.manifest import MANIFEST_NAME, MMPROJ_PRECISION_ORDER, Manifest, type_rank
    from medgemma_gguf.quant_eval.reference import mmproj_from_manifest

    target = Path(target)
    if target.is_dir():
        if not (target / MANIFEST_NAME).is_file():
            raise NotFoundError(f"{target} has no {MANIFEST_NAME}; pass a GGUF file or a folder written by "
                                "medgemma-gguf convert")
        manifest = Manifest.load(target)
        rows = [r for r in manifest.present(target, "text") if r.type.upper() in UNQUANTIZED_TEXT_TYPES]
        if not rows:
            raise NotFoundError(f"{target} holds no F32, BF16 or F16 text GGUF; check verifies the conversion, "
                                "run medgemma-gguf convert first")
        text = target / min(rows, key=lambda r: type_rank(r.type.upper(), UNQUANTIZED_TEXT_TYPES)).path
        if mmproj is None:
            found = manifest.mmprojs(target, MMPROJ_PRECISION_ORDER)
            mmproj = target / found[0].path if found else None
        return text, mmproj
    if not target.is_file():
        raise NotFoundError(f"{target} not found; pass a GGUF file or a folder written by medgemma-gguf convert")
    if target.name.startswith("mmproj"):
        raise InputError(f"{target.name} is an mmproj; pass the text GGUF (and the mmproj with {setting('mmproj')})")
    return target, mmproj if mmproj is not None else mmproj_from_manifest(target)


def text_types(path: Path) -> list[str]:
    """The ggml types of the GGUF's quantizable text tensors; refuses a quantized file."""
    from medgemma_gguf.gguf_info import is_quantizable, read_gguf_info

    info = read_gguf_info(path)
    types = sorted({t.ggml_type.name for t in info.tensors if is_quantizable(t.name, t.shape)})
    quantized = [t for t in types if t not in UNQUANTIZED_TEXT_TYPES]
    if quantized:
        raise InputError(f"{path.name} holds {', '.join(quantized)} tensors: check proves an unquantized conversion "
                         "(F32, BF16 or F16); measure quants against the reference with medgemma-gguf eval")
    return types


def run_check(target: Path, reference: str, *, mmproj: Path | None = None, dtype: str = "bf16",
              memory_bytes: int | None = None, n_threads: int | None = None, n_gpu_layers: int = 0,
              greedy_tokens: int = DEFAULT_GREEDY_TOKENS, token: str | None = None,
              echo: Callable[[str], None] = log.info) -> CheckReport:
    """The whole check (module docstring). ``memory_bytes``: what the reference may use (default: the memory
    available now); a reference that needs more is refused before it loads."""
    from medgemma_gguf.hub import resolve_source
    from medgemma_gguf.provenance import collect_provenance, hash_folder_input, hash_input
    from medgemma_gguf.runtime.quant_choice import available_memory_bytes

    if dtype not in REFERENCE_DTYPES:
        raise InputError(f"reference dtype {dtype!r} is not supported; use bf16 or f32 (f16 overflows in Gemma 3)")
    if isinstance(greedy_tokens, bool) or not isinstance(greedy_tokens, int) or greedy_tokens < 1:
        raise InputError(f"{setting('greedy_tokens')} must be at least 1, got {greedy_tokens!r}")
    text_path, mmproj_path = resolve_gguf(target, mmproj)
    types = text_types(text_path)
    folder = resolve_source(reference, token=token).folder
    if not (folder / "config.json").is_file():
        raise NotFoundError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder or repo id")
    config = config_of(folder)
    vision = "vision_config" in config
    if vision and mmproj_path is None:
        raise NotFoundError(f"the reference has a vision tower but no mmproj was found for {text_path.name}; pass "
                            f"{setting('mmproj')}")
    if not vision and mmproj_path is not None:
        raise MismatchError(f"the reference {reference} is text-only but {mmproj_path.name} is an mmproj; drop "
                            f"{setting('mmproj')} or check against the image+text checkpoint")
    text_config = config.get("text_config", config)
    n_tokens = text_probe_length(text_config.get("sliding_window"))
    needed = reference_memory_bytes(folder, dtype, n_tokens, min(n_tokens, MAX_SCORED_POSITIONS))
    available = memory_bytes if memory_bytes is not None else available_memory_bytes()
    check_memory(needed, available, f"the reference in transformers at {dtype}")
    precision = precision_class(dtype, types)
    thresholds = THRESHOLDS[precision]
    outputs = _reference_outputs(folder, dtype, n_threads, greedy_tokens, echo)
    gc.collect()
    echo(f"GGUF: loading {text_path.name}" + (f" + {mmproj_path.name}" if mmproj_path else ""))
    results = _gguf_results(outputs, text_path, mmproj_path, n_threads, n_gpu_layers, thresholds, echo)
    inputs = [hash_input("model", text_path), *([hash_input("mmproj", mmproj_path)] if mmproj_path else []),
              hash_folder_input("reference", folder)]
    provenance = collect_provenance(threads=n_threads, seeds={"sampling": None, "images": [3, 5]}, inputs=inputs,
                                    libraries=("torch", "transformers"))
    return CheckReport(model=str(text_path), mmproj=str(mmproj_path) if mmproj_path else None, reference=reference,
                       dtype=dtype, precision=precision, thresholds=thresholds, results=results,
                       provenance=provenance.to_json())


def _reference_outputs(folder: Path, dtype: str, n_threads: int | None, greedy_tokens: int,
                       echo: Callable[[str], None]) -> ReferenceOutputs:
    import torch

    from medgemma_gguf.quant_eval.equivalence import load_transformers

    if n_threads:
        torch.set_num_threads(n_threads)
    echo(f"reference: loading {folder} in transformers ({dtype})")
    model = load_transformers(folder, dtype)
    try:
        return compute_reference(folder, model, dtype=dtype, greedy_tokens=greedy_tokens, echo=echo)
    finally:
        del model


def _gguf_results(outputs: ReferenceOutputs, text_path: Path, mmproj_path: Path | None, n_threads: int | None,
                  n_gpu_layers: int, thresholds: Thresholds, echo: Callable[[str], None]) -> list[ProbeResult]:
    from medgemma_gguf.runtime.chat import load

    longest = max([len(outputs.text_ids), len(outputs.chat_ids) + len(outputs.greedy_logits),
                   *(len(image.ids) for image in outputs.images)])
    n_ctx = -(-(longest + 16) // 256) * 256
    with load(text_path, mmproj_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads) as chat_model:
        return compare_to_reference(outputs, chat_model, thresholds, echo=echo)
