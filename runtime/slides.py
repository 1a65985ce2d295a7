"""Whole-slide pathology images (.svs, tiled pyramidal .tif/.tiff, .ndpi, .mrxs, .scn, DICOM WSI, ...) turned
into the tissue patches MedGemma 1.5 was shown, as Google's pathology notebook prepares them.

Reference: Google-Health/medgemma ``notebooks/high_dimensional_pathology_hugging_face.ipynb`` (ez-wsi 6.1.5):
the level at ``"10X"`` (ez-wsi's convention: pixel spacing = 0.01 mm / magnification, so 10X = 1.0 µm per
pixel), non-overlapping ``patch_size = 896`` patches (``stride_size = patch_size``) over tissue, at most
``maximum_number_of_patches = 125`` chosen with ``random.sample``, sent as images after one text item with
no labels and no text after them (``slide_items``). Here:

* Reading: OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel; no system library). The pixel
  size comes from ``openslide.mpp-x``, else from ``openslide.objective-power`` (10 µm / power), else from
  ``mpp``. Patches are read from the coarsest level no coarser than the target (ez-wsi's 23 % tolerance),
  composited on white (OpenSlide returns transparent pixels outside the scanned area) and resized to the
  model's size with Pillow's bilinear filter.
* Tissue (the issue's simple rule instead of ez-wsi's luminance band): on the slide's lowest-resolution
  level (a thumbnail; refused if over ``MAP_MAX_PIXELS``, a dimension-bomb guard), saturation
  ``S = (max - min) / max`` of each pixel on 0..255, thresholded by Otsu's method but never below
  ``SATURATION_FLOOR`` (so a blank slide finds nothing); a grid cell is tissue when at least ``min_tissue``
  (default half) of its thumbnail pixels are.
* Sampling: ``random.Random(seed).sample`` of the tissue cells (the notebook's ``random.sample`` has no
  seed), then put back in row-major order — the MedGemma 1.5 report says training kept the patches' spatial
  order; the notebook's ``random.sample`` does not.
* What the model saw: ``SlideInfo.describe`` reports the grid and the chosen cells; ``save_patches`` writes
  each patch as a plain PNG (no metadata), an overview PNG with the chosen cells outlined, and a
  ``patches.tsv`` of their grid cells and level-0 coordinates.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from medgemma_gguf.atomic import atomic_directory
from medgemma_gguf.errors import InputError, IntegrityError, NotFoundError, ResourceError, setting

log = logging.getLogger(__name__)

PATCH_SIZE = 896
DEFAULT_PATCHES = 125
DEFAULT_MAGNIFICATION = 10.0
MAGNIFICATION_TOLERANCE = 0.23  # ez-wsi's MAX_LEVEL_DIST
MAP_MAX_PIXELS = 25_000_000
MAX_PATCH_READ_PIXELS = 64_000_000
SATURATION_FLOOR = 20
DEFAULT_MIN_TISSUE = 0.5
SUPPORTED = ".svs, tiled pyramidal .tif/.tiff, .ndpi, .mrxs, .scn, .vms, .bif or DICOM WSI"


def magnification_mpp(magnification: float) -> float:
    """Micrometres per pixel at a magnification, ez-wsi's convention (10X = 1.0 µm/px)."""
    return 10.0 / magnification


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (foreground is ``values > threshold``); 0 for constant input (no split:
    the saturation floor alone decides)."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0 or np.count_nonzero(hist) < 2:
        return 0.0
    p = hist / total
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    sigma = np.nan_to_num(sigma, nan=0.0, posinf=0.0, neginf=0.0)
    return float(np.argmax(sigma))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on 0..255 (uint8) of an RGB uint8 array: ``(max - min) / max``, 0 where max is 0."""
    rgb = np.asarray(rgb, np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(high > 0, (high - low) / high, 0.0)
    return np.round(s * 255.0).astype(np.uint8)


def tissue_mask(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB thumbnail and the saturation threshold used."""
    s = saturation(rgb)
    threshold = max(otsu_threshold(s), float(SATURATION_FLOOR))
    return s > threshold, threshold


