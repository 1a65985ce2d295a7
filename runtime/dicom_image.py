"""Read one frame of a DICOM file into modality values plus the metadata needed to display it.

This module decodes; ``runtime.images`` turns the result into the 8-bit RGB image the model sees.

Privacy: only the pixels and the elements that describe them are read (``pixel_tags``: group 0028 —
image pixel, palette, modality LUT/rescale, VOI LUT/windowing —, the pixel data elements, and of an
enhanced multi-frame file's functional groups only rescale, windowing and geometry). Patient, study,
institution and date elements are skipped by pydicom's reader, so they cannot reach a prompt, a log line,
an error message or an image written from the result.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from medgemma_gguf.errors import UserError, setting

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"

# pip names for the requirement names pydicom reports in a decoder's missing dependencies.
_PIP_NAMES = {"gdcm": "python-gdcm"}
_PYDICOM_FAILURES = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    EOFError,
    OSError,
    struct.error,
    NotImplementedError,
    RuntimeError,
)
_SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")


@dataclass(frozen=True)
class DicomFrame:
    """One decoded frame.

    ``values`` is float64: (rows, cols) modality values (Rescale Slope/Intercept or Modality LUT
    applied) for grayscale, or (rows, cols, 3) RGB samples for colour images (``bits`` is then their
    bit depth, e.g. 8 or 16). ``window`` is the file's first Window Center/Width, if any.
    """

    values: np.ndarray
    is_rgb: bool
    monochrome1: bool
    window: tuple[float, float] | None
    voi_function: str
    bits: int


# functional group sequences (enhanced multi-frame) and the items of theirs that describe pixels
_FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # Shared-, PerFrameFunctionalGroupsSequence
_FUNCTIONAL_KEEP = {"PixelValueTransformationSequence", "FrameVOILUTSequence", "PixelMeasuresSequence",
                    "PlanePositionSequence", "PlaneOrientationSequence"}


@functools.cache
def pixel_tags() -> tuple[int, ...]:
    """The elements a frame is decoded and displayed from (module docstring); nothing that names a person."""
    from pydicom.datadict import DicomDictionary

    group_0028 = [tag for tag, entry in DicomDictionary.items() if tag >> 16 == 0x0028 and entry[3] == ""]
    pixel_data = [tag for tag in DicomDictionary if tag >> 16 == 0x7FE0]
    return tuple(sorted({*group_0028, *pixel_data, *_FUNCTIONAL_GROUPS}))


def _drop_non_pixel_items(ds: Any) -> None:
    """Of the functional groups, keep only the sequences about pixels and geometry (dates, ids elsewhere)."""
    for tag in _FUNCTIONAL_GROUPS:
        if tag not in ds:
            continue
        for item in ds[tag].value:
            for element in list(item):
                if element.keyword not in _FUNCTIONAL_KEEP:
                    del item[element.tag]


def check_pixel_count(subject: str, width: int, height: int, max_pixels: int) -> None:
    """The decompression-bomb guard for a DICOM frame or a picture (``subject``: "DICOM file X", "image X"),
    from the header's width and height, before any pixel is decoded."""
    if width * height > max_pixels:
        raise UserError(
            f"{subject} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels} "
            f"(decompression-bomb guard); downscale it or raise {setting('max_image_pixels')}"
        )


def check_frame(subject: str, frame: int, n_frames: int) -> None:
    """Refuse a frame number the DICOM file or multi-frame picture ``subject`` does not have."""
    if not 0 <= frame < n_frames:
        raise UserError(
            f"frame {frame} is out of range for {subject}, which has {n_frames} frame(s); "
            f"pass frame between 0 and {n_frames - 1}"
        )


