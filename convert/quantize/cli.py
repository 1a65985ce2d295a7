"""``medgemma-gguf quantize`` (llama.cpp quants, recipes and AUTO mixes of a converted folder) and
``medgemma-gguf imatrix`` (an importance matrix on the bundled image+text calibration set)."""

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


def echo_listing(rows: list, echo=click.echo) -> None:
    """``quantize --list``: name, kind, bits per weight, imatrix need, description."""
    echo(f"{'quant':<12} {'kind':<10} {'bits/weight':<22} {'imatrix':<9} description")
    for row in rows:
        bits = f"{row.bits:.2f} (MedGemma 4B)" if row.exact else f"{row.bits:.2f} (main type)"
        echo(f"{row.name:<12} {row.kind:<10} {bits:<22} {'needed' if row.needs_imatrix else 'optional':<9} "
             f"{row.description}")
    echo("imatrix: needed = llama.cpp refuses the type without one; optional = used when given (by default the "
         "folder's), and it lowers the error of every type.")


@click.command("quantize")
@click.argument("outdir", type=click.Path(path_type=Path), required=False)
@click.option("--quants", "-q", multiple=True,
              help="Comma-separated types: llama.cpp's (Q8_0, Q4_K_M, IQ2_XXS, ...) or recipes (UD-Q4_K_XL, ...).")
@click.option("--imatrix",
              help="Importance matrix file, or 'auto' to compute one on the bundled calibration set (saved as "
                   "OUTDIR/<model>.imatrix). Default: the folder's own, for every type and recipe; AUTO computes one "
                   "when there is none.")
@click.option("--no-imatrix", is_flag=True, help="Quantize without an importance matrix (same as --imatrix none).")
@click.option("--recipe", "recipes", multiple=True, type=click.Path(path_type=Path),
              help="Your own recipe TOML (built in addition to --quants). May be repeated.")
@click.option("--split-max-size", "split_max_size", metavar="SIZE",
              help="Write quants bigger than SIZE (e.g. 45GB) as llama.cpp split parts; 0 never splits. Default: "
                   "45GB parts for files over 49GB.")
@click.option("--force", is_flag=True, help="Rebuild outputs that are up to date or were made from other inputs.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores).")
@click.option("--list", "list_types", is_flag=True,
              help="List the quant types and recipes with bits per weight and imatrix need, then exit (no OUTDIR "
                   "needed).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--target-bpw", type=float,
              help="AUTO: the best mix (from measured sensitivity) within this many bits per weight.")
@click.option("--target-size", help="AUTO: the best mix whose text GGUF fits this file size (e.g. 2.6GB, 2.5GiB).")
@click.option("--vram", help="AUTO: the best mix that runs fully on a GPU with this much memory (needs --ctx).")
@click.option("--ctx", type=int, help="AUTO with --vram: the context length that must fit.")
@click.option("--sensitivity", "sensitivity_method", type=click.Choice(["fast", "proxy", "measured"]), default="fast",
              show_default=True,
              help="AUTO: fast (ggml's per-tensor quantization error, calibrated per tensor kind by a few KL "
                   "measurements), proxy (calibrated per tensor group: two measurements each), or measured (KL "
                   "for every tensor group and type).")
@click.option("--dry-run", is_flag=True,
              help="AUTO: print the plan (what will be measured, estimated time), then exit.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="AUTO: cache folder for sensitivity tables and reference outputs "
                   "(default $MEDGEMMA_GGUF_CACHE or ~/.cache/medgemma-gguf).")
@click.option("--sensitivity-sample", type=click.IntRange(min=1),
              help="AUTO: measure KL on the first N text and N image conversations of the calibration set "
                   "(default: 1 for fast, all for proxy and measured; fewer is faster and coarser).")
@click.option("--workers", type=click.IntRange(min=1),
              help="AUTO fast: threads quantizing tensors in parallel, one tensor each (default: --threads, "
                   "else all cores).")
@click.option("--imatrix-chunks", type=click.IntRange(min=0),
              help="When an importance matrix is computed here: read the first N chunks of 512 positions of the "
                   "calibration set, 0 = all of it (default: 6, about 3,000 positions, when AUTO computes one; all "
                   "with --imatrix auto).")