def _on_white(region: Image.Image) -> np.ndarray:
    rgba = np.asarray(region.convert("RGBA"), np.float32)
    alpha = rgba[:, :, 3:4] / 255.0
    return np.round(rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


@dataclass(frozen=True)
class Patch:
    """One grid cell: its row and column, and its top-left corner and side in level-0 pixels."""

    row: int
    col: int
    x: int
    y: int
    side: int
    tissue: float


@dataclass
class SlideInfo:
    """The grid over the slide and the patches chosen: what the model is shown."""

    width: int
    height: int
    mpp: float
    magnification: float
    level: int
    level_mpp: float
    read_side: int
    grid_rows: int
    grid_cols: int
    cell_side: int
    n_tissue: int
    threshold: float
    patches: list[Patch] = field(default_factory=list)

    def describe(self) -> str:
        cells = " ".join(f"r{p.row}c{p.col}" for p in self.patches)
        return (f"slide {self.width}x{self.height} px at {self.mpp:.3g} µm/px; patches of {PATCH_SIZE} px at "
                f"{self.magnification:g}x ({magnification_mpp(self.magnification):.3g} µm/px) read from level "
                f"{self.level} ({self.level_mpp:.3g} µm/px, {self.read_side} px); grid {self.grid_rows} rows x "
                f"{self.grid_cols} columns of {self.cell_side} level-0 px; {self.n_tissue} cells with tissue; "
                f"{len(self.patches)} patches in row-major order: {cells}")


class Slide:
    """An opened slide with its patches chosen; ``images`` reads them one at a time."""

    def __init__(self, handle: Any, info: SlideInfo, overview: np.ndarray, map_scale: float, temp: Path | None):
        self.info = info
        self._slide = handle
        self._overview = overview
        self._map_scale = map_scale
        self._temp = temp

    def __len__(self) -> int:
        return len(self.info.patches)

    def patch(self, patch: Patch, image_size: int) -> np.ndarray:
        """One patch as uint8 [image_size, image_size, 3]."""
        side = self.info.read_side
        try:
            region = self._slide.read_region((patch.x, patch.y), self.info.level, (side, side))
        except Exception as exc:  # noqa: BLE001 - OpenSlide raises OpenSlideError on damaged tiles
            raise IntegrityError(f"cannot read patch r{patch.row}c{patch.col} of the slide: {exc}; the file is "
                                 "damaged") from exc
        rgb = _on_white(region)
        if side != image_size:
            rgb = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.Resampling.BILINEAR))
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    def images(self, image_size: int) -> Iterator[np.ndarray]:
        for patch in self.info.patches:
            yield self.patch(patch, image_size)

    def save_patches(self, folder: Path, image_size: int = PATCH_SIZE) -> list[Path]:
        """Write the patches (plain PNG, no metadata), ``overview.png`` and ``patches.tsv`` into a new or empty
        ``folder`` — all or nothing."""
        folder = Path(folder)
        names = []
        with atomic_directory(folder) as partial:
            rows = ["index\trow\tcol\tx\ty\tside\ttissue"]
            for index, patch in enumerate(self.info.patches, 1):
                name = f"patch-{index:03d}-r{patch.row}-c{patch.col}.png"
                Image.fromarray(self.patch(patch, image_size)).save(partial / name, format="PNG")
                rows.append(f"{index}\t{patch.row}\t{patch.col}\t{patch.x}\t{patch.y}\t{patch.side}\t{patch.tissue:.3f}")
                names.append(name)
            Image.fromarray(self._overview_with_grid()).save(partial / "overview.png", format="PNG")
            (partial / "patches.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return [folder / name for name in names]

    def _overview_with_grid(self) -> np.ndarray:
        img = Image.fromarray(self._overview)
        draw = ImageDraw.Draw(img)
        scale = self._map_scale
        for patch in self.info.patches:
            box = [patch.x / scale, patch.y / scale, (patch.x + patch.side) / scale - 1,
                   (patch.y + patch.side) / scale - 1]
            draw.rectangle(box, outline=(0, 160, 0), width=max(1, round(min(img.size) / 200)))
        return np.asarray(img)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
        if self._temp is not None:
            with contextlib.suppress(OSError):
                self._temp.unlink()
            self._temp = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(source: Path | bytes, *, patches: int = DEFAULT_PATCHES,
               magnification: float = DEFAULT_MAGNIFICATION, mpp: float | None = None, seed: int = 0,
               min_tissue: float = DEFAULT_MIN_TISSUE, label: str | None = None, suffix: str = ".tiff") -> Slide:
    """Open a slide (a path, or its bytes: written to a private temporary file with ``suffix``), find tissue and
    choose ``patches`` patches at ``magnification``. Every bad input is a one-line ``UserError``."""
    if isinstance(patches, bool) or not isinstance(patches, int) or patches < 1:
        raise InputError(f"patches must be a whole number >= 1, got {patches!r}; pass {setting('patches')} 125")
    if isinstance(magnification, bool) or not isinstance(magnification, int | float) or not (
            math.isfinite(magnification) and 0.1 <= magnification <= 200):
        raise InputError(f"magnification must be between 0.1 and 200, got {magnification!r}; pass "
                         f"{setting('magnification')} 10")
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, int | float) or not (
            math.isfinite(mpp) and 0.01 <= mpp <= 100)):
        raise InputError(f"mpp must be micrometres per pixel between 0.01 and 100, got {mpp!r}; pass e.g. "
                         f"{setting('mpp')} 0.25")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")
    if not isinstance(min_tissue, int | float) or not 0 < min_tissue <= 1:
        raise InputError(f"min_tissue must be in (0, 1], got {min_tissue!r}")
    import openslide

    temp = None
    if isinstance(source, bytes):
        label = label or "the slide data"
        handle_fd, name = tempfile.mkstemp(prefix="medgemma-slide-", suffix=suffix if suffix.startswith(".")
                                           else ".tiff")
        temp = Path(name)
        with os.fdopen(handle_fd, "wb") as out:
            out.write(source)
        path = temp
    else:
        path = Path(source)
        label = label or str(path)
        if not path.is_file():
            raise NotFoundError(f"slide {path} does not exist; check the path")
    try:
        try:
            handle = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise InputError(f"{label} is not a whole-slide image OpenSlide can read; pass {SUPPORTED}") from exc
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise IntegrityError(f"cannot open slide {label}: {exc}; the file is damaged") from exc
        try:
            info, overview, scale = _plan(handle, label, patches, float(magnification), mpp, seed, float(min_tissue))
        except BaseException:
            handle.close()
            raise
    except BaseException:
        temp_cleanup(temp)
        raise
    log.info("%s", info.describe())
    return Slide(handle, info, overview, scale, temp)


