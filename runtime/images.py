"""Turn an image file the user gives into the 8-bit RGB image MedGemma's vision tower sees.

Inputs: a path, raw bytes, or a base64 ``data:`` URI. Formats: PNG, JPEG, WebP, BMP, TIFF, GIF (Pillow)
and DICOM (pydicom). Every bad input raises ``UserError`` with one line naming the input and the fix.

Mapping to 8 bits (``window_to_uint8``), applied to grayscale data that is not already 8-bit and to
every DICOM grayscale image:

* no window: min–max of the image, ``y = (x - min) / (max - min) * 255`` (a constant image gives 0);
* a window ``(center c, width w)``: DICOM PS3.3 C.11.2.1.2 "LINEAR" function, ``x <= c - 0.5 - (w-1)/2
  -> 0``, ``x > c - 0.5 + (w-1)/2 -> 255``, else ``y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255``
  (``w >= 1``). DICOM files may ask for "LINEAR_EXACT" (``y = ((x - c) / w + 0.5) * 255``) or
  "SIGMOID" (``y = 255 / (1 + exp(-4 (x - c) / w))``); an unknown function is treated as LINEAR;
* ``y`` is clipped to [0, 255] and rounded to nearest, halves up. Non-finite values count as the minimum.
  Each ``y`` is computed as one division of exact products (``(x - lo) * 255 / (hi - lo)`` etc.), so
  integer data whose exact result ends in .5 does round up.

Where llama.cpp differs (tools/mtmd, read in llama.cpp's source shipped with llama-cpp-python 0.3.36):
libmtmd decodes files with stb_image, which ignores EXIF orientation, drops alpha (no compositing),
keeps the top 8 bits of 16-bit PNGs (no window) and reads no DICOM; and for Gemma 3 it resizes
any image that is not image_size x image_size with Pillow-style bilinear filtering while *keeping the
aspect ratio* and padding with black (``PAD_CEIL``, pad colour 0), whereas HF's Gemma3ImageProcessor
stretches to a square. Handing libmtmd the output of ``load_image(..., image_size=S)`` (already S x S)
avoids all of these: it then copies the pixels unchanged and both stacks see the same image.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medgemma_gguf.errors import UserError
from medgemma_gguf.runtime.dicom_image import (
    DicomFrame,
    check_frame,
    check_pixel_count,
    has_dicom_magic,
    read_dicom_frame,
)
from medgemma_gguf.runtime.sources import DEFAULT_MAX_FILE_BYTES, read_regular_file

DEFAULT_MAX_PIXELS = 50_000_000
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
DICOM_SUFFIXES = (".dcm", ".dicom")
DATA_URI_MEDIA_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/gif",
        "application/dicom",
        "application/octet-stream",
    }
)
_DICOM_MEDIA_TYPES = frozenset({"application/dicom"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_DATA_URI = re.compile(r"data:(?P<media>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<payload>.*)", re.DOTALL)
_WHITE = 255.0
# What Pillow's parsers and decoders raise on damaged files (found by fuzzing truncated/flipped bytes).
_PIL_FAILURES = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    TypeError,
    KeyError,
    IndexError,
    struct.error,
    ZeroDivisionError,
    OverflowError,
)

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview


def load_image(
    source: ImageSource,
    *,
    image_size: int | None = None,
    window: tuple[float, float] | None = None,
    frame: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    allowed_roots: Sequence[Path] = (),
) -> Image.Image:
    """Load a path or raw bytes as an 8-bit RGB ``PIL.Image`` (resized with ``prepare_for_model`` if
    ``image_size`` is given).

    A path is read with ``runtime.sources.read_regular_file``: a regular file of at most ``max_file_bytes``
    (devices and FIFOs refused without opening them), under ``allowed_roots`` when given.

    Detection is by content: bytes 128..131 == b"DICM" means DICOM; a path ending in .dcm/.dicom without
    that marker is read with pydicom's ``force`` unless Pillow recognises the content; everything else
    goes to Pillow (PNG, JPEG, WebP, BMP, TIFF, GIF only). Conversions, in order:

    * Pillow: frame ``frame`` of a multi-frame file; EXIF orientation applied (``ImageOps.exif_transpose``);
      alpha (RGBA, LA, PA, P with transparency) composited on white, ``out = (c*a + 255*(255-a)) / 255``
      rounded; 8-bit grayscale ("L", "1") kept as is; 16/32-bit integer and float grayscale ("I;16*",
      "I", "F") mapped with ``window_to_uint8`` (min–max unless ``window``); CMYK, YCbCr, P etc. via
      Pillow's ``convert("RGB")``; 16-bit RGB PNGs arrive from Pillow as 8-bit. ICC profiles are ignored.
    * DICOM: frame ``frame`` (error if out of range); Modality LUT or Rescale Slope/Intercept; then the
      user ``window`` if given (always LINEAR), else the file's first Window Center/Width (and VOI LUT Function), else
      min–max; MONOCHROME1 inverted after windowing (``255 - y``); RGB/YBR/PALETTE COLOR samples scaled
      by bit depth ``x * 255 / (2**bits - 1)``. VOI LUT Sequences and Presentation LUTs are ignored.

    ``window`` = (center, width), width >= 1, applies to grayscale images only (8-bit included).
    ``max_pixels`` caps width x height before decoding (decompression bombs); Pillow's own hard limit
    (2 x ``Image.MAX_IMAGE_PIXELS``) still applies above it.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _load_bytes(
            bytes(source),
            "<image bytes>",
            force_dicom=False,
            image_size=image_size,
            window=window,
            frame=frame,
            max_pixels=max_pixels,
        )
    path = Path(os.fspath(source))
    data = read_regular_file(path, what="image", max_bytes=max_file_bytes, allowed_roots=allowed_roots)
    return _load_bytes(
        data,
        str(path),
        force_dicom=path.suffix.lower() in DICOM_SUFFIXES,
        image_size=image_size,
        window=window,
        frame=frame,
        max_pixels=max_pixels,
    )