def quantize_command(outdir: Path | None, quants: tuple[str, ...], imatrix: str | None, no_imatrix: bool,
                     recipes: tuple[Path, ...], split_max_size: str | None, force: bool, threads: int | None,
                     list_types: bool, quiet: bool,
                     target_bpw: float | None, target_size: str | None, vram: str | None, ctx: int | None,
                     sensitivity_method: str, dry_run: bool, cache_dir: Path | None, sensitivity_sample: int | None,
                     workers: int | None, imatrix_chunks: int | None) -> None:
    """Quantize the unquantized text GGUF in OUTDIR (written by convert) with llama.cpp's quantizer.

    With --target-bpw, --target-size or --vram/--ctx: AUTO, one type per tensor chosen from measured
    sensitivity, written as OUTDIR/<name>-AUTO-<bpw>.gguf with its recipe <name>-AUTO-<bpw>.toml.
    """
    from medgemma_gguf.convert.quantize.folder import (
        AUTO_IMATRIX_CHUNKS,
        IMATRIX_NONE,
        AutoRequest,
        auto_quantize_folder,
        plan_auto,
        quantize_folder,
    )
    from medgemma_gguf.convert.quantize.llama_quantize import quant_listing
    from medgemma_gguf.errors import UserError, render

    if list_types:
        echo_listing(quant_listing())
        return
    if outdir is None:
        raise click.UsageError("missing OUTDIR (the folder convert wrote); only --list runs without one")
    if no_imatrix:
        if imatrix is not None:
            raise UserError("pass either --imatrix or --no-imatrix, not both")
        imatrix = IMATRIX_NONE
    auto = any(v is not None for v in (target_bpw, target_size, vram, ctx))
    if auto:
        if quants or recipes:
            raise UserError("AUTO (--target-bpw/--target-size/--vram) runs alone; drop --quants/--recipe or run "
                            "them separately")
        from medgemma_gguf.convert.quantize.sensitivity import SensitivityOptions

        chunks = AUTO_IMATRIX_CHUNKS if imatrix_chunks is None else (imatrix_chunks or None)
        options = SensitivityOptions(method=sensitivity_method, cache_dir=cache_dir, max_text=sensitivity_sample,
                                     max_images=sensitivity_sample, force=force, n_threads=threads, workers=workers)
        request = AutoRequest(target_size=target_size, target_bpw=target_bpw, vram=vram, ctx=ctx, imatrix=imatrix,
                              imatrix_chunks=chunks, sensitivity=options)
        if dry_run:
            plan = plan_auto(outdir, request)
            for line in plan.lines("cli"):
                click.echo(line)
            click.echo("dry run: nothing measured or written")
            return
        made = auto_quantize_folder(outdir, request, progress=not quiet, report=click.echo)
        echo_results([made.result])
        cost = made.sensitivity.cost
        origin = "cached" if made.sensitivity.from_cache else "measured"
        errors = f"{cost['error_items']} tensor errors, " if cost.get("error_items") else ""
        click.echo(f"  {made.how['budget']}: {made.how['budget_used']} used, predicted KL increase "
                   f"{made.how['predicted_delta_kl']:.4g} (additive), sensitivity {origin} "
                   f"({made.how['sensitivity_method']}: {errors}{cost['quantizations']} quantizations, "
                   f"{cost['evaluations']} evaluations, {cost['seconds']:.0f} s)")
        click.echo(f"  recipe: {made.recipe_path} (rebuild with --recipe {made.recipe_path})")
        click.echo(f"updated {outdir / 'manifest.json'} and {outdir / 'README.md'}")
        return
    if (sensitivity_method != "fast" or cache_dir is not None or sensitivity_sample is not None or dry_run
            or workers is not None):
        raise UserError("--sensitivity, --sensitivity-sample, --cache-dir, --workers and --dry-run apply to AUTO; "
                        "add --target-bpw, --target-size or --vram")
    from medgemma_gguf.gguf_split import parse_split_size

    results = quantize_folder(outdir, list(quants), imatrix=imatrix, recipe_files=list(recipes), force=force,
                              progress=not quiet, n_threads=threads, split_max_size=parse_split_size(split_max_size),
                              imatrix_chunks=imatrix_chunks or None,
                              report=lambda line: click.echo(render(line, "cli")))
    echo_results(results)
    click.echo(f"updated {outdir / 'manifest.json'} and {outdir / 'README.md'}")


