"""``medgemma-gguf eval``: evaluate quants against the reference and write the report."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("eval")
@click.argument("targets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--reference", "reference", required=True,
              help="Hugging Face repo id or checkpoint folder (run in transformers), or a BF16/F32 GGUF.")
@click.option("--out", "outdir", type=click.Path(path_type=Path), required=True,
              help="Folder for report.json, report.md, report.csv and pareto.png.")
@click.option("--slice", "slice_specs", default=None,
              help="Comma-separated slices, e.g. medqa-mini,vqa-mini or medqa:200@seed=1 "
                   "(default: medqa-mini, plus vqa-mini when the reference sees images).")
@click.option("--mmproj", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="mmproj for every quant (default: the one in the quants' manifest).")
@click.option("--reference-mmproj", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="mmproj of a GGUF reference (default: the one in its manifest).")
@click.option("--reference-dtype", type=click.Choice(["bf16", "f32"]), default=None,
              help="Precision of a transformers reference (default bf16; f16 overflows in Gemma 3).")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Reference cache (default ~/.cache/medgemma-gguf/reference).")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder with downloaded benchmark files for the public slices.")
@click.option("--coverage", type=float, default=None,
              help="Reference probability mass left out per position (ε, default 1e-4): the cache keeps the most "
                   "likely tokens until the rest holds at most ε, and the KL comes with its exact bracket. Smaller "
                   "ε: a narrower bracket and a larger cache.")
@click.option("--full-vocab", is_flag=True,
              help="Keep every logit of every position (llama.cpp's method): an exact KL, but 4 bytes x vocabulary "
                   "a position (1 MiB at MedGemma's 262,208 tokens).")
@click.option("--max-items", type=click.IntRange(min=1), default=None, help="At most N items per slice.")
@click.option("--no-heldout", is_flag=True, help="Skip the held-out text (no perplexity ratio).")
@click.option("--no-speed", is_flag=True, help="Skip the speed measurements.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for llama.cpp.")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for a gated Hub reference.")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def eval_command(targets: tuple[Path, ...], reference: str, outdir: Path, slice_specs: str | None,
                 mmproj: Path | None, reference_mmproj: Path | None, reference_dtype: str | None,
                 cache_dir: Path | None, data_dir: Path | None, coverage: float | None, full_vocab: bool,
                 max_items: int | None,
                 no_heldout: bool, no_speed: bool, threads: int | None, token: str | None, force: bool,
                 quiet: bool) -> None:
    """Evaluate TARGETS (GGUF files, or output folders: every quant in their manifest) against --reference."""
    from medgemma_gguf.errors import UserError
    from medgemma_gguf.quant_eval.evaluate import run_eval

    slices = None
    if slice_specs is not None:
        slices = [s.strip() for s in slice_specs.split(",") if s.strip()]
        if not slices:
            raise UserError("--slice is empty; give slice names such as medqa-mini,vqa-mini")
    report = run_eval(list(targets), reference, outdir, slices=slices, mmproj=mmproj,
                      reference_mmproj=reference_mmproj, reference_dtype=reference_dtype, cache_dir=cache_dir,
                      data_dir=data_dir, coverage=coverage, full_vocab=full_vocab,
                      max_items=max_items, heldout=not no_heldout,
                      n_threads=threads, measure_speed=not no_speed, token=token, force=force, progress=not quiet)
    failed = [row for row in report.rows if row.error]
    for row in report.rows:
        if row.error or row.kld is None:
            status = f"error: {row.error}"
        else:
            low, high = row.kld.bracket
            status = f"mean KL {row.kld.mean:.4g} [{low:.4g}, {high:.4g}]"
        click.echo(f"{row.file}: {status}")
    cov = report.coverage
    if cov.cache_bytes_per_position is not None:
        kept = "every token" if cov.full_vocab else f"ε = {cov.epsilon:g}, {cov.mean_set_size:.1f} tokens a position"
        click.echo(f"reference cache: {kept}, {cov.cache_bytes_per_position / 1024:.1f} KiB a position")
    click.echo(f"wrote {outdir / 'report.md'} ({len(report.rows) - len(failed)} evaluated, {len(failed)} failed)")
