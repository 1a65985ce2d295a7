"""``medgemma-gguf quantize``: llama.cpp quants and dynamic recipes of a converted folder."""

from __future__ import annotations

from pathlib import Path

import click


def echo_results(results: list, echo=click.echo) -> None:
    """One line per quant (size, bits per weight, type counts) and any fallbacks."""
    for result in results:
        counts = ", ".join(f"{n}×{t}" for t, n in result.tensor_type_counts.items())
        state = "up to date" if result.skipped else "wrote"
        echo(f"{state} {result.path.name}: {result.bytes / 2**20:.1f} MiB, {result.bpw:.2f} bpw ({counts})")
        for fallback in result.fallbacks[:5]:
            echo(f"  fallback: {fallback.tensor} is {fallback.actual}, not {fallback.wanted} ({fallback.reason})")
        if len(result.fallbacks) > 5:
            echo(f"  ... and {len(result.fallbacks) - 5} more fallbacks (listed in manifest.json)")


@click.command("quantize")
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--quants", "-q", multiple=True,
              help="Comma-separated types: llama.cpp's (Q8_0, Q4_K_M, IQ2_XXS, ...) or recipes (UD-Q4_K_XL, ...).")
@click.option("--imatrix", help="Importance matrix file, or 'auto' to compute one on the bundled calibration set.")
@click.option("--recipe", "recipes", multiple=True, type=click.Path(path_type=Path),
              help="Your own recipe TOML (built in addition to --quants). May be repeated.")
@click.option("--force", is_flag=True, help="Rebuild outputs that are up to date or were made from other inputs.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores).")
@click.option("--list", "list_types", is_flag=True, help="List the quant types and recipes, then exit.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quantize_command(outdir: Path, quants: tuple[str, ...], imatrix: str | None, recipes: tuple[Path, ...],
                     force: bool, threads: int | None, list_types: bool, quiet: bool) -> None:
    """Quantize the unquantized text GGUF in OUTDIR (written by convert) with llama.cpp's quantizer."""
    from convert.quantize import quantize_folder, valid_quant_names

    if list_types:
        click.echo(" ".join(valid_quant_names()))
        return
    results = quantize_folder(outdir, list(quants), imatrix=imatrix, recipe_files=list(recipes), force=force,
                              progress=not quiet, n_threads=threads)
    echo_results(results)
    click.echo(f"updated {outdir / 'manifest.json'} and {outdir / 'README.md'}")