def has_dicom_magic(head: bytes) -> bool:
    """True when ``head`` (the first 132+ bytes of a file) carries the DICOM Part 10 'DICM' marker."""
    return head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def read_dicom_frame(data: bytes, label: str, *, frame: int, max_pixels: int, force: bool) -> DicomFrame:
    """Decode frame ``frame`` of the DICOM file in ``data``; every failure is a one-line ``UserError``."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    # pydicom parses elements lazily: a damaged value fails wherever it is first accessed
    try:
        return _read_dicom_frame(data, label, frame=frame, max_pixels=max_pixels, force=force)
    except (*_PYDICOM_FAILURES, BytesLengthException, InvalidDicomError) as exc:
        raise UserError(
            f"cannot read DICOM file {label}: {_short(exc)}; the file is corrupt or truncated — re-export it"
        ) from exc


def _read_dicom_frame(data: bytes, label: str, *, frame: int, max_pixels: int, force: bool) -> DicomFrame:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force, specific_tags=list(pixel_tags()))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"cannot read DICOM file {label}: {_short(exc)}; the file is corrupt or truncated — re-export it"
        ) from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UserError(f"DICOM file {label} holds no pixel data (not an image); pass an image DICOM file")
    _drop_non_pixel_items(ds)
    _ensure_transfer_syntax(ds)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows == 0 or cols == 0:
        raise UserError(f"DICOM file {label} has a zero-size image ({rows}x{cols}); pass a file with pixels")
    check_pixel_count(f"DICOM file {label}", cols, rows, max_pixels)
    check_frame(f"DICOM file {label}", frame, int(ds.get("NumberOfFrames", 1) or 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise UserError(
            f"DICOM file {label} has Photometric Interpretation {photometric}, which is not supported; "
            f"convert it to one of {', '.join(_SUPPORTED_PHOTOMETRIC)}"
        )
    _check_decoder(ds, label)
    pixels = _decode(ds, label, frame)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)

    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, ds)
        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return DicomFrame(rgb.astype(np.float64), True, False, None, "LINEAR", lut_bits)
    if pixels.ndim == 3:  # RGB / YBR (pydicom converts YBR to RGB by default)
        return DicomFrame(pixels.astype(np.float64), True, False, None, "LINEAR", bits)

    voi_function = _frame_attr(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR"
    return DicomFrame(
        values=_modality_values(ds, pixels, frame),
        is_rgb=False,
        monochrome1=photometric == "MONOCHROME1",
        window=_file_window(ds, frame),
        voi_function=str(voi_function).strip().upper(),
        bits=bits,
    )


def _decode(ds: Any, label: str, frame: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        return np.asarray(pixel_array(ds, index=frame))
    except (ValueError, AttributeError, KeyError, TypeError, OSError, RuntimeError, NotImplementedError) as exc:
        raise UserError(
            f"cannot decode the pixels of DICOM file {label}: {_short(exc)}; the file is corrupt or truncated "
            "— re-export it"
        ) from exc


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files read with ``force`` may lack file meta: infer the transfer syntax from how they were read."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def _check_decoder(ds: Any, label: str) -> None:
    check_decoder(ds.file_meta.TransferSyntaxUID, label)


def check_decoder(syntax: Any, label: str) -> None:
    """Raise a UserError naming the package to install when no plugin can decode transfer syntax ``syntax``."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    syntax = UID(str(syntax)) if syntax else UID("1.2.840.10008.1.2")  # no file meta: implicit VR little endian
    if syntax.is_transfer_syntax and not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise UserError(
            f"DICOM file {label} uses transfer syntax {syntax} ({getattr(syntax, 'name', 'unknown')}), which "
            "pydicom cannot decode; convert the file to an uncompressed transfer syntax (e.g. with dcmdjpeg)"
        ) from exc
    if decoder.is_available:
        return
    options = [_pip_command(requirement) for requirement in decoder.missing_dependencies]
    raise UserError(
        f"DICOM file {label} is compressed with {syntax.name} and no decoder for it is installed; "
        f"install one: {' or '.join(options)}"
    )


def _pip_command(requirement: str) -> str:
    """'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1' -> 'pip install pylibjpeg pylibjpeg-libjpeg'."""
    _, _, needs = requirement.partition(" - requires ")
    names = []
    for part in (needs or requirement).split(" and "):
        name = part.strip().split(">")[0].split("=")[0].split("<")[0].strip()
        if name and name != "numpy":
            names.append(_PIP_NAMES.get(name, name))
    return "pip install " + " ".join(names)


def _frame_attr(ds: Any, frame: int, sequence: str, keyword: str) -> Any:
    """An attribute from the frame's functional group (enhanced multi-frame), the shared group, or the top level."""
    for group_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(group_name)
        if groups is None or len(groups) <= index:
            continue
        items = groups[index].get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def _first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _modality_values(ds: Any, pixels: np.ndarray, frame: int) -> np.ndarray:
    """Stored values -> modality values: Modality LUT Sequence if present, else Rescale Slope/Intercept."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    slope = _first_float(_frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first_float(_frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
    values = pixels.astype(np.float64)
    return values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)


def _file_window(ds: Any, frame: int) -> tuple[float, float] | None:
    """The first Window Center/Width pair in the file, or None (also when the width is below 1)."""
    center = _first_float(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_float(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None or not width >= 1:
        return None
    return center, width


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
