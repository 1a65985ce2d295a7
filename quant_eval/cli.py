"""``medgemma-gguf eval``: evaluate quants against the reference and write the report."""

from __future__ import annotations

from pathlib import Path

import click

from medgemma_gguf.quant_eval.equivalence import DEFAULT_GREEDY_TOKENS


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
              help="Reference probability mass left out per position (ε; default 1e-6 for Gemma 3 / MedGemma, chosen "
                   "so Q4-class quants 5 % apart rank, 1e-4 for other models): the cache keeps the most "
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
    from medgemma_gguf.quant_eval.evaluate import EvalOptions, run_eval

    slices = None
    if slice_specs is not None:
        slices = [s.strip() for s in slice_specs.split(",") if s.strip()]
        if not slices:
            raise UserError("--slice is empty; give slice names such as medqa-mini,vqa-mini")
    options = EvalOptions(slices=slices, mmproj=mmproj, reference_mmproj=reference_mmproj,
                          reference_dtype=reference_dtype, cache_dir=cache_dir, data_dir=data_dir, coverage=coverage,
                          full_vocab=full_vocab, max_items=max_items, heldout=not no_heldout, n_threads=threads,
                          measure_speed=not no_speed, token=token, force=force, progress=not quiet)
    report = run_eval(list(targets), reference, outdir, options)
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
        whole = f", {cov.dense_positions} of {cov.n_positions} positions whole" if cov.dense_positions else ""
        kept = "every token" if cov.full_vocab else \
            f"ε = {cov.epsilon:g}, {cov.mean_set_size:.1f} tokens a position{whole}"
        click.echo(f"reference cache: {kept}, {cov.cache_bytes_per_position / 1024:.1f} KiB a position")
    click.echo(f"wrote {outdir / 'report.md'} ({len(report.rows) - len(failed)} evaluated, {len(failed)} failed)")


@click.command("check")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--reference", "reference", required=True,
              help="The checkpoint it was converted from: Hugging Face repo id or local folder (run in transformers).")
@click.option("--mmproj", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The mmproj to check with the text GGUF (default: the one beside it / in the folder).")
@click.option("--dtype", type=click.Choice(["bf16", "f32"]), default="bf16", show_default=True,
              help="Precision of the transformers reference (f32 needs twice the memory; f16 overflows in Gemma 3).")
@click.option("--memory", "memory", default=None,
              help="Memory the reference may use, e.g. 32GiB (default: the memory available now).")
@click.option("--greedy-tokens", default=DEFAULT_GREEDY_TOKENS, show_default=True, type=click.IntRange(min=1),
              help="Length of the greedy reply compared.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (torch and llama.cpp).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Layers of the GGUF to run on a GPU (the reference always runs on the CPU).")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for a gated Hub reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_context
def check_command(ctx: click.Context, target: Path, reference: str, mmproj: Path | None, dtype: str,
                  memory: str | None, greedy_tokens: int, threads: int | None, n_gpu_layers: int, token: str | None,
                  as_json: bool) -> None:
    """Prove TARGET (a GGUF, or a convert folder) is the --reference checkpoint: tokens, logits, image
    embeddings and a greedy reply compared in transformers and llama.cpp. Exit 0 only when every probe passes
    (1 when one fails)."""
    import json

    from medgemma_gguf.quant_eval.check import run_check
    from medgemma_gguf.sizes import parse_size

    report = run_check(target, reference, mmproj=mmproj, dtype=dtype,
                       memory_bytes=parse_size(memory) if memory else None, n_threads=threads,
                       n_gpu_layers=n_gpu_layers, greedy_tokens=greedy_tokens, token=token,
                       echo=lambda line: None if as_json else click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    else:
        click.echo(report.table())
    if not report.passed:
        ctx.exit(1)
