"""CT and MRI volumes (a DICOM series in a folder or a zip, or a NIfTI file) turned into the slice images
MedGemma 1.5 was shown, as Google's CT notebook prepares them.

Reference: Google-Health/medgemma ``notebooks/high_dimensional_ct_hugging_face.ipynb`` (read at commit
d89262cd). What it does and what this module does:

* Order. The notebook sorts instances by ``InstanceNumber``. Here slices are sorted by their position along
  the slice normal, ``dot(cross(row, col), ImagePositionPatient)`` with ``(row, col) =
  ImageOrientationPatient`` — InstanceNumber order is the scanner's choice and not always spatial — ascending
  (feet to head for axial slices); without positions, by ``InstanceNumber``; a warning says which. Duplicate
  positions keep their first slice; gaps (a step over 1.5x the median: missing slices) and uneven spacing
  (steps differing by over 10 %) are warned about, and the slices are used in position order.
* Sampling. ``MAX_SLICE = 85``; a series with more slices is sampled as the notebook does,
  ``[round(i / N * (n - 1)) for i in 1..N]`` (``sample_indices``; the first slice is never taken, the last
  always). Sampling happens on the headers, so only the chosen slices are decoded, one at a time.
* Hounsfield units. ``stored * RescaleSlope + RescaleIntercept`` in float64 (the notebook's
  ``pydicom.pixels.apply_rescale``), never cast back to the stored type (Google's serving code does, which
  breaks unsigned data).
* Windows (CT). Three windows, one per channel, quoted from the notebook:
  ``window_clips = [(-1024, 1024), (-135, 215), (0, 80)]`` — R wide (air to bone), G soft tissue, B brain —
  each ``clip -> float32 -> (x - lo) / (hi - lo) * 255 -> round -> uint8`` (``ct_to_rgb``). ``windows``
  replaces them (``--windows LO:HI,LO:HI,LO:HI``). Google's serving container uses G = 135..215 instead (a
  typo for -135); the notebook is followed.
* MRI. No Google notebook covers MRI. Google's serving code (``python/serving``,
  ``_process_buffered_mri_volume``) maps the whole volume's minimum and maximum to 0..255
  (``round((x - min) / (max - min) * 255)``, a constant volume to 255) and repeats the grey level in R, G and B;
  that is done here, with the minimum and maximum taken over every slice of the series (one decoded at a time).
* Size. The notebook keeps slices at their native size (usually 512x512) and lets the processor resize them
  to 896x896. Here a slice is zero-padded to a centred square first (Google's serving code: "method
  performed in training"; the extra pixel goes bottom/right; square slices are unchanged) and resized to the
  model's size with Pillow's bilinear filter, as the HF processor's PIL backend resizes, so llama.cpp and
  transformers see the same pixels. The notebook sends JPEG (quality 75); the pixels here are lossless.
* Prompt layout (``volume_items``): the notebook's user content is ``[instruction text, (image,
  "SLICE 1"), (image, "SLICE 2"), ..., query text]`` — each label after its image, numbered from 1, no
  system prompt. The chat template trims each text, so the query's leading "\\n\\n" disappears.

NIfTI (``.nii``, ``.nii.gz``) is read with nibabel through its array proxy, one slice at a time: the slice
axis is the array axis nibabel's ``io_orientation`` maps to the superior-inferior world axis, slices run
inferior to superior, and each is turned to the radiological display DICOM axial images use (row 0
anterior, column 0 the patient's right). NIfTI has no modality: the caller says CT or MR.

Privacy: only the tags needed for geometry, grouping and pixels are read (``specific_tags``; pixels through
``pydicom.pixels.pixel_array``, which reads the image module only); nothing from a file reaches a log line
but counts, sizes, positions and the modality.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgemma_gguf.errors import InputError, IntegrityError, NotFoundError, ResourceError, UserError, setting
from medgemma_gguf.runtime.dicom_image import check_decoder, has_dicom_magic
from medgemma_gguf.runtime.sources import Archive, walk_files

log = logging.getLogger(__name__)

DEFAULT_SLICES = 85
CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
MODALITIES = ("CT", "MR")
MAX_SLICES_IN_VOLUME = 20_000
DEFAULT_MAX_SLICE_PIXELS = 4096 * 4096
GAP_FACTOR = 1.5
SPACING_TOLERANCE = 0.10

_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
_MULTIFRAME = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT", "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted "
               "Enhanced CT", "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR", "1.2.840.10008.5.1.4.1.1.4.4":
               "Legacy Converted Enhanced MR"}
_HEADER_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
                "PhotometricInterpretation", "SamplesPerPixel", "ImageType", "PixelSpacing"]


# --- pixel maths ----------------------------------------------------------------------------------------


def sample_indices(n: int, max_slices: int = DEFAULT_SLICES) -> list[int]:
    """The notebook's uniform sampling: all ``n`` slices if ``n <= max_slices``, else
    ``[int(round(i / max_slices * (n - 1))) for i in range(1, max_slices + 1)]``."""
    if n < 1:
        raise InputError("the volume has no slices")
    if max_slices < 1:
        raise InputError(f"slices must be >= 1, got {max_slices}; pass {setting('volume_slices')} 85")
    if n <= max_slices:
        return list(range(n))
    return [int(round(i / max_slices * (n - 1))) for i in range(1, max_slices + 1)]


def check_windows(windows: Any) -> tuple[tuple[float, float], ...]:
    """Three (low, high) HU pairs with low < high, as floats; InputError otherwise."""
    ok = isinstance(windows, list | tuple) and len(windows) == 3 and all(
        isinstance(w, list | tuple) and len(w) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in w) for w in windows)
    if not ok or not all(w[0] < w[1] for w in windows):
        raise InputError(f"windows must be three (low, high) HU pairs with low < high, one per R, G, B channel; got "
                         f"{windows!r}; pass e.g. {setting('windows')} -1024:1024,-135:215,0:80")
    return tuple((float(lo), float(hi)) for lo, hi in windows)


def parse_windows(text: str) -> tuple[tuple[float, float], ...]:
    """'LO:HI,LO:HI,LO:HI' -> three windows (R, G, B)."""
    try:
        pairs = [tuple(float(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        pairs = []
    return check_windows(pairs)


def ct_to_rgb(hu: np.ndarray, windows: Sequence[tuple[float, float]] = CT_WINDOWS) -> np.ndarray:
    """HU (2-D) -> uint8 RGB, one window per channel, computed as the notebook's ``norm`` computes it."""
    hu = np.asarray(hu, dtype=np.float64)
    channels = []
    for lo, hi in windows:
        x = np.clip(hu, lo, hi).astype(np.float32)
        x -= np.float32(lo)
        x /= np.float32(hi - lo)
        x *= np.float32(255.0)
        channels.append(x)
    return np.round(np.stack(channels, axis=-1), 0).astype(np.uint8)


