"""Study content items — a volume, a slide, a longitudinal pair — and the prompt layouts of Google's notebooks.

Messages may hold, besides ``text`` and ``image`` items (HF/OpenAI shape), three items that expand in place
into images (and labels) when the prompt is built (``expand_item``; ``runtime.prompt`` calls it):

* ``{"type": "volume", "path"|"data"|"volume": ..., "slices": 85, "windows": [[lo, hi], [lo, hi], [lo, hi]],
  "modality": "CT"|"MR", "series": UID}`` -> ``image, "SLICE 1", image, "SLICE 2", ...`` (``runtime.volumes``:
  a DICOM series folder or zip, or NIfTI; ``data`` is base64 of a zip or a .nii/.nii.gz file);
* ``{"type": "slide", "path"|"data"|"slide": ..., "patches": 125, "magnification": 10, "mpp": None, "seed": 0,
  "suffix": ".svs"}`` -> the tissue patches as images, in row-major order (``runtime.slides``);
* ``{"type": "longitudinal", "prior": IMAGE, "current": IMAGE}`` -> ``image(prior), image(current)``.

The notebooks' layouts (``volume_messages``, ``slide_messages``, ``longitudinal_messages`` build them):

* CT (high_dimensional_ct_hugging_face): ``[instruction, image, "SLICE 1", ..., image, "SLICE n", query]``;
* pathology (high_dimensional_pathology_hugging_face): ``[prompt, patch, patch, ...]`` — no labels, nothing
  after the patches;
* longitudinal CXR (cxr_longitudinal_comparison_with_hugging_face): ``[prior image, current image, prompt]``
  — the order is the only label (the notebook adds no words for "prior"/"current").

The instructions and questions of those notebooks are presets in ``presets.toml`` (``task_preset``).

Local paths are read only where allowed (``allow_local_files``, or under one of ``allowed_roots``:
``runtime.sources``). Before any pixel is decoded, a volume or slide that would push the prompt past the
images the context can hold (``room``) or the server's image limit is refused, saying how many fit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from medgemma_gguf.errors import InputError, ResourceError, setting
from medgemma_gguf.runtime.slides import DEFAULT_MAGNIFICATION, DEFAULT_PATCHES, Slide, open_slide
from medgemma_gguf.runtime.sources import check_local_path, decode_payload
from medgemma_gguf.runtime.volumes import DEFAULT_SLICES, Volume, open_volume

STUDY_ITEM_TYPES = ("volume", "slide", "longitudinal")


class StudyOptions(Protocol):
    """What expanding an item needs from ``runtime.prompt.ImageOptions``."""

    @property
    def image_size(self) -> int: ...
    @property
    def max_pixels(self) -> int: ...
    @property
    def allow_local_files(self) -> bool: ...
    @property
    def allowed_roots(self) -> tuple[Path, ...]: ...


def requested_images(item: Mapping[str, Any]) -> int:
    """How many images an item asks for at most, before anything is read (for request limits)."""
    kind = item.get("type")
    if kind == "volume":
        value = item.get("slices", DEFAULT_SLICES)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else DEFAULT_SLICES
    if kind == "slide":
        value = item.get("patches", DEFAULT_PATCHES)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else DEFAULT_PATCHES
    if kind == "longitudinal":
        return 2
    return 1 if kind in ("image", "image_url") else 0


def _source(item: Mapping[str, Any], kind: str, options: StudyOptions) -> Path | bytes:
    given = [key for key in ("path", "data") if item.get(key) is not None]
    if len(given) != 1:
        local = "series folder, zip or NIfTI file" if kind == "volume" else "slide file"
        raise InputError(f"a {kind} item needs exactly one of \"path\" (a local {local}) or \"data\" (base64)")
    if given[0] == "data":
        return decode_payload(item["data"], what=kind)
    path = item["path"]
    if not isinstance(path, str) or not path:
        raise InputError(f"a {kind} item's \"path\" must be a non-empty string")
    return check_local_path(path, what=kind, allow_local_files=options.allow_local_files,
                            allowed_roots=options.allowed_roots)


def _int(item: Mapping[str, Any], key: str, default: int, name: str) -> int:
    value = item.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def open_volume_item(item: Mapping[str, Any], options: StudyOptions) -> Volume:
    """The ``Volume`` a volume item names (nothing decoded yet)."""
    if isinstance(item.get("volume"), Volume):
        return item["volume"]
    unknown = set(item) - {"type", "path", "data", "slices", "windows", "modality", "series"}
    if unknown:
        raise InputError(f"a volume item has unknown field(s) {', '.join(sorted(unknown))}; use path or data, slices, "
                         "windows, modality, series")
    source = _source(item, "volume", options)
    series = item.get("series")
    if series is not None and not isinstance(series, str):
        raise InputError("a volume item's \"series\" must be a SeriesInstanceUID string")
    return open_volume(source, slices=_int(item, "slices", DEFAULT_SLICES, setting("volume_slices")),
                       windows=item.get("windows"), modality=item.get("modality"), series=series,
                       max_pixels=options.max_pixels, allowed_roots=options.allowed_roots)


def open_slide_item(item: Mapping[str, Any], options: StudyOptions) -> Slide:
    """The ``Slide`` a slide item names, its patches chosen (none read yet)."""
    if isinstance(item.get("slide"), Slide):
        return item["slide"]
    unknown = set(item) - {"type", "path", "data", "patches", "magnification", "mpp", "seed", "suffix"}
    if unknown:
        raise InputError(f"a slide item has unknown field(s) {', '.join(sorted(unknown))}; use path or data, patches, "
                         "magnification, mpp, seed, suffix")
    source = _source(item, "slide", options)
    suffix = item.get("suffix") or ".tiff"
    if not isinstance(suffix, str) or not suffix.startswith(".") or not suffix[1:].isalnum() or len(suffix) > 8:
        raise InputError(f"a slide item's \"suffix\" must be a file extension such as \".svs\", got {suffix!r}")
    magnification = item.get("magnification", DEFAULT_MAGNIFICATION)
    seed = item.get("seed", 0)
    return open_slide(source, patches=_int(item, "patches", DEFAULT_PATCHES, setting("patches")),
                      magnification=DEFAULT_MAGNIFICATION if magnification is None else magnification,
                      mpp=item.get("mpp"), seed=0 if seed is None else seed, suffix=suffix)


def _check_room(n: int, what: str, room: int | None, max_images: int | None, image_tokens: int, n_ctx: int | None,
                fewer: str) -> None:
    """Refuse ``n`` more images over the request's limit or the context's room, saying how many fit."""
    if max_images is not None and n > max_images:
        allowed = max(max_images, 0)
        raise ResourceError(f"{what} add {n} images and only {allowed} more are allowed per request "
                            f"({setting('max_images')}); pass {fewer} {allowed}")
    if room is not None and n > room:
        if room < 1:
            raise ResourceError(f"the context of {n_ctx} positions has no room for even one more image "
                                f"({image_tokens} positions each) for {what}; raise {setting('n_ctx')}")
        raise ResourceError(f"{what} take {n} x {image_tokens} = {n * image_tokens} positions and the context of "
                            f"{n_ctx} has room for at most {room} more images; pass {fewer} {room} or raise "
                            f"{setting('n_ctx')}")


def expand_item(item: Mapping[str, Any], options: StudyOptions, *, room: int | None = None,
                max_images: int | None = None, image_tokens: int = 0, n_ctx: int | None = None
                ) -> Iterator[dict[str, Any]]:
    """The ``image`` and ``text`` items a study item stands for, in prompt order, one image decoded at a time.

    ``room``: how many more images the context can hold; ``max_images``: how many more a request may carry.
    A study over either is refused before its first pixel is decoded.
    """
    kind = item.get("type")
    if kind == "longitudinal":
        for key in ("prior", "current"):
            if item.get(key) is None:
                raise InputError(f"a longitudinal item needs \"prior\" and \"current\" images; {key!r} is missing")
        _check_room(2, "the longitudinal pair's 2 images", room, max_images, image_tokens, n_ctx,
                    "fewer images than")
        yield {"type": "image", "image": item["prior"]}
        yield {"type": "image", "image": item["current"]}
        return
    if kind == "volume":
        volume = open_volume_item(item, options)
        owned = not isinstance(item.get("volume"), Volume)
        try:
            _check_room(len(volume), f"the volume's {len(volume)} slices", room, max_images, image_tokens, n_ctx,
                        setting("volume_slices"))
            for number, pixels in enumerate(volume.images(options.image_size), 1):
                yield {"type": "image", "image": pixels}
                yield {"type": "text", "text": f"SLICE {number}"}
        finally:
            if owned:
                volume.close()
        return
    if kind == "slide":
        slide = open_slide_item(item, options)
        owned = not isinstance(item.get("slide"), Slide)
        try:
            _check_room(len(slide), f"the slide's {len(slide)} patches", room, max_images, image_tokens, n_ctx,
                        setting("patches"))
            for pixels in slide.images(options.image_size):
                yield {"type": "image", "image": pixels}
        finally:
            if owned:
                slide.close()
        return
    raise InputError(f"unknown study item type {kind!r}; use one of {', '.join(STUDY_ITEM_TYPES)}")


# --- the notebooks' layouts ---------------------------------------------------------------------------------


def _text(text: str | None) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}] if text else []


def volume_messages(volume: Mapping[str, Any] | Volume | str | Path, question: str, *,
                    instruction: str | None = None) -> list[dict[str, Any]]:
    """One user turn in the CT notebook's layout: instruction, each slice then ``"SLICE n"``, the question."""
    item = _study_item("volume", volume)
    return [{"role": "user", "content": [*_text(instruction), item, *_text(question)]}]