@click.command("imatrix")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--mmproj", type=click.Path(path_type=Path),
              help="The model's mmproj GGUF: image turns of the calibration set are evaluated with it.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Where to write the imatrix (llama.cpp's GGUF imatrix format).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="A calibration JSONL file (default: the bundled medgemma-gguf calibration set).")
@click.option("--chunks", type=int, help="Stop after this many chunks (default: all).")
@click.option("--chunk-size", type=int, default=512, show_default=True, help="Positions per chunk.")
@click.option("--threads", type=int, help="CPU threads (default: all cores).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def imatrix_command(model: Path, mmproj: Path | None, output: Path, calibration: Path | None, chunks: int | None,
                    chunk_size: int, threads: int | None, force: bool, quiet: bool) -> None:
    """Compute an importance matrix for MODEL (a text GGUF) to guide low-bit quantization."""
    from medgemma_gguf.atomic import check_can_write
    from medgemma_gguf.convert.quantize.imatrix import compute_imatrix, write_imatrix_gguf

    check_can_write(output, force)  # fail before the long computation, not after
    imatrix = compute_imatrix(model, mmproj, calibration=calibration, chunk_size=chunk_size, max_chunks=chunks,
                              progress=not quiet, n_threads=threads)
    write_imatrix_gguf(imatrix, output, force=force)
    described = imatrix.calibration or {}
    click.echo(f"wrote {output} ({len(imatrix.tensor_names)} matrices, {imatrix.chunk_count} chunks, "
               f"{described.get('items')} items, {described.get('positions')} positions of which "
               f"{described.get('image_positions')} image positions)")


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repository as private (when it does not exist yet).")
@click.option("--revision", help="Branch to commit to (created when missing; default: main).")
@click.option("--yes", is_flag=True, help="Upload. Without it, a dry run lists what would be uploaded.")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token with write access (default: $HF_TOKEN or "
                                                 "`hf auth login`).")
def push_command(folder: Path, repo: str, private: bool, revision: str | None, yes: bool, token: str | None) -> None:
    """Publish FOLDER (written by convert/quantize) to the Hub model repository REPO (OWNER/NAME): the models
    (every part of a split model), mmproj, importance matrix, recipes, evaluation report and a model card with
    the Hub's metadata. A dry run by default; --yes uploads, in one commit."""
    from medgemma_gguf.convert.quantize.publish import push

    push(folder, repo, private=private, revision=revision, yes=yes, token=token, report=click.echo)


@click.group("export")
def export_group() -> None:
    """Files for other tools: an Ollama Modelfile, a stock llama-quantize command."""


@export_group.command("ollama")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--quant", help="The quant to export, by type or file name (default: chat's default rule).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Where to write it (default: FOLDER/Modelfile).")
@click.option("--force", is_flag=True, help="Replace a Modelfile that medgemma-gguf did not write.")
def export_ollama_command(folder: Path, quant: str | None, output: Path | None, force: bool) -> None:
    """Write an Ollama Modelfile for one quant of FOLDER and the mmproj beside it; then
    `ollama create NAME -f FOLDER/Modelfile`."""
    from medgemma_gguf.convert.quantize.export import export_ollama

    result = export_ollama(folder, quant=quant, output=output, force=force)
    click.echo(f"wrote {result.path} ({result.model.name}" + (f" + {result.mmproj.name})" if result.mmproj else ")"))
    click.echo(f"then: ollama create {result.name} -f {result.path}")


@export_group.command("llama-quantize")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--recipe", required=True,
              help="A bundled recipe (UD-Q4_K_XL, ...) or a recipe TOML (e.g. FOLDER/<model>-AUTO-4.50.toml).")
@click.option("--no-imatrix", is_flag=True, help="Leave the folder's importance matrix out of the command.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="The output GGUF the command names.")
def export_llama_quantize_command(folder: Path, recipe: str, no_imatrix: bool, output: Path | None) -> None:
    """Print the stock llama-quantize command that reproduces RECIPE's per-tensor types on FOLDER's
    unquantized text GGUF (one --tensor-type per tensor kind and type)."""
    from medgemma_gguf.convert.quantize.export import llama_quantize_command

    click.echo(llama_quantize_command(folder, recipe, use_imatrix=not no_imatrix, output=output).shell)