def load_image_from_data_uri(
    uri: str,
    *,
    image_size: int | None = None,
    window: tuple[float, float] | None = None,
    frame: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load a base64 ``data:<media type>;base64,<payload>`` URI exactly as ``load_image`` loads bytes.

    Accepted media types: ``DATA_URI_MEDIA_TYPES`` (the format is then detected from the content);
    ``application/dicom`` also allows DICOM without the 128-byte preamble.
    """
    match = _DATA_URI.fullmatch(uri.strip()) if isinstance(uri, str) else None
    if match is None:
        raise UserError("image is not a data URI; pass 'data:image/png;base64,<base64 bytes>'")
    media_type = match["media"].strip().lower()
    params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
    if media_type not in DATA_URI_MEDIA_TYPES:
        shown = media_type or "(none)"
        raise UserError(
            f"data URI has media type {shown}, which is not an image type; use one of "
            f"{', '.join(sorted(DATA_URI_MEDIA_TYPES))}"
        )
    label = f"data URI ({media_type})"
    if "base64" not in params:
        raise UserError(f"{label} is not base64-encoded; send 'data:{media_type};base64,<base64 bytes>'")
    payload = "".join(match["payload"].split())
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"{label} holds invalid base64 ({exc}); encode the file bytes with standard base64") from exc
    return _load_bytes(
        data,
        label,
        force_dicom=media_type in _DICOM_MEDIA_TYPES,
        image_size=image_size,
        window=window,
        frame=frame,
        max_pixels=max_pixels,
    )


def prepare_for_model(img: Image.Image, image_size: int) -> Image.Image:
    """Resize to ``image_size`` x ``image_size`` the way HF's Gemma3ImageProcessor does.

    Pillow ``BILINEAR`` on the 8-bit RGB image (antialiased when shrinking), no aspect-ratio
    preservation, no pan-and-scan; an image already at that size is returned unchanged. HF's PIL backend
    (``Gemma3ImageProcessorPil``, what ``Gemma3ImageProcessor`` falls back to without torchvision) resizes
    the same uint8 image with the same Pillow call, so ``(out / 255 - 0.5) / 0.5`` equals its
    ``pixel_values`` up to float32 rounding. HF's torchvision backend resizes with torch's antialiased
    bilinear instead and may differ by a level or so (not measured here). llama.cpp, given an image that is
    not square at its native size, would letterbox it instead (see the module docstring).
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}; pass e.g. 896")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size == (image_size, image_size):
        return img
    return img.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)


def image_to_rgb_array(img: Image.Image) -> np.ndarray:
    """The image as a C-contiguous uint8 array of shape (height, width, 3), e.g. for ``mtmd_bitmap_init``."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def window_to_uint8(
    values: np.ndarray, window: tuple[float, float] | None = None, voi_function: str = "LINEAR"
) -> np.ndarray:
    """Map grayscale values to uint8 with the window/level rules in the module docstring."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, x[finite].min() if finite.any() else 0.0)
    if window is None:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        y = np.zeros_like(x) if hi <= lo else (x - lo) * 255.0 / (hi - lo)
    else:
        center, width = window
        function = voi_function.upper()
        if function == "LINEAR_EXACT":
            y = ((x - center) * 255.0 + 127.5 * width) / width
        elif function == "SIGMOID":
            y = 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700.0, 700.0)))
        else:
            y = _linear_window(x, center, width)
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    low = center - 0.5 - (width - 1.0) / 2.0
    high = center - 0.5 + (width - 1.0) / 2.0
    if width <= 1.0:
        return np.where(x <= low, 0.0, 255.0)
    y = ((x - center + 0.5) * 255.0 + 127.5 * (width - 1.0)) / (width - 1.0)
    return np.where(x <= low, 0.0, np.where(x > high, 255.0, y))


def _check_options(window: tuple[float, float] | None, frame: int, max_pixels: int) -> None:
    if window is not None:
        ok = isinstance(window, tuple | list) and len(window) == 2
        if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in window):
            raise UserError(f"window must be (center, width) numbers, got {window!r}; pass e.g. (40, 400)")
        if window[1] < 1:
            raise UserError(f"window width must be >= 1 (DICOM convention), got {window[1]}; widen the window")
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise UserError(f"frame must be a non-negative integer, got {frame!r}; pass e.g. frame=0")
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise UserError(f"max_pixels must be a positive integer, got {max_pixels!r}; pass e.g. 50000000")


