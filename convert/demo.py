"""The embedded default job: the whole pipeline, offline, on a tiny MedGemma-shaped random-weight checkpoint.

build the checkpoint -> convert (BF16 text GGUF + F16 mmproj) -> importance matrix on the bundled
calibration set -> quantize (standard types and a UD recipe) -> chat with a generated X-ray-like image
-> evaluate every quant against the checkpoint run in transformers -> report.

The tiny model has random weights: its replies are gibberish; the point is that every step runs and the
report shows what each quant level costs (KL divergence, agreement, size) on a real pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from convert.converter import convert_checkpoint
from convert.tiny_checkpoint import VARIANTS, build_tiny_checkpoint
from medgemma_gguf.errors import UserError
from medgemma_gguf.manifest import MANIFEST_NAME, Manifest

DEMO_NAME = "tiny-medgemma"
DEMO_QUANTS = ("Q8_0", "Q4_K_M", "UD-Q4_K_XL")
DEMO_PROMPT = "Describe this X-ray."
DEMO_REPLY_TOKENS = 16


def write_demo_image(path: Path, size: int = 256) -> Path:
    """A deterministic grayscale chest-X-ray-like picture (two dark lung fields, a bright spine)."""
    import numpy as np
    from PIL import Image

    from medgemma_gguf.atomic import atomic_output

    y, x = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((x - 0.3) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2)) + np.exp(
        -(((x - 0.7) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2))
    spine = np.exp(-(((x - 0.5) / 0.04) ** 2))
    pixels = np.clip(200 - 150 * lungs + 40 * spine, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path


def run_demo(outdir: Path, *, variant: str = "mm-k256", force: bool = False, evaluate: bool = True,
             echo: Callable[[str], None] = print) -> Path:
    """Run the pipeline under ``outdir``: checkpoint/, images/, gguf/ (files, manifest, model card, report/)."""
    from convert.quantize import quantize_folder
    from convert.quantize_cli import echo_results

    if variant not in VARIANTS:
        raise UserError(f"unknown demo variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    outdir = Path(outdir)
    checkpoint = outdir / "checkpoint"
    if force or not (checkpoint / "config.json").is_file():
        echo(f"building tiny {variant} checkpoint in {checkpoint}")
        _build_checkpoint(checkpoint, variant)
    gguf_dir = outdir / "gguf"
    kept = None if force else _kept_conversion(gguf_dir)
    if kept is None:
        result = convert_checkpoint(str(checkpoint), gguf_dir, name=DEMO_NAME, force=force, progress=False)
        for path in (result.text_path, result.mmproj_path, result.manifest_path):
            if path is not None:
                echo(f"wrote {path}")
        mmproj_path = result.mmproj_path
    else:
        echo(f"up to date {gguf_dir} (conversion kept; --force rebuilds)")
        mmproj_path = gguf_dir / kept.find("mmproj")[0].path if kept.find("mmproj") else None
    echo(f"quantizing to {', '.join(DEMO_QUANTS)} with an importance matrix from the bundled calibration set")
    echo_results(quantize_folder(gguf_dir, list(DEMO_QUANTS), imatrix="auto", force=force, progress=False),
                 echo=echo)
    if mmproj_path is not None:
        _chat_with_image(gguf_dir, outdir / "images" / "demo-xray.png", echo)
    if evaluate:
        from quant_eval.evaluate import run_eval

        report_dir = gguf_dir / "report"  # where `medgemma-gguf fit` looks for it
        echo(f"evaluating every quant against the checkpoint run in transformers -> {report_dir}")
        report = run_eval([gguf_dir], str(checkpoint), report_dir, cache_dir=outdir / "reference-cache",
                          force=True, progress=False)
        for row in report["rows"]:
            status = f"error: {row['error']}" if row.get("error") else (
                f"{row['bpw']:.2f} bpw, mean KL {row['kld_mean']:.4g}, top-1 agreement {row['top1_agreement']:.3f}")
            echo(f"  {row['file']}: {status}")
        echo(f"wrote {report_dir / 'report.md'} and {report_dir / 'pareto.png'}")
        echo(f"next: medgemma-gguf fit {gguf_dir} --vram 4GiB   (ranks the quants by this report)")
    return gguf_dir


def _build_checkpoint(checkpoint: Path, variant: str) -> None:
    """Build the tiny checkpoint, replacing an earlier demo's only once the new one is complete (--force)."""
    import shutil

    if not checkpoint.exists():
        build_tiny_checkpoint(checkpoint, variant)
        return
    fresh, old = checkpoint.with_name(f"{checkpoint.name}.new"), checkpoint.with_name(f"{checkpoint.name}.old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    build_tiny_checkpoint(fresh, variant)
    checkpoint.rename(old)
    fresh.rename(checkpoint)
    shutil.rmtree(old)


def _kept_conversion(gguf_dir: Path) -> Manifest | None:
    """The manifest of an earlier demo conversion whose recorded files are all still there, else None."""
    if not (gguf_dir / MANIFEST_NAME).is_file():
        return None
    manifest = Manifest.load(gguf_dir)
    rows = [*manifest.find("text"), *manifest.find("mmproj")]
    if manifest.model != DEMO_NAME or not manifest.find("text"):
        return None
    if not all((gguf_dir / row.path).is_file() and (gguf_dir / row.path).stat().st_size == row.bytes for row in rows):
        return None
    return manifest


def _chat_with_image(gguf_dir: Path, image_path: Path, echo: Callable[[str], None]) -> None:
    from runtime.chat import load

    write_demo_image(image_path)
    with load(gguf_dir, quant="UD-Q4_K_XL", n_gpu_layers=0, n_ctx=1024) as model:
        messages = [{"role": "user", "content": [{"type": "text", "text": DEMO_PROMPT},
                                                 {"type": "image", "path": str(image_path)}]}]
        reply = model.chat(messages, max_tokens=DEMO_REPLY_TOKENS)
    echo(f"chat ({model.model_path.name} + {model.mmproj_path.name}), image {image_path}: {DEMO_PROMPT!r}")
    echo(f"  reply (random weights, so gibberish): {reply.text!r} "
         f"[{reply.prompt_tokens} prompt tokens, {reply.completion_tokens} generated]")
