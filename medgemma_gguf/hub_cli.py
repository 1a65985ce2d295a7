"""``medgemma-gguf pull``: one quant of a GGUF repository (and its mmproj) into the Hub cache."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("pull")
@click.argument("spec", metavar="REPO[:QUANT]")
@click.option("--revision", help="Hub branch, tag or commit (default: main).")
@click.option("--include-mmproj", "include_mmproj", metavar="TYPE",
              help="The mmproj to fetch: F16, BF16, F32, Q8_0, or 'none' (default: F16, else BF16, F32, Q8_0).")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for gated or private repos (default: $HF_TOKEN "
                                                 "or `hf auth login`).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Hub cache folder (default: huggingface_hub's).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def pull_command(spec: str, revision: str | None, include_mmproj: str | None, token: str | None,
                 cache_dir: Path | None, quiet: bool) -> None:
    """Download one quant of the GGUF repository REPO (every part of a split model) and the mmproj that goes
    with it into the Hugging Face cache, and print where they are. QUANT is a type or name as the repository's
    files carry it (Q4_K_M, UD-Q4_K_XL, …; default Q4_K_M, else Q8_0). Run it again to resume: files already
    downloaded are kept. Then: medgemma-gguf chat hf:REPO:QUANT."""
    from medgemma_gguf.pull import pull

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    result = pull(spec, revision=revision, include_mmproj=include_mmproj, token=token, cache_dir=cache_dir,
                  report=lambda line: click.echo(line, err=True))
    click.echo(f"{result.repo} {result.quant} (commit {result.revision[:12]})", err=True)
    click.echo(f"model: {result.model}")
    for part in result.parts[1:]:
        click.echo(f"part: {part}")
    if result.mmproj is not None:
        click.echo(f"mmproj: {result.mmproj}")
    click.echo(f"mmproj: {result.mmproj_note}" if result.mmproj is None else f"  ({result.mmproj_note})", err=True)
    click.echo(f"run: medgemma-gguf chat hf:{result.repo}:{result.quant}", err=True)
