"""The embedded default job: build a tiny MedGemma-shaped checkpoint and run the pipeline on it offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from convert.converter import convert_checkpoint
from convert.tiny_checkpoint import VARIANTS, build_tiny_checkpoint
from medgemma_gguf.errors import UserError


def run_demo(outdir: Path, *, variant: str = "mm-k256", force: bool = False,
             echo: Callable[[str], None] = print) -> Path:
    """Build the tiny checkpoint under ``outdir/checkpoint`` and convert it into ``outdir/gguf``."""
    if variant not in VARIANTS:
        raise UserError(f"unknown demo variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    outdir = Path(outdir)
    checkpoint = outdir / "checkpoint"
    if force or not (checkpoint / "config.json").is_file():
        echo(f"building tiny {variant} checkpoint in {checkpoint}")
        build_tiny_checkpoint(checkpoint, variant)
    gguf_dir = outdir / "gguf"
    result = convert_checkpoint(str(checkpoint), gguf_dir, name="tiny-medgemma", force=force, progress=False)
    for path in (result.text_path, result.mmproj_path, result.manifest_path):
        if path is not None:
            echo(f"wrote {path}")
    return gguf_dir