def _load_bytes(
    data: bytes,
    label: str,
    *,
    force_dicom: bool,
    image_size: int | None,
    window: tuple[float, float] | None,
    frame: int,
    max_pixels: int,
) -> Image.Image:
    _check_options(window, frame, max_pixels)
    if window is not None:
        window = (float(window[0]), float(window[1]))
    if not data:
        raise UserError(f"image {label} is empty (0 bytes); pass a non-empty image file")
    is_dicom = has_dicom_magic(data) or (force_dicom and not _pillow_identifies(data))
    if is_dicom:
        dicom = read_dicom_frame(data, label, frame=frame, max_pixels=max_pixels, force=not has_dicom_magic(data))
        img = _dicom_to_rgb(dicom, label, window)
    else:
        img = _pillow_to_rgb(data, label, frame=frame, window=window, max_pixels=max_pixels)
    return img if image_size is None else prepare_for_model(img, image_size)


def _dicom_to_rgb(dicom: DicomFrame, label: str, window: tuple[float, float] | None) -> Image.Image:
    if dicom.is_rgb:
        if window is not None:
            raise UserError(f"window applies to grayscale images only and {label} is colour; drop the window")
        scale = 255.0 / (2.0 ** max(dicom.bits, 1) - 1.0)
        rgb = np.floor(np.clip(dicom.values * scale, 0.0, 255.0) + 0.5).astype(np.uint8)
        return Image.fromarray(rgb)
    if window is not None:
        gray = window_to_uint8(dicom.values, window)
    else:
        gray = window_to_uint8(dicom.values, dicom.window, dicom.voi_function)
    if dicom.monochrome1:
        gray = 255 - gray
    return _gray_to_rgb(gray)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def _pillow_to_rgb(
    data: bytes, label: str, *, frame: int, window: tuple[float, float] | None, max_pixels: int
) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except Image.DecompressionBombError as exc:
        raise UserError(f"image {label} is too large to decode safely ({exc}); downscale it before passing it") from exc
    except UnidentifiedImageError as exc:
        raise UserError(_unidentified_message(data, label)) from exc
    except _PIL_FAILURES as exc:
        raise UserError(f"cannot read image {label}: {exc}; the file is corrupt — re-export it") from exc
    with img:
        try:
            if frame:
                _seek_frame(img, label, frame)
            _check_size(img, label, max_pixels)
            img.load()
            oriented = ImageOps.exif_transpose(img)
        except _PIL_FAILURES as exc:
            raise UserError(
                f"cannot decode image {label}: {exc}; the file is truncated or corrupt — re-export it"
            ) from exc
        return _pil_mode_to_rgb(oriented, label, window)


def _seek_frame(img: Image.Image, label: str, frame: int) -> None:
    check_frame(f"image {label}", frame, getattr(img, "n_frames", 1))
    img.seek(frame)


def _check_size(img: Image.Image, label: str, max_pixels: int) -> None:
    """Refuse empty and oversized images from the header alone, before any pixel is decoded."""
    width, height = img.size
    if width == 0 or height == 0:
        raise UserError(f"image {label} has a zero size ({width}x{height}); pass an image with pixels")
    check_pixel_count(f"image {label}", width, height, max_pixels)


def _pillow_identifies(data: bytes) -> bool:
    """True when Pillow recognises one of ``PILLOW_FORMATS`` in the header (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS):
            return True
    except Exception:  # any failure means "not a Pillow image": the caller tries DICOM instead
        return False


def _unidentified_message(data: bytes, label: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
    except Exception:  # any failure here just means "not an image format Pillow knows"
        fmt = None
    if fmt:
        return f"image {label} is {fmt}, which is not supported; convert it to PNG or JPEG"
    return (
        f"image {label} is not a readable image (not PNG, JPEG, WebP, BMP, TIFF, GIF or DICOM, or corrupt); "
        "pass one of those formats"
    )


def _pil_mode_to_rgb(img: Image.Image, label: str, window: tuple[float, float] | None) -> Image.Image:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("1", "L"):
        gray = np.asarray(img.convert("L"))
        return _gray_to_rgb(gray if window is None else window_to_uint8(gray, window))
    if mode.startswith("I") or mode == "F":
        return _gray_to_rgb(window_to_uint8(np.asarray(img), window))
    if window is not None:
        raise UserError(f"window applies to grayscale images only and {label} is {mode}; drop the window")
    if mode in _ALPHA_MODES:
        return _composite_on_white(img.convert("RGBA"))
    if mode == "RGB":
        return img.copy()
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise UserError(f"image {label} has pixel mode {mode}, which cannot be converted; save it as RGB") from exc


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    pixels = np.asarray(rgba, dtype=np.float64)
    alpha = pixels[:, :, 3:4]
    rgb = (pixels[:, :, :3] * alpha + _WHITE * (255.0 - alpha)) / 255.0
    return Image.fromarray(np.floor(rgb + 0.5).astype(np.uint8))