def mr_to_rgb(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values (2-D) -> uint8 grey in R, G and B: ``round((x - lo) / (hi - lo) * 255)``; 255 when ``hi == lo``."""
    x = np.asarray(values, dtype=np.float64)
    grey = np.full(x.shape, 255, np.uint8) if hi <= lo else np.round(
        np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def square_model_image(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """Zero-pad to a centred square (extra pixel bottom/right) and resize to ``image_size`` (Pillow bilinear)."""
    height, width = rgb.shape[:2]
    side = max(height, width)
    if height != width:
        padded = np.zeros((side, side, 3), np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        padded[top:top + height, left:left + width] = rgb
        rgb = padded
    if side == image_size:
        return np.ascontiguousarray(rgb)
    img = Image.fromarray(np.ascontiguousarray(rgb)).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


# --- the volume -------------------------------------------------------------------------------------------


@dataclass
class VolumeInfo:
    """What was read: shown to the user so they know what the model saw (no identifiers)."""

    kind: str  # "DICOM series" or "NIfTI"
    modality: str
    n_slices: int
    indices: list[int]
    rows: int
    columns: int
    plane: str = "unknown"
    spacing_mm: float | None = None
    order: str = "position along the slice normal"
    windows: tuple[tuple[float, float], ...] | None = None
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        spacing = f", {self.spacing_mm:.3g} mm apart" if self.spacing_mm else ""
        how = ("all" if len(self.indices) == self.n_slices else
               f"{len(self.indices)} sampled uniformly (slice {self.indices[0] + 1} to {self.indices[-1] + 1})")
        mapping = ("windows " + ", ".join(f"{lo:g}..{hi:g}" for lo, hi in self.windows) + " HU as R, G, B"
                   if self.windows else "volume min-max to grey")
        return (f"{self.kind}: {self.modality}, {self.n_slices} {self.plane} slices of {self.columns}x{self.rows}"
                f"{spacing}, ordered by {self.order}; {how}; {mapping}")


class Volume:
    """An opened volume: geometry read, slices chosen, no pixel decoded yet. ``images`` decodes one at a time."""

    def __init__(self, info: VolumeInfo, reader: _SliceReader, windows: tuple[tuple[float, float], ...]):
        self.info = info
        self._reader = reader
        self._windows = windows

    def __len__(self) -> int:
        return len(self.info.indices)

    def images(self, image_size: int) -> Iterator[np.ndarray]:
        """The chosen slices as uint8 [image_size, image_size, 3], in order; one slice decoded at a time."""
        if self.info.modality == "CT":
            for index in self.info.indices:
                yield square_model_image(ct_to_rgb(self._reader.values(index), self._windows), image_size)
            return
        lo, hi = math.inf, -math.inf
        for index in range(self.info.n_slices):  # Google's MR rule needs the whole volume's range
            values = self._reader.values(index)
            lo, hi = min(lo, float(np.nanmin(values))), max(hi, float(np.nanmax(values)))
        for index in self.info.indices:
            yield square_model_image(mr_to_rgb(self._reader.values(index), lo, hi), image_size)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SliceReader:
    def values(self, index: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def open_volume(source: Path | bytes, *, label: str | None = None, slices: int = DEFAULT_SLICES,
                windows: Sequence[tuple[float, float]] | None = None, modality: str | None = None,
                series: str | None = None, max_pixels: int = DEFAULT_MAX_SLICE_PIXELS,
                allowed_roots: Sequence[Path] = ()) -> Volume:
    """Open a DICOM series (a folder, a zip file or zip bytes) or a NIfTI file (path or bytes).

    ``slices``: how many to sample (the notebook's 85). ``windows``: three (low, high) HU pairs for CT
    (default ``CT_WINDOWS``). ``modality``: "CT" or "MR", required for NIfTI (DICOM says it; a different
    value is refused). ``series``: the SeriesInstanceUID to use when a folder holds several. Every bad input
    raises a one-line ``UserError`` before any pixel is decoded.
    """
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise InputError(f"slices must be a whole number >= 1, got {slices!r}; pass {setting('volume_slices')} 85")
    windows = CT_WINDOWS if windows is None else check_windows(windows)
    if modality is not None:
        modality = str(modality).upper()
        if modality not in MODALITIES:
            raise InputError(f"modality must be CT or MR, got {modality!r}; pass {setting('modality')} CT")
    if isinstance(source, bytes):
        label = label or "the volume data"
        if source[:4] == b"PK\x03\x04":
            return _open_dicom(Archive(source, label), label, slices, windows, modality, series, max_pixels)
        if source[:2] == b"\x1f\x8b" or source[344:348] in (b"n+1\x00", b"n+2\x00"):
            return _open_nifti_bytes(source, label, slices, windows, modality, max_pixels)
        raise InputError(f"{label} is neither a zip of a DICOM series nor a NIfTI file; zip the series folder")
    path = Path(source)
    label = label or str(path)
    if path.is_dir():
        files = walk_files(path, allowed_roots=allowed_roots)
        return _open_dicom(_Folder(files), label, slices, windows, modality, series, max_pixels)
    if not path.is_file():
        raise NotFoundError(f"volume {path} does not exist; pass a series folder, a zip or a .nii/.nii.gz file")
    with open(path, "rb") as handle:
        head = handle.read(352)
    if head[:4] == b"PK\x03\x04":
        return _open_dicom(Archive(path, label), label, slices, windows, modality, series, max_pixels)
    if path.name.lower().endswith((".nii", ".nii.gz")) or head[:2] == b"\x1f\x8b" or head[344:348] in (
            b"n+1\x00", b"n+2\x00"):
        return _open_nifti(path, label, slices, windows, modality, max_pixels)
    if has_dicom_magic(head):
        raise InputError(f"{label} is one DICOM file; pass the folder (or a zip) of the whole series, or send a "
                         f"single slice as an image ({setting('image')})")
    raise InputError(f"{label} is not a DICOM series folder, a zip or a NIfTI file; pass one of those")


# --- DICOM ------------------------------------------------------------------------------------------------


class _Folder:
    def __init__(self, files: list[Path]):
        self.files = {str(p): p for p in files}

    def names(self) -> list[str]:
        return list(self.files)

    def open(self, name: str):
        return open(self.files[name], "rb")

    def read(self, name: str) -> bytes:
        return self.files[name].read_bytes()

    def close(self) -> None:
        pass


@dataclass
class _Header:
    name: str
    sop_class: str
    modality: str
    series: str
    position: list[float] | None
    orientation: list[float] | None
    instance: int | None
    rows: int
    columns: int
    frames: int
    slope: float
    intercept: float
    photometric: str
    samples: int
    localizer: bool
    syntax: Any


def _float_list(value: Any, n: int) -> list[float] | None:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _read_header(files: Any, name: str) -> _Header | str | None:
    """The header of one file; a SOP class name for non-image DICOM; None for a file that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    try:
        with files.open(name) as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    sop = str(ds.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or "")
    frames = int(_number(ds.get("NumberOfFrames", 1), 1))
    if sop in _MULTIFRAME or frames > 1:
        return "multi-frame " + _MULTIFRAME.get(sop, "image")
    if sop not in (_CT_IMAGE, _MR_IMAGE):
        return UID(sop).name if sop else "unknown DICOM object"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    modality = str(ds.get("Modality", "") or "").upper() or ("CT" if sop == _CT_IMAGE else "MR")
    instance = ds.get("InstanceNumber")
    return _Header(
        name=name, sop_class=sop, modality=modality, series=str(ds.get("SeriesInstanceUID", "") or "(none)"),
        position=_float_list(ds.get("ImagePositionPatient"), 3),
        orientation=_float_list(ds.get("ImageOrientationPatient"), 6),
        instance=int(_number(instance, 0)) if instance not in (None, "") else None,
        rows=int(_number(ds.get("Rows", 0), 0)), columns=int(_number(ds.get("Columns", 0), 0)), frames=frames,
        slope=_number(ds.get("RescaleSlope", 1.0), 1.0), intercept=_number(ds.get("RescaleIntercept", 0.0), 0.0),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper(),
        samples=int(_number(ds.get("SamplesPerPixel", 1), 1)), localizer="LOCALIZER" in image_type,
        syntax=ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None)


def _open_dicom(files: Any, label: str, slices: int, windows: tuple[tuple[float, float], ...],
                modality: str | None, series: str | None, max_pixels: int) -> Volume:
    try:
        return _open_dicom_series(files, label, slices, windows, modality, series, max_pixels)
    except BaseException:
        files.close()
        raise


def _open_dicom_series(files: Any, label: str, slices: int, windows: tuple[tuple[float, float], ...],
                       modality: str | None, series: str | None, max_pixels: int) -> Volume:
    names = files.names()
    if len(names) > MAX_SLICES_IN_VOLUME:
        raise ResourceError(f"{label} holds {len(names)} files, more than {MAX_SLICES_IN_VOLUME}; pass one series")
    by_series: dict[str, list[_Header]] = {}
    other: Counter[str] = Counter()
    not_dicom = 0
    for name in names:
        header = _read_header(files, name)
        if header is None:
            not_dicom += 1
        elif isinstance(header, str):
            other[header] += 1
        else:
            by_series.setdefault(header.series, []).append(header)
    warnings: list[str] = []
    localizers = {uid: sum(h.localizer for h in hs) for uid, hs in by_series.items()}
    by_series = {uid: [h for h in hs if not h.localizer] for uid, hs in by_series.items()}
    by_series = {uid: hs for uid, hs in by_series.items() if hs}
    found = ", ".join(f"{kind} ({count})" for kind, count in sorted(other.items()))
    if not by_series:
        if any(kind.startswith("multi-frame") for kind in other):
            raise InputError(f"{label} holds only multi-frame images ({found}), which are not supported; export the "
                             "series as single-frame slices or convert it to NIfTI (e.g. dcm2niix)")
        if other:
            raise InputError(f"{label} holds no CT or MR image slices, only {found}; pass the image series")
        raise InputError(f"{label} holds no DICOM files; pass the folder (or zip) of a CT or MR series")
    if series is not None:
        if series not in by_series:
            raise NotFoundError(f"series {series} is not in {label}; it holds {_list_series(by_series)}")
        chosen = series
    elif len(by_series) > 1:
        raise InputError(f"{label} holds {len(by_series)} image series: {_list_series(by_series)}; pass one series "
                         f"(its own folder, or choose it with {setting('series')} UID)")
    else:
        chosen = next(iter(by_series))
    headers = by_series[chosen]
    if other:
        warnings.append(f"ignored {sum(other.values())} other DICOM object(s): {found}")
    if not_dicom:
        warnings.append(f"ignored {not_dicom} file(s) that are not DICOM")
    if localizers.get(chosen):
        warnings.append(f"left out {localizers[chosen]} localizer image(s)")
    kinds = {h.modality for h in headers}
    if len(kinds) > 1:
        raise InputError(f"series {chosen} mixes modalities ({', '.join(sorted(kinds))}); pass one series")
    series_modality = kinds.pop()
    if series_modality not in MODALITIES:
        series_modality = "CT" if headers[0].sop_class == _CT_IMAGE else "MR"
    if modality is not None and modality != series_modality:
        raise InputError(f"{label} is {series_modality} but {modality} was asked for; drop {setting('modality')}")
    sizes = {(h.rows, h.columns) for h in headers}
    if len(sizes) > 1:
        shown = ", ".join(f"{c}x{r}" for r, c in sorted(sizes))
        raise InputError(f"the slices of {label} have different sizes ({shown}); pass one series of equal slices")
    rows, columns = sizes.pop()
    if rows < 1 or columns < 1:
        raise IntegrityError(f"the slices of {label} have no pixels (Rows/Columns missing); re-export the series")
    if rows * columns > max_pixels:
        raise ResourceError(f"the slices of {label} are {columns}x{rows} = {rows * columns} pixels, more than the "
                            f"limit of {max_pixels}; downsample the series first")
    bad = {h.photometric for h in headers if h.photometric not in ("MONOCHROME1", "MONOCHROME2") or h.samples != 1}
    if bad:
        raise InputError(f"the slices of {label} are {', '.join(sorted(bad))}, not greyscale CT/MR; pass a greyscale "
                         "series")
    ordered, order, spacing, plane = _sort_slices(headers, warnings)
    indices = sample_indices(len(ordered), slices)
    for index in indices:  # every chosen slice must be decodable before the first is decoded
        check_decoder(ordered[index].syntax, label)
    info = VolumeInfo("DICOM series", series_modality, len(ordered), indices, rows, columns, plane, spacing, order,
                      windows if series_modality == "CT" else None, warnings)
    for warning in warnings:
        log.warning("volume: %s", warning)
    return Volume(info, _DicomReader(files, ordered, label), windows)


def _list_series(by_series: dict[str, list[_Header]]) -> str:
    return "; ".join(f"{uid} ({hs[0].modality}, {len(hs)} slices)" for uid, hs in sorted(
        by_series.items(), key=lambda item: -len(item[1])))


def _plane(normal: np.ndarray) -> str:
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _sort_slices(headers: list[_Header], warnings: list[str]) -> tuple[list[_Header], str, float | None, str]:
    """Slices in position order along the normal (or by InstanceNumber), duplicates dropped, gaps warned."""
    if all(h.position is not None and h.orientation is not None for h in headers):
        iop = np.array(headers[0].orientation)
        if any(not np.allclose(np.asarray(h.orientation, dtype=float), iop, atol=1e-3) for h in headers):
            warnings.append("the slices are not all oriented alike (ImageOrientationPatient differs)")
        normal = np.cross(iop[:3], iop[3:])
        plane = _plane(normal)
        if plane != "axial":
            warnings.append(f"the slices are {plane}; MedGemma was trained on axial CT/MR slices")
        def along(h: _Header) -> float:
            return float(np.dot(normal, np.asarray(h.position, dtype=float)))

        keyed = sorted(headers, key=lambda h: (along(h), h.instance or 0))
        positions = [along(h) for h in keyed]
        kept, kept_positions = [keyed[0]], [positions[0]]
        for header, position in zip(keyed[1:], positions[1:], strict=True):
            if abs(position - kept_positions[-1]) < 1e-3:
                continue
            kept.append(header)
            kept_positions.append(position)
        if len(kept) < len(keyed):
            warnings.append(f"dropped {len(keyed) - len(kept)} slice(s) at a position already taken")
        return kept, "position along the slice normal", _check_spacing(np.diff(kept_positions), warnings), plane
    if all(h.instance is not None for h in headers):
        warnings.append("the slices have no ImagePositionPatient/ImageOrientationPatient; ordered by InstanceNumber")
        ordered = sorted(headers, key=lambda h: h.instance or 0)
        numbers = [h.instance or 0 for h in ordered]
        missing = (numbers[-1] - numbers[0] + 1) - len(set(numbers))
        if missing > 0:
            warnings.append(f"{missing} InstanceNumber(s) missing between {numbers[0]} and {numbers[-1]}")
        return ordered, "InstanceNumber", None, "unknown"
    warnings.append("the slices carry neither positions nor InstanceNumbers; kept in file-name order")
    return sorted(headers, key=lambda h: h.name), "file name", None, "unknown"


def _check_spacing(steps: np.ndarray, warnings: list[str]) -> float | None:
    if steps.size == 0:
        return None
    median = float(np.median(steps))
    if steps.max() > GAP_FACTOR * median:
        missing = int(sum(round(step / median) - 1 for step in steps if step > GAP_FACTOR * median))
        warnings.append(f"about {missing} slice(s) missing: gaps of up to {steps.max():.3g} mm in a series spaced "
                        f"{median:.3g} mm; continuing in position order")
    elif steps.max() - steps.min() > SPACING_TOLERANCE * median:
        warnings.append(f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm); continuing in position "
                        "order")
    return median


class _DicomReader(_SliceReader):
    def __init__(self, files: Any, ordered: list[_Header], label: str):
        self._files = files
        self._ordered = ordered
        self._label = label

    def values(self, index: int) -> np.ndarray:
        """HU (CT) or rescaled values (MR) of one slice, float64."""
        from pydicom.pixels import pixel_array

        header = self._ordered[index]
        data = self._files.read(header.name)
        try:
            stored = pixel_array(io.BytesIO(data))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many kinds on damaged data
            raise IntegrityError(f"cannot decode slice {index + 1} of {self._label}: {_short(exc)}; the file is "
                                 "damaged — re-export the series") from exc
        if stored.shape != (header.rows, header.columns):
            raise IntegrityError(f"slice {index + 1} of {self._label} decodes to {stored.shape}, not "
                                 f"{header.rows}x{header.columns}; re-export the series")
        return stored.astype(np.float64) * header.slope + header.intercept  # HU; MONOCHROME1 only changes display

    def close(self) -> None:
        self._files.close()


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --- NIfTI ------------------------------------------------------------------------------------------------


def _open_nifti_bytes(data: bytes, label: str, slices: int, windows: tuple[tuple[float, float], ...],
                      modality: str | None, max_pixels: int) -> Volume:
    """Bytes go to a private temporary file, so nibabel's proxy still reads one slice at a time."""
    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    handle, name = tempfile.mkstemp(prefix="medgemma-volume-", suffix=suffix)
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        volume = _open_nifti(path, label, slices, windows, modality, max_pixels)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    volume._reader.temp = path  # type: ignore[attr-defined]
    return volume


def _open_nifti(path: Path, label: str, slices: int, windows: tuple[tuple[float, float], ...],
                modality: str | None, max_pixels: int) -> Volume:
    import nibabel as nib
    from nibabel.orientations import io_orientation

    if modality is None:
        raise InputError(f"{label} is NIfTI, which does not record the modality; pass {setting('modality')} CT or "
                         "MR")
    try:
        img: Any = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = img.affine
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on damaged headers
        raise InputError(f"cannot read {label} as NIfTI: {_short(exc)}; pass a .nii or .nii.gz volume") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"{label} has shape {shape}; pass one 3-D volume (not a time series or a single image)")
    ornt = io_orientation(affine)
    world = [int(axis) if not math.isnan(axis) else -1 for axis in ornt[:, 0]]
    if sorted(world) != [0, 1, 2]:
        raise InputError(f"{label} has an affine without a clear orientation; fix its sform/qform")
    slice_axis, x_axis, y_axis = world.index(2), world.index(0), world.index(1)
    n = shape[slice_axis]
    rows, columns = shape[y_axis], shape[x_axis]
    if rows * columns > max_pixels:
        raise ResourceError(f"the slices of {label} are {columns}x{rows} = {rows * columns} pixels, more than the "
                            f"limit of {max_pixels}; downsample the volume first")
    if n > MAX_SLICES_IN_VOLUME:
        raise ResourceError(f"{label} has {n} slices, more than {MAX_SLICES_IN_VOLUME}; pass a smaller volume")
    warnings: list[str] = []
    zooms = img.header.get_zooms()
    spacing = float(zooms[slice_axis]) if len(zooms) > slice_axis else None
    indices = sample_indices(n, slices)
    info = VolumeInfo("NIfTI", modality, n, indices, rows, columns, "axial", spacing, "the superior axis",
                      windows if modality == "CT" else None, warnings)
    reader = _NiftiReader(img, label, slice_axis, x_axis, y_axis, ornt)
    return Volume(info, reader, windows)


