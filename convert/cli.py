"""``medgemma-gguf convert`` and ``medgemma-gguf demo``."""

from __future__ import annotations

from pathlib import Path

import click

from convert.tensor_types import MMPROJ_OUTTYPES, TEXT_OUTTYPES


@click.command("convert")
@click.argument("source")
@click.option("--outdir", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder for the GGUF files and manifest.json.")
@click.option("--outtype", type=click.Choice(list(TEXT_OUTTYPES), case_sensitive=False), default="bf16",
              show_default=True, help="Text model tensor type.")
@click.option("--mmproj-type", type=click.Choice(list(MMPROJ_OUTTYPES), case_sensitive=False), default="f16",
              show_default=True, help="Vision tower + projector (mmproj) tensor type.")
@click.option("--name", help="Model name used in file names (default: the repo or folder name).")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token (default: $HF_TOKEN or `hf auth login`).")
@click.option("--revision", help="Hub branch, tag or commit to convert.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def convert_command(source: str, outdir: Path, outtype: str, mmproj_type: str, name: str | None,
                    token: str | None, revision: str | None, force: bool, quiet: bool) -> None:
    """Convert SOURCE (a Hub repo id like google/medgemma-4b-it, or a local folder) to GGUF."""
    from convert.converter import convert_checkpoint

    result = convert_checkpoint(source, outdir, outtype=outtype, mmproj_type=mmproj_type, name=name,
                                force=force, token=token, revision=revision, progress=not quiet)
    click.echo(f"wrote {result.text_path}")
    if result.mmproj_path:
        click.echo(f"wrote {result.mmproj_path}")
    click.echo(f"wrote {result.manifest_path}")


@click.command("demo")
@click.option("--outdir", "-o", type=click.Path(path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for the tiny checkpoint and its GGUF files.")
@click.option("--variant", default="mm-k256", show_default=True, help="Which tiny fixture to build.")
@click.option("--force", is_flag=True, help="Rebuild and overwrite existing outputs.")
def demo_command(outdir: Path, variant: str, force: bool) -> None:
    """Run the whole pipeline offline on a tiny random-weight MedGemma-shaped checkpoint."""
    from convert.demo import run_demo

    run_demo(outdir, variant=variant, force=force, echo=click.echo)
