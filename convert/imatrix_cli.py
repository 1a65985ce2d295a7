"""``medgemma-gguf imatrix``: compute an importance matrix on the bundled image+text calibration set."""

from __future__ import annotations

from pathlib import Path

import click


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
    from convert.imatrix import compute_imatrix, write_imatrix_gguf
    from medgemma_gguf.atomic import check_can_write

    check_can_write(output, force)  # fail before the long computation, not after
    imatrix = compute_imatrix(model, mmproj, calibration=calibration, chunk_size=chunk_size, max_chunks=chunks,
                              progress=not quiet, n_threads=threads)
    write_imatrix_gguf(imatrix, output, force=force)
    described = imatrix.calibration or {}
    click.echo(f"wrote {output} ({len(imatrix.tensor_names)} matrices, {imatrix.chunk_count} chunks, "
               f"{described.get('items')} items, {described.get('positions')} positions of which "
               f"{described.get('image_positions')} image positions)")
