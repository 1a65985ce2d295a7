"""runtime.images: every input reaches the model as the documented 8-bit RGB image (images built here)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from imaging_data import new_dataset
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, RLELossless

from medgemma_gguf.errors import UserError
from medgemma_gguf.runtime.images import (
    DEFAULT_MAX_PIXELS,
    image_to_rgb_array,
    load_image,
    load_image_from_data_uri,
    prepare_for_model,
    window_to_uint8,
)

# ---------------------------------------------------------------- builders


def _dicom_dataset(pixels: np.ndarray, photometric: str, bits_stored: int, **attrs: object) -> Dataset:
    ds = new_dataset("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _dicom_bytes(ds: Dataset, *, preamble: bool = True) -> bytes:
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:  # a bare implicit-VR dataset: no preamble, no "DICM", no file meta
        del ds.file_meta
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _pil_bytes(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with an empty IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _gray(img: Image.Image) -> np.ndarray:
    """The single channel of an RGB image whose three channels must be equal."""
    arr = image_to_rgb_array(img)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    return arr[..., 0]


# ---------------------------------------------------------------- DICOM


def test_dicom_monochrome1_rescale_and_file_window_by_hand(tmp_path: Path) -> None:
    # modality x = 2*s - 1024; window (10, 256), first of two values: LINEAR gives y = x + 118 on
    # (-118, 137], 0 below, 255 above; MONOCHROME1 then inverts: out = 255 - y.
    stored = np.array([[512, 540, 400], [700, 453, 580]], dtype=np.uint16)
    ds = _dicom_dataset(
        stored,
        "MONOCHROME1",
        12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=[10, 500],
        WindowWidth=[256, 1000],
    )
    path = tmp_path / "cr.dcm"
    path.write_bytes(_dicom_bytes(ds))
    native = load_image(path)
    assert native.mode == "RGB" and native.size == (3, 2)
    # s=512: x=0 -> y=118 -> 137; s=540: x=56 -> 174 -> 81; s=400: x=-224 -> 0 -> 255
    # s=700: x=376 -> 255 -> 0;   s=453: x=-118 -> 0 -> 255;  s=580: x=136 -> 254 -> 1
    assert _gray(native).tolist() == [[137, 81, 255], [0, 255, 1]]


def test_dicom_square_reaches_model_unresampled(tmp_path: Path) -> None:
    stored = np.array([[512, 540], [400, 580]], dtype=np.uint16)
    ds = _dicom_dataset(
        stored, "MONOCHROME1", 16, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=10, WindowWidth=256
    )
    path = tmp_path / "sq.dcm"
    path.write_bytes(_dicom_bytes(ds))
    assert _gray(load_image(path, image_size=2)).tolist() == [[137, 81], [255, 1]]


def test_dicom_signed_without_window_uses_min_max() -> None:
    # min -1000, max 3000: y = (x + 1000) / 4000 * 255, halves rounded up
    stored = np.array([[-1000, 0], [1000, 3000]], dtype=np.int16)
    ds = _dicom_dataset(stored, "MONOCHROME2", 16)
    assert ds.PixelRepresentation == 1
    assert _gray(load_image(_dicom_bytes(ds))).tolist() == [[0, 64], [128, 255]]


def test_user_window_overrides_file_window() -> None:
    # user window (100.5, 201): y = ((x - 100) / 200 + 0.5) * 255 on (0, 200]
    stored = np.array([[0, 100], [150, 250]], dtype=np.uint16)
    ds = _dicom_dataset(stored, "MONOCHROME2", 16, WindowCenter=1000, WindowWidth=10)
    data = _dicom_bytes(ds)
    assert _gray(load_image(data)).tolist() == [[0, 0], [0, 0]]  # file window: all below 995
    assert _gray(load_image(data, window=(100.5, 201))).tolist() == [[0, 128], [191, 255]]


def test_dicom_rgb_passes_through_and_rle_decodes() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ds = _dicom_dataset(rgb, "RGB", 8)
    assert np.array_equal(image_to_rgb_array(load_image(_dicom_bytes(ds))), rgb)
    ds.compress(RLELossless)
    assert np.array_equal(image_to_rgb_array(load_image(_dicom_bytes(ds))), rgb)
    with pytest.raises(UserError, match="grayscale images only"):
        load_image(_dicom_bytes(ds), window=(10, 20))


def test_dicom_palette_color_and_ybr() -> None:
    ds = _dicom_dataset(np.array([[0, 1], [2, 3]], dtype=np.uint8), "MONOCHROME2", 8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    lut = {"Red": [0, 65535, 0, 32896], "Green": [0, 0, 65535, 32896], "Blue": [65535, 0, 0, 0]}
    for colour, entries in lut.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(entries, dtype="<u2").tobytes())
    # 16-bit LUT entries scaled by 255 / 65535: 32896 -> 128
    expected = [[[0, 0, 255], [255, 0, 0]], [[0, 255, 0], [128, 128, 0]]]
    assert image_to_rgb_array(load_image(_dicom_bytes(ds))).tolist() == expected
    ybr = np.array([[[100, 128, 128], [200, 128, 128]]], dtype=np.uint8)  # neutral chroma: gray
    rgb = image_to_rgb_array(load_image(_dicom_bytes(_dicom_dataset(ybr, "YBR_FULL", 8))))
    assert rgb.tolist() == [[[100, 100, 100], [200, 200, 200]]]


def test_dicom_multiframe_first_by_default_and_frame_option() -> None:
    frames = np.stack([np.full((2, 3), v, dtype=np.uint8) for v in (10, 20, 30)])
    frames[:, 0, 0] = 0  # min 0 ...
    frames[:, 1, 2] = 200  # ... max 200 in every frame: y = x * 255 / 200
    data = _dicom_bytes(_dicom_dataset(frames, "MONOCHROME2", 8))
    assert _gray(load_image(data))[0, 1] == 13  # 10 * 1.275 = 12.75
    assert _gray(load_image(data, frame=2))[0, 1] == 38  # 30 * 1.275 = 38.25
    with pytest.raises(UserError, match=r"frame 3 is out of range .* 3 frame\(s\)"):
        load_image(data, frame=3)


def test_dicom_without_preamble_read_only_with_dcm_extension(tmp_path: Path) -> None:
    stored = np.array([[0, 50], [100, 200]], dtype=np.uint16)
    ds = _dicom_dataset(stored, "MONOCHROME2", 16)
    raw = _dicom_bytes(ds, preamble=False)
    assert raw[128:132] != b"DICM"
    as_dcm = tmp_path / "raw.dcm"
    as_dcm.write_bytes(raw)
    assert _gray(load_image(as_dcm)).tolist() == [[0, 64], [128, 255]]
    as_bin = tmp_path / "raw.bin"
    as_bin.write_bytes(raw)
    with pytest.raises(UserError, match="not a readable image"):
        load_image(as_bin)


def test_png_named_dcm_is_read_by_content(tmp_path: Path) -> None:
    path = tmp_path / "mislabelled.dcm"
    path.write_bytes(_pil_bytes(Image.new("RGB", (3, 2), (9, 8, 7)), "PNG"))
    assert image_to_rgb_array(load_image(path)).tolist() == [[[9, 8, 7]] * 3] * 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each damaged value it reads
def test_corrupted_dicom_bytes_always_give_user_error() -> None:
    good = _dicom_bytes(
        _dicom_dataset(
            np.arange(64, dtype=np.uint16).reshape(8, 8),
            "MONOCHROME1",
            16,
            RescaleSlope=2,
            WindowCenter=40,
            WindowWidth=80,
        )
    )
    rng = np.random.default_rng(5)
    outcomes = {"loaded": 0, "user_error": 0}
    for _ in range(40):
        broken = bytearray(good)
        for pos in rng.integers(132, len(good) - 128, 6):  # damage the header, not just the pixels
            broken[pos] = int(rng.integers(0, 256))
        try:
            assert load_image(bytes(broken)).mode == "RGB"
            outcomes["loaded"] += 1
        except UserError as exc:
            assert "\n" not in str(exc) and "<image bytes>" in str(exc)
            outcomes["user_error"] += 1
    assert outcomes["user_error"] > 0


def test_dicom_compressed_without_plugin_names_package() -> None:
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    ds = _dicom_dataset(np.zeros((4, 4), dtype=np.uint8), "MONOCHROME2", 8)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    with pytest.raises(UserError, match=r"JPEG-LS.*pip install pylibjpeg pylibjpeg-libjpeg") as err:
        load_image(_dicom_bytes(ds))
    assert "\n" not in str(err.value)


def test_dicom_bad_inputs(tmp_path: Path) -> None:
    good = _dicom_bytes(_dicom_dataset(np.arange(60, dtype=np.uint16).reshape(6, 10), "MONOCHROME2", 16))
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(good[:-20])
    with pytest.raises(UserError, match=f"{truncated}.*corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(UserError, match="60 pixels, more than the limit of 59"):
        load_image(good, max_pixels=59)
    zero = _dicom_dataset(np.zeros((2, 2), dtype=np.uint8), "MONOCHROME2", 8)
    zero.Rows = 0
    with pytest.raises(UserError, match="zero-size"):
        load_image(_dicom_bytes(zero))
    no_pixels = _dicom_dataset(np.zeros((2, 2), dtype=np.uint8), "MONOCHROME2", 8)
    del no_pixels.PixelData
    with pytest.raises(UserError, match="no pixel data"):
        load_image(_dicom_bytes(no_pixels))


# ---------------------------------------------------------------- Pillow formats


def test_16bit_png_min_max_and_window() -> None:
    values = np.array([[1000, 5000], [3000, 2000]], dtype=np.uint16)
    data = _pil_bytes(Image.fromarray(values), "PNG")
    # min-max: (x - 1000) / 4000 * 255 -> 0, 255, 127.5 -> 128, 63.75 -> 64
    assert _gray(load_image(data)).tolist() == [[0, 255], [128, 64]]
    # window (3000.5, 1001): y = ((x - 3000) / 1000 + 0.5) * 255 on (2500, 3500]
    values = np.array([[1000, 2600, 3000], [3200, 3500, 5000]], dtype=np.uint16)
    data = _pil_bytes(Image.fromarray(values), "PNG")
    assert _gray(load_image(data, window=(3000.5, 1001))).tolist() == [[0, 26, 128], [179, 255, 255]]


def test_8bit_gray_kept_unless_windowed() -> None:
    values = np.array([[0, 7, 128, 255]], dtype=np.uint8)
    data = _pil_bytes(Image.fromarray(values), "PNG")
    assert _gray(load_image(data)).tolist() == [[0, 7, 128, 255]]
    # window (64.5, 129): y = ((x - 64) / 128 + 0.5) * 255 on (0, 128]: 7 -> 13.95
    assert _gray(load_image(data, window=(64.5, 129))).tolist() == [[0, 14, 255, 255]]


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # window (100, 200) applied to x = 0, 100, 150, 400
        # LINEAR: ((x - 99.5) / 199 + 0.5) * 255 on (0, 199]: 100 -> 128.14, 150 -> 192.21
        ("LINEAR", [0, 128, 192, 255]),
        # LINEAR_EXACT: ((x - 100) / 200 + 0.5) * 255: 0 -> 0, 100 -> 127.5, 150 -> 191.25, 400 -> clip
        ("LINEAR_EXACT", [0, 128, 191, 255]),
        # SIGMOID: 255 / (1 + exp(-4 (x - 100) / 200)): 30.40, 127.5, 186.42, 254.37
        ("SIGMOID", [30, 128, 186, 254]),
    ],
)
def test_window_functions(function: str, expected: list[int]) -> None:
    x = np.array([0.0, 100.0, 150.0, 400.0])
    assert window_to_uint8(x, (100.0, 200.0), function).tolist() == expected


def test_window_threshold_and_constant_and_nonfinite() -> None:
    assert window_to_uint8(np.array([9.0, 9.5, 10.0]), (10.0, 1.0)).tolist() == [0, 0, 255]
    assert window_to_uint8(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]
    assert window_to_uint8(np.array([np.nan, 0.0, 2.0, np.inf])).tolist() == [0, 0, 255, 0]


def test_exif_rotated_jpeg_comes_out_rotated() -> None:
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, 16:] = 255  # left half black, right half white, 32 wide x 16 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = _pil_bytes(Image.fromarray(stored).convert("RGB"), "JPEG", quality=95, exif=exif.tobytes())
    img = load_image(data)
    assert img.size == (16, 32)  # now 16 wide x 32 tall; the left (black) half is now on top
    arr = image_to_rgb_array(img).astype(int)
    assert arr[4, 8].max() < 20 and arr[28, 8].min() > 235


def test_rgba_la_and_palette_composited_on_white() -> None:
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128], [200, 100, 0, 51]]], dtype=np.uint8)
    img = load_image(_pil_bytes(Image.fromarray(rgba), "PNG"))
    # out = (c * a + 255 * (255 - a)) / 255: (0,0,0,128) -> 127; (200,100,0,51) -> 244, 224, 204
    assert image_to_rgb_array(img).tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 127], [244, 224, 204]]]
    la = Image.fromarray(np.array([[[0, 128], [10, 255]]], dtype=np.uint8), mode="LA")
    assert image_to_rgb_array(load_image(_pil_bytes(la, "PNG"))).tolist() == [[[127] * 3, [10] * 3]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1])
    data = _pil_bytes(palette, "PNG", transparency=0)
    assert image_to_rgb_array(load_image(data)).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_cmyk_tiff_converted() -> None:
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(100, 50, 0, 40), (0, 255, 255, 0)])
    img = load_image(_pil_bytes(cmyk, "TIFF"))
    # Pillow: channel = (255 - c) * (255 - k) / 255 -> 155*215/255 = 130.7, 205*215/255 = 172.8, 215
    assert image_to_rgb_array(img).tolist() == [[[131, 173, 215], [255, 0, 0]]]


def test_multiframe_tiff_frame_option() -> None:
    pages = [Image.fromarray(np.full((2, 2, 3), v, dtype=np.uint8)) for v in (40, 90)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    assert image_to_rgb_array(load_image(buf.getvalue()))[0, 0].tolist() == [40, 40, 40]
    assert image_to_rgb_array(load_image(buf.getvalue(), frame=1))[0, 0].tolist() == [90, 90, 90]
    with pytest.raises(UserError, match="frame 2 is out of range"):
        load_image(buf.getvalue(), frame=2)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_each_format_loads_as_rgb(fmt: str) -> None:
    img = Image.fromarray(np.full((3, 5, 3), 200, dtype=np.uint8))
    out = load_image(_pil_bytes(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert out.mode == "RGB" and out.size == (5, 3)
    assert np.abs(image_to_rgb_array(out).astype(int) - 200).max() <= 2


def test_color_window_is_refused() -> None:
    data = _pil_bytes(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG")
    with pytest.raises(UserError, match="grayscale images only"):
        load_image(data, window=(10, 20))


# ---------------------------------------------------------------- bad inputs


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{tmp_path / 'nope.png'} does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(UserError, match="is a directory"):
        load_image(tmp_path)


def test_empty_garbage_truncated_unsupported(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=f"{empty} is empty"):
        load_image(empty)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 20)
    with pytest.raises(UserError, match=f"{garbage} is not a readable image"):
        load_image(garbage)
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = _pil_bytes(Image.fromarray(noise), "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(png[: len(png) // 2])
    with pytest.raises(UserError, match=f"{cut}.*truncated or corrupt") as err:
        load_image(cut)
    assert "\n" not in str(err.value)
    ppm = tmp_path / "x.ppm"
    ppm.write_bytes(_pil_bytes(Image.new("RGB", (2, 2)), "PPM"))
    with pytest.raises(UserError, match=f"{ppm} is PPM, which is not supported"):
        load_image(ppm)


def test_zero_size_and_decompression_bombs() -> None:
    with pytest.raises(UserError, match="not a readable image"):  # Pillow refuses a 0x0 IHDR
        load_image(_png_with_header(0, 0))
    data = _pil_bytes(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(UserError, match="100x100 = 10000 pixels, more than the limit of 9999") as caught:
        load_image(data, max_pixels=9999)
    assert caught.value.for_cli().endswith("downscale it or raise --max-image-pixels")  # chat and serve both have it
    assert caught.value.for_http().endswith("raise the server's pixel limit (serve --max-image-pixels)")
    assert load_image(data, max_pixels=10000).size == (100, 100)
    with pytest.raises(UserError, match="9000x9000 = 81000000 pixels, more than the limit of 50000000"):
        load_image(_png_with_header(9000, 9000))  # header only: refused before any decoding
    with pytest.raises(UserError, match="too large to decode safely"):  # beyond Pillow's own hard limit
        load_image(_png_with_header(20000, 20000), max_pixels=10**9)


def test_chat_and_serve_have_the_pixel_limit_the_error_names() -> None:
    from medgemma_gguf.runtime.cli import chat_command, serve_command

    def default(command) -> int:
        return next(p.default for p in command.params if "--max-image-pixels" in p.opts)

    assert default(chat_command) == DEFAULT_MAX_PIXELS and default(serve_command) == 25_000_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": (40, 0.5)}, "window width must be >= 1"),
        ({"window": (40,)}, "window must be"),
        ({"frame": -1}, "frame must be"),
        ({"max_pixels": 0}, "max_pixels must be"),
        ({"image_size": 0}, "image_size must be"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    data = _pil_bytes(Image.new("L", (2, 2)), "PNG")
    with pytest.raises(UserError, match=message):
        load_image(data, **kwargs)


# ---------------------------------------------------------------- data URIs


def test_data_uri_png_and_dicom() -> None:
    rgb = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    payload = base64.b64encode(_pil_bytes(Image.fromarray(rgb), "PNG")).decode()
    wrapped = "\n".join(payload[i : i + 10] for i in range(0, len(payload), 10)).rstrip("=")
    img = load_image_from_data_uri(f"data:image/png;base64,{wrapped}")
    assert np.array_equal(image_to_rgb_array(img), rgb)
    raw = _dicom_bytes(_dicom_dataset(np.array([[0, 10]], dtype=np.uint16), "MONOCHROME2", 16), preamble=False)
    uri = "data:application/dicom;base64," + base64.b64encode(raw).decode()
    assert _gray(load_image_from_data_uri(uri)).tolist() == [[0, 255]]
    assert load_image_from_data_uri(f"data:image/png;base64,{payload}", image_size=8).size == (8, 8)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("https://example.org/x.png", "not a data URI"),
        ("data:text/plain;base64,aGVsbG8=", "media type text/plain, which is not an image type"),
        ("data:,hello", r"media type \(none\)"),
        ("data:image/png,%89PNG", "is not base64-encoded"),
        ("data:image/png;base64,@@@not-base64@@@", "invalid base64"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not a readable image"),
        ("data:image/png;base64,", "is empty"),
    ],
)
def test_data_uri_errors(uri: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        load_image_from_data_uri(uri)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- model preprocessing


@pytest.fixture(scope="module")
def hf_processor_factory():
    transformers = pytest.importorskip("transformers")

    def make(size: int):
        return transformers.Gemma3ImageProcessor(
            size={"height": size, "width": size},
            resample=2,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False,
            do_convert_rgb=True,
        )

    return make


@pytest.mark.parametrize(("width", "height", "size"), [(37, 23, 16), (9, 13, 20), (32, 32, 32)])
def test_prepare_for_model_matches_hf_gemma3_processor(hf_processor_factory, width, height, size) -> None:
    rng = np.random.default_rng(width * height)
    source = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    from medgemma_gguf.quant_eval.equivalence import PixelNormalization

    ours = prepare_for_model(source, size)
    assert ours.mode == "RGB" and ours.size == (size, size)  # stretched, no aspect ratio kept
    processor = hf_processor_factory(size)
    normalization = PixelNormalization.of(processor)
    assert normalization == PixelNormalization(1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ours_pixels = normalization.apply(image_to_rgb_array(ours))  # what medgemma-gguf check compares
    hf = processor(images=[source], return_tensors="np")["pixel_values"]
    assert hf.shape == (1, 3, size, size)
    diff = np.abs(ours_pixels - hf[0])
    assert diff.max() <= 1e-5  # same Pillow resize on the same uint8 image: only float32 rounding
    # and the difference is what is documented: far below one 8-bit level
    assert diff.max() < 1 / 255


def test_prepare_for_model_keeps_native_size_image() -> None:
    src = Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert np.array_equal(image_to_rgb_array(prepare_for_model(src, 8)), np.asarray(src))


def test_image_to_rgb_array_shape_and_dtype() -> None:
    arr = image_to_rgb_array(Image.new("L", (5, 3), 9))
    assert arr.shape == (3, 5, 3) and arr.dtype == np.uint8 and arr.flags["C_CONTIGUOUS"]
    assert arr.max() == 9 and arr.min() == 9


def test_load_image_then_prepare_is_deterministic_for_a_path(tmp_path: Path) -> None:
    src = np.random.default_rng(4).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(_pil_bytes(Image.fromarray(src), "PNG"))
    direct = load_image(path, image_size=12)
    two_step = prepare_for_model(load_image(str(path)), 12)
    assert np.array_equal(image_to_rgb_array(direct), image_to_rgb_array(two_step))