def temp_cleanup(temp: Path | None) -> None:
    if temp is not None:
        with contextlib.suppress(OSError):
            temp.unlink()


def _slide_mpp(handle: Any, label: str, mpp: float | None) -> float:
    if mpp is not None:
        return float(mpp)
    props = handle.properties
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            value = float(props[key])
            if math.isfinite(value) and value > 0:
                return value
    with contextlib.suppress(KeyError, TypeError, ValueError):
        power = float(props["openslide.objective-power"])
        if math.isfinite(power) and power > 0:
            return magnification_mpp(power)
    raise InputError(f"{label} records no pixel size (openslide.mpp-x) or objective power; pass {setting('mpp')} "
                     "(micrometres per pixel at full resolution, e.g. 0.25 for a 40x scan)")


def _plan(handle: Any, label: str, n_patches: int, magnification: float, mpp: float | None, seed: int,
          min_tissue: float) -> tuple[SlideInfo, np.ndarray, float]:
    width, height = (int(v) for v in handle.dimensions)
    mpp0 = _slide_mpp(handle, label, mpp)
    target = magnification_mpp(magnification)
    downsamples = [float(d) for d in handle.level_downsamples]
    fine_enough = [lv for lv, d in enumerate(downsamples) if mpp0 * d <= target * (1 + MAGNIFICATION_TOLERANCE)]
    if not fine_enough:
        raise InputError(f"{label} is scanned at {mpp0:.3g} µm/px, coarser than {magnification:g}x "
                         f"({target:.3g} µm/px); pass a lower {setting('magnification')}")
    level = max(fine_enough, key=lambda lv: downsamples[lv])
    cell = PATCH_SIZE * target / mpp0  # level-0 pixels per patch side
    read_side = max(1, round(cell / downsamples[level]))
    if read_side * read_side > MAX_PATCH_READ_PIXELS:
        raise ResourceError(f"{label} has no level near {magnification:g}x: a patch would be {read_side} px square "
                            "at the nearest finer level; add a pyramid to the slide")
    side = max(1, round(cell))
    grid_cols, grid_rows = width // side, height // side
    if grid_cols < 1 or grid_rows < 1:
        raise InputError(f"{label} ({width}x{height} px at {mpp0:.3g} µm/px) is smaller than one {PATCH_SIZE}-px "
                         f"patch at {magnification:g}x; pass a higher {setting('magnification')}")
    map_level = handle.level_count - 1
    map_w, map_h = (int(v) for v in handle.level_dimensions[map_level])
    if map_w * map_h > MAP_MAX_PIXELS:
        raise ResourceError(f"{label}'s smallest level is {map_w}x{map_h} px, too large for a tissue map (limit "
                            f"{MAP_MAX_PIXELS} px); save the slide with a pyramid (vips tiffsave --pyramid --tile)")
    try:
        overview = _on_white(handle.read_region((0, 0), map_level, (map_w, map_h)))
    except Exception as exc:  # noqa: BLE001 - OpenSlide raises OpenSlideError on damaged tiles
        raise IntegrityError(f"cannot read {label}'s lowest-resolution level: {exc}; the file is damaged") from exc
    mask, threshold = tissue_mask(overview)
    scale = width / map_w  # level-0 pixels per map pixel
    cells = []
    for row in range(grid_rows):
        for col in range(grid_cols):
            x, y = col * side, row * side
            x0, x1 = int(x / scale), max(int(x / scale) + 1, int(round((x + side) / scale)))
            y0, y1 = int(y / scale), max(int(y / scale) + 1, int(round((y + side) / scale)))
            fraction = float(mask[y0:y1, x0:x1].mean()) if mask[y0:y1, x0:x1].size else 0.0
            if fraction >= min_tissue:
                cells.append(Patch(row, col, x, y, side, fraction))
    if not cells:
        raise InputError(f"found no tissue on {label}: none of its {grid_rows * grid_cols} patch cells at "
                         f"{magnification:g}x is {min_tissue:.0%} stained tissue (saturation above {threshold:g} of "
                         "255); pass a slide with tissue on it")
    chosen = cells if len(cells) <= n_patches else random.Random(seed).sample(cells, n_patches)
    chosen.sort(key=lambda p: (p.row, p.col))
    info = SlideInfo(width, height, mpp0, magnification, level, mpp0 * downsamples[level], read_side, grid_rows,
                     grid_cols, side, len(cells), threshold, chosen)
    return info, overview, scale
