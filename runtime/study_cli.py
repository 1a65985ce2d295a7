"""``chat`` options for studies — ``--volume``, ``--slide``, ``--prior`` — and the first user turn they build.

The layouts are the notebooks' (``runtime.studies``); what was read is reported on stderr (the volume's
slices and order, the slide's patch grid) so a user can see what the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from medgemma_gguf.errors import InputError, setting
from medgemma_gguf.runtime.slides import DEFAULT_MAGNIFICATION, DEFAULT_PATCHES, Slide
from medgemma_gguf.runtime.volumes import DEFAULT_SLICES, Volume

STUDY_OPTION_NAMES = ("volume", "slices", "windows", "modality", "series", "slide", "patches", "magnification", "mpp",
                      "save_patches", "prior")


def study_options(command):
    """Add the study options to a click command (their values arrive as keyword arguments)."""
    for option in reversed([
        click.option("--volume", type=click.Path(path_type=Path),
                     help="CT/MR volume: a DICOM series folder or zip, or a .nii/.nii.gz file."),
        click.option("--slices", type=click.IntRange(min=1), default=DEFAULT_SLICES, show_default=True,
                     help="Slices sampled uniformly from the volume (Google's CT notebook: 85)."),
        click.option("--windows", help="CT windows for R,G,B as LO:HI,LO:HI,LO:HI in HU "
                                       "(default -1024:1024,-135:215,0:80, Google's CT notebook)."),
        click.option("--modality", type=click.Choice(["CT", "MR"], case_sensitive=False),
                     help="CT or MR (needed for NIfTI; DICOM records it)."),
        click.option("--series", help="SeriesInstanceUID to use when the folder holds several series."),
        click.option("--slide", type=click.Path(path_type=Path), help="Whole-slide image (.svs, .tiff, .ndpi, ...)."),
        click.option("--patches", type=click.IntRange(min=1), default=DEFAULT_PATCHES, show_default=True,
                     help="Tissue patches sampled from the slide (Google's pathology notebook: at most 125)."),
        click.option("--magnification", type=click.FloatRange(0.1, 200), default=DEFAULT_MAGNIFICATION,
                     show_default=True, help="Patch magnification (10 = 1.0 µm per pixel), 896-pixel patches."),
        click.option("--mpp", type=click.FloatRange(0.01, 100),
                     help="Slide pixel size in µm at full resolution, when the file does not record it."),
        click.option("--save-patches", type=click.Path(path_type=Path),
                     help="Write the slide patches the model sees (plain PNG), an overview and patches.tsv here."),
        click.option("--prior", type=click.Path(path_type=Path),
                     help="Prior image for a longitudinal comparison with the current --image."),
    ]):
        command = option(command)
    return command


@dataclass
class StudyTurn:
    """The first user turn's items (images already loaded) and the text that follows them, if any."""

    items: list[dict[str, Any]]
    after: str | None


def is_study(study: dict[str, Any]) -> bool:
    """Whether the study options ask for a volume, slide or prior (refusing options that need one without it)."""
    if study.get("save_patches") is not None and study.get("slide") is None:
        raise InputError("--save-patches writes the patches of a --slide; pass --slide too")
    return any(study.get(name) is not None for name in ("volume", "slide", "prior"))


def build_study_turn(chat_model: Any, *, prompt: str | None, images: tuple[Path, ...], preset: Any,
                     study: dict[str, Any]) -> StudyTurn:
    """Read the volume, slide or prior (one at a time, reported on stderr) into the first turn's items.

    ``preset``: a task preset (``runtime.prompt.Preset`` with ``input``) or None.
    """
    from medgemma_gguf.runtime.prompt import load_prompt_image
    from medgemma_gguf.runtime.slides import open_slide
    from medgemma_gguf.runtime.studies import expand_item, task_layout
    from medgemma_gguf.runtime.volumes import open_volume, parse_windows

    kinds = [name for name in ("volume", "slide", "prior") if study.get(name) is not None]
    if len(kinds) > 1:
        raise InputError("pass one of --volume, --slide or --prior per chat")
    kind = kinds[0]
    if kind != "prior" and images:
        raise InputError(f"--{kind} brings its own images; drop --image (it goes with --prior)")
    if kind == "prior" and len(images) != 1:
        raise InputError(f"{setting('prior')} compares two images: pass exactly one current --image with it")
    if preset is not None and preset.input != ("longitudinal" if kind == "prior" else kind):
        raise InputError(f"preset {preset.name} is for a {preset.input} input, not --{kind}")
    options = chat_model.image_options()
    if options is None:
        raise chat_model.no_vision_error()
    before, after = task_layout(preset, prompt) if preset is not None else (None, prompt)
    if kind == "volume":
        windows = parse_windows(study["windows"]) if study.get("windows") else None
        volume = open_volume(study["volume"], slices=study["slices"], windows=windows, modality=study.get("modality"),
                             series=study.get("series"), max_pixels=options.max_pixels)
        opened: Volume | Slide | None = volume
        click.echo(volume.info.describe(), err=True)
        for warning in volume.info.warnings:
            click.echo(f"warning: {warning}", err=True)
        item: dict[str, Any] = {"type": "volume", "volume": volume}
    elif kind == "slide":
        slide = opened = open_slide(study["slide"], patches=study["patches"], magnification=study["magnification"],
                                    mpp=study.get("mpp"))
        click.echo(slide.info.describe(), err=True)
        if study.get("save_patches") is not None:
            slide.save_patches(study["save_patches"], chat_model.image_size)
            click.echo(f"saved {len(slide)} patches, overview.png and patches.tsv in {study['save_patches']}",
                       err=True)
        item = {"type": "slide", "slide": slide}
        if preset is None:  # the notebook's layout: the text, then the patches
            before, after = prompt, None
    else:
        opened = None
        item = {"type": "longitudinal", "prior": str(study["prior"]), "current": str(images[0])}
    try:
        items: list[dict[str, Any]] = [{"type": "text", "text": before}] if before else []
        for part in expand_item(item, options, room=options.room(0), image_tokens=options.image_tokens,
                                n_ctx=options.n_ctx):
            items.append(part if part["type"] == "text" else
                         {"type": "image", "image": load_prompt_image(part["image"], options)})
    finally:
        if opened is not None:
            opened.close()
    return StudyTurn(items, after)
