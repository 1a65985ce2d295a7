"""``medgemma-gguf convert``."""

from __future__ import annotations

from pathlib import Path

import click

from medgemma_gguf.convert.tensor_types import ADAPTER_OUTTYPES, MMPROJ_OUTTYPES, TEXT_OUTTYPES
from medgemma_gguf.errors import UserError


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
@click.option("--adapter", help="Merge this PEFT LoRA adapter (folder or Hub repo id) into the weights.")
@click.option("--adapter-revision", help="Hub branch, tag or commit of --adapter.")
@click.option("--quants", multiple=True,
              help="Then quantize: comma-separated llama.cpp types or UD recipes (see `quantize --list`).")
@click.option("--imatrix", help="With --quants: an importance matrix file, or 'auto' to compute one.")
@click.option("--recipe", "recipes", multiple=True, type=click.Path(path_type=Path),
              help="With or without --quants: also quantize with your own recipe TOML. May be repeated.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for quantizing (default: all cores).")
@click.option("--split-max-size", "split_max_size", metavar="SIZE",
              help="Write models bigger than SIZE (e.g. 45GB) as llama.cpp split parts NAME-0000i-of-0000N.gguf; "
                   "0 never splits. Default: 45GB parts for files over 49GB (the Hub's per-file limit is 50GB).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def convert_command(source: str, outdir: Path, outtype: str, mmproj_type: str, name: str | None,
                    token: str | None, revision: str | None, adapter: str | None, adapter_revision: str | None,
                    quants: tuple[str, ...], imatrix: str | None, recipes: tuple[Path, ...], threads: int | None,
                    split_max_size: str | None, force: bool, quiet: bool) -> None:
    """Convert SOURCE (a Hub repo id like google/medgemma-4b-it, or a local folder) to GGUF, then quantize.

    With --adapter, a PEFT LoRA adapter is merged into the weights as they are converted (text and
    vision tower alike); the result is a model like any other (quantize, chat, eval).
    """
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.gguf_split import parse_split_size

    split = parse_split_size(split_max_size)
    quantizing = bool(quants or recipes)
    if quantizing:
        check_quant_request(quants, recipes, imatrix)  # before the long conversion, not after it
    elif imatrix:
        raise UserError("--imatrix only applies with --quants or --recipe; add --quants Q4_K_M,... or drop it")
    result = convert_checkpoint(source, outdir, outtype=outtype, mmproj_type=mmproj_type, name=name,
                                force=force, token=token, revision=revision, progress=not quiet,
                                adapter=adapter, adapter_revision=adapter_revision, split_max_size=split)
    state = "up to date" if result.skipped else "wrote"
    click.echo(f"{state} {result.text_path}")
    if result.mmproj_path:
        click.echo(f"{state} {result.mmproj_path}")
    click.echo(f"{state} {result.manifest_path}")
    if quantizing:
        from medgemma_gguf.convert.quantize.cli import echo_results
        from medgemma_gguf.convert.quantize.folder import quantize_folder
        from medgemma_gguf.errors import render

        results = quantize_folder(outdir, list(quants), imatrix=imatrix, recipe_files=list(recipes), force=force,
                                  progress=not quiet, n_threads=threads, split_max_size=split,
                                  report=lambda line: click.echo(render(line, "cli")))
        echo_results(results)
        click.echo(f"updated {outdir / 'manifest.json'} and {outdir / 'README.md'}")


def check_quant_request(quants: tuple[str, ...], recipes: tuple[Path, ...], imatrix: str | None) -> None:
    """Fail fast on unknown quant names, bad recipe files, or imatrix types asked for without --imatrix."""
    from medgemma_gguf.convert.quantize.folder import IMATRIX_AUTO
    from medgemma_gguf.convert.quantize.llama_quantize import may_need_imatrix, parse_quant_list, resolve_quants
    from medgemma_gguf.convert.quantize.recipe import load_recipe

    specs = resolve_quants(parse_quant_list(list(quants)), [load_recipe(path) for path in recipes])
    needing = [spec.name for spec in specs if may_need_imatrix(spec)]
    if needing and imatrix is None:
        raise UserError(f"{', '.join(needing)} need an importance matrix; add --imatrix {IMATRIX_AUTO} to compute "
                        "one on the bundled calibration set, or --imatrix FILE")
    if imatrix is not None and imatrix != IMATRIX_AUTO and not Path(imatrix).is_file():
        raise UserError(f"imatrix file {imatrix} not found; pass an existing file or --imatrix {IMATRIX_AUTO}")


@click.command("convert-adapter")
@click.argument("adapter")
@click.option("--base", required=True,
              help="The base model: its text GGUF, output folder, or checkpoint (folder or Hub repo id).")
@click.option("--outdir", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder for the adapter GGUF (recorded in its manifest.json).")
@click.option("--outtype", type=click.Choice(list(ADAPTER_OUTTYPES), case_sensitive=False), default="f16",
              show_default=True, help="Tensor type of the adapter's matrices.")
@click.option("--name", help="Adapter name used in the file name and by serve (default: the repo or folder name).")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token (default: $HF_TOKEN or `hf auth login`).")
@click.option("--revision", help="Hub branch, tag or commit of ADAPTER.")
@click.option("--base-revision", help="Hub branch, tag or commit of --base.")
@click.option("--force", is_flag=True, help="Overwrite an existing adapter file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert_adapter_command(adapter: str, base: str, outdir: Path, outtype: str, name: str | None, token: str | None,
                            revision: str | None, base_revision: str | None, force: bool, quiet: bool) -> None:
    """Convert the PEFT LoRA ADAPTER (folder or Hub repo id) to a GGUF LoRA adapter for llama.cpp.

    Apply it with `chat`/`serve --lora FILE` (or llama.cpp's --lora). Adapters that change the vision
    tower cannot be applied at run time: merge those with `convert BASE --adapter ADAPTER`.
    """
    from medgemma_gguf.convert.lora_gguf import convert_adapter

    result = convert_adapter(adapter, base, outdir, outtype=outtype, name=name, force=force, token=token,
                             revision=revision, base_revision=base_revision, progress=not quiet)
    click.echo(f"wrote {result.path} (adapter.lora.alpha {result.alpha:g})")
    click.echo(f"wrote {result.manifest_path}")