def slide_messages(slide: Mapping[str, Any] | Slide | str | Path, prompt: str) -> list[dict[str, Any]]:
    """One user turn in the pathology notebook's layout: the prompt, then the patches (no labels)."""
    return [{"role": "user", "content": [*_text(prompt), _study_item("slide", slide)]}]


def longitudinal_messages(prior: Any, current: Any, prompt: str) -> list[dict[str, Any]]:
    """One user turn in the longitudinal CXR notebook's layout: the prior image, the current image, the prompt."""
    return [{"role": "user", "content": [{"type": "longitudinal", "prior": prior, "current": current},
                                         *_text(prompt)]}]


def _study_item(kind: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {"type": kind, **{k: v for k, v in value.items() if k != "type"}}
    if isinstance(value, Volume | Slide):
        return {"type": kind, kind: value}
    return {"type": kind, "path": str(value)}


def task_layout(preset: Any, prompt: str | None) -> tuple[str | None, str | None]:
    """(text before the images, text after them) for a task preset and the user's prompt.

    ``{prompt}`` in the preset's instruction is replaced by ``prompt`` (required then); otherwise ``prompt``
    replaces the preset's question.
    """
    instruction, question = preset.instruction, preset.question
    if instruction and "{prompt}" in instruction:
        if not prompt:
            raise InputError(f"preset {preset.name} needs {preset.prompt_hint or 'a prompt'}; pass it as the prompt")
        return instruction.replace("{prompt}", prompt), question
    return instruction, prompt if prompt else question


def count_images(content: Sequence[Mapping[str, Any]]) -> int:
    return sum(requested_images(item) for item in content if isinstance(item, Mapping))