class _NiftiReader(_SliceReader):
    temp: Path | None = None

    def __init__(self, img: Any, label: str, slice_axis: int, x_axis: int, y_axis: int, ornt: np.ndarray):
        self._img = img
        self._label = label
        self._axes = (slice_axis, x_axis, y_axis)
        self._ornt = ornt
        self._n = int(img.shape[slice_axis])

    def values(self, index: int) -> np.ndarray:
        """Slice ``index`` counted inferior to superior, as a radiological display (row 0 anterior, column 0 right)."""
        slice_axis, x_axis, y_axis = self._axes
        k = index if self._ornt[slice_axis, 1] > 0 else self._n - 1 - index
        key: list[Any] = [slice(None)] * len(self._img.shape)
        key[slice_axis] = k
        for extra in range(3, len(key)):
            key[extra] = 0
        try:
            plane = np.asarray(self._img.dataobj[tuple(key)], dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - truncated or damaged data
            raise IntegrityError(f"cannot read slice {index + 1} of {self._label}: {_short(exc)}; the file is "
                                 "damaged — re-export it") from exc
        remaining = [axis for axis in range(3) if axis != slice_axis]
        plane = np.transpose(plane, (remaining.index(y_axis), remaining.index(x_axis)))
        if self._ornt[y_axis, 1] > 0:  # index grows toward anterior: flip so row 0 is the most anterior
            plane = plane[::-1, :]
        if self._ornt[x_axis, 1] > 0:  # index grows toward the patient's right: flip so column 0 is the right
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def close(self) -> None:
        self._img = None
        if self.temp is not None:
            with contextlib.suppress(OSError):
                self.temp.unlink()
