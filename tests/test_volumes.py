"""runtime.volumes / runtime.sources: DICOM series and NIfTI volumes become the slices Google's CT notebook
builds — right order, right HU, right windows, uniform sampling — and every bad input is one clear line."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from imaging_data import KNOWN_HU, ct_dataset, slice_hu, write_mr_series, write_nifti, write_non_image, write_series
from pydicom.encaps import encapsulate
from pydicom.uid import EnhancedCTImageStorage, JPEGLSLossless, generate_uid

from medgemma_gguf.errors import AccessError, InputError, ResourceError, UserError
from medgemma_gguf.runtime import volumes
from medgemma_gguf.runtime.sources import Archive, ArchiveLimits, check_local_path, decode_payload
from medgemma_gguf.runtime.volumes import (
    CT_WINDOWS,
    ct_to_rgb,
    mr_to_rgb,
    open_volume,
    parse_windows,
    sample_indices,
    square_model_image,
)

SIZE = 32  # model image size used in these tests


def _hu_of(volume, index):
    return volume._reader.values(index)


# --- sampling and windows ------------------------------------------------------------------------------


def test_sampling_is_the_notebooks_uniform_formula():
    assert sample_indices(85) == list(range(85)) and sample_indices(3, 85) == [0, 1, 2]
    assert sample_indices(86) == list(range(1, 86))  # the first slice is never taken, the last always is
    picked = sample_indices(300)
    assert len(picked) == 85 == len(set(picked)) and picked[:4] == [4, 7, 11, 14] and picked[-1] == 299
    assert set(np.diff(picked)) <= {3, 4}  # uniform steps of (n - 1) / 85 = 3.52
    for n in range(86, 1200, 37):
        chosen = sample_indices(n)
        assert chosen == sorted(set(chosen)) and len(chosen) == 85
        assert chosen == [int(round(i / 85 * (n - 1))) for i in range(1, 86)]
    assert sample_indices(10, 4) == [2, 4, 7, 9]  # 4.5 rounds half to even, as Python's round
    with pytest.raises(InputError, match="no slices"):
        sample_indices(0)


def test_ct_windows_channel_values_by_hand():
    hu = np.array([KNOWN_HU], dtype=np.float64)
    rgb = ct_to_rgb(hu)
    # R = -1024..1024, G = -135..215, B = 0..80, each (clip - lo) / (hi - lo) * 255 rounded half to even
    expected = {-1024: (0, 0, 0), -135: (111, 0, 0), 0: (128, 98, 0), 40: (132, 128, 128), 80: (137, 157, 255),
                215: (154, 255, 255), 1024: (255, 255, 255), -500: (65, 0, 0)}
    assert [tuple(int(v) for v in px) for px in rgb[0]] == [expected[h] for h in KNOWN_HU]
    assert CT_WINDOWS == ((-1024, 1024), (-135, 215), (0, 80))
    assert parse_windows("-1000:1000,-160:240,-20:100") == ((-1000, 1000), (-160, 240), (-20, 100))
    custom = ct_to_rgb(np.array([[0.0]]), parse_windows("-100:100,0:10,-10:0"))
    assert custom.tolist() == [[[128, 0, 255]]]
    for bad in ("1:2,3:4", "5:1,0:1,0:1", "a:b,0:1,0:1", "0:1,0:1,0:inf"):
        with pytest.raises(InputError, match="three \\(low, high\\) HU pairs"):
            parse_windows(bad)


def test_mr_min_max_and_square_padding():
    rgb = mr_to_rgb(np.array([[0.0, 50.0, 100.0]]), 0.0, 100.0)
    assert rgb[0, :, 0].tolist() == [0, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()
    assert (mr_to_rgb(np.ones((2, 2)), 1.0, 1.0) == 255).all()  # constant volume: Google's server gives 255
    tall = np.full((4, 2, 3), 200, np.uint8)
    padded = square_model_image(tall, 4)
    assert padded.shape == (4, 4, 3) and (padded[:, 1:3] == 200).all() and (padded[:, [0, 3]] == 0).all()
    odd = square_model_image(np.full((3, 2, 3), 9, np.uint8), 3)  # extra pixel goes right
    assert (odd[:, 0] == 9).all() and (odd[:, 2] == 0).all()
    assert square_model_image(np.zeros((8, 8, 3), np.uint8), 16).shape == (16, 16, 3)


# --- DICOM series ----------------------------------------------------------------------------------------


def test_series_is_sorted_by_position_with_exact_hu(tmp_path):
    write_series(tmp_path / "ct", n=10)
    with open_volume(tmp_path / "ct") as volume:
        info = volume.info
        assert (info.kind, info.modality, info.n_slices, info.rows, info.columns) == ("DICOM series", "CT", 10, 24, 20)
        assert info.plane == "axial" and info.spacing_mm == pytest.approx(2.5) and info.warnings == []
        assert info.order == "position along the slice normal"
        for index in range(10):  # InstanceNumbers run the other way; the position order wins
            np.testing.assert_array_equal(_hu_of(volume, index), slice_hu(index, 24, 20))
        assert "10 axial slices of 20x24, 2.5 mm apart" in info.describe()


def test_tilted_series_sorts_along_its_normal(tmp_path):
    folder = tmp_path / "tilted"
    folder.mkdir()
    angle = np.deg2rad(20)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(angle), -np.sin(angle)])
    normal = np.cross(row, col)
    uid = generate_uid()
    for k in (3, 0, 4, 1, 2):
        position = np.array([-100.0, -120.0, 0.0]) + normal * (2.0 * k) + col * 5.0 * ((k * 7) % 3)
        ds = ct_dataset(slice_hu(k, 8, 8), series_uid=uid, z=0.0, instance=10 - k, position=position.tolist(),
                        orientation=[*row, *col])
        ds.save_as(folder / f"x{k}.dcm", enforce_file_format=True)
    with open_volume(folder) as volume:
        assert [int(_hu_of(volume, i)[-1, -1]) for i in range(5)] == [0, 10, 20, 30, 40]
        assert volume.info.spacing_mm == pytest.approx(2.0)


def test_images_are_sampled_windowed_and_decoded_one_at_a_time(tmp_path, monkeypatch):
    write_series(tmp_path / "ct", n=12)
    decoded = []
    real = volumes._DicomReader.values

    def counting(self, index):
        decoded.append(index)
        return real(self, index)

    monkeypatch.setattr(volumes._DicomReader, "values", counting)
    with open_volume(tmp_path / "ct", slices=4) as volume:
        assert volume.info.indices == [3, 6, 8, 11] and len(volume) == 4
        images = volume.images(24)
        assert decoded == []
        first = next(images)
        assert decoded == [3]  # nothing ahead of the slice being handed over
        rest = list(images)
    assert decoded == [3, 6, 8, 11]
    expected = square_model_image(ct_to_rgb(slice_hu(3, 24, 20)), 24)
    np.testing.assert_array_equal(first, expected)
    assert first.shape == (24, 24, 3) and first.dtype == np.uint8 and len(rest) == 3
    # the padded columns (2 left, 2 right) are black, the known voxels sit in row 0 after the left pad
    assert (first[:, :2] == 0).all() and tuple(first[0, 2 + 3]) == (132, 128, 128)


def test_zip_gives_the_same_volume_and_its_dangers_are_refused(tmp_path):
    write_series(tmp_path / "ct", n=6)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((tmp_path / "ct").iterdir()):
            archive.write(path, f"study/series/{path.name}")
        archive.writestr("study/README.txt", "not dicom")
    data = buffer.getvalue()
    (tmp_path / "ct.zip").write_bytes(data)
    with open_volume(tmp_path / "ct") as folder, open_volume(data) as inline, open_volume(tmp_path / "ct.zip") as z:
        a, b, c = (list(v.images(SIZE)) for v in (folder, inline, z))
        assert all(np.array_equal(x, y) and np.array_equal(x, w) for x, y, w in zip(a, b, c, strict=True))
        assert inline.info.warnings == ["ignored 1 file(s) that are not DICOM"]

    def zipped(name: str, payload: bytes, method=zipfile.ZIP_DEFLATED) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", method) as archive:
            archive.writestr(name, payload)
        return out.getvalue()

    with pytest.raises(InputError, match="points outside the archive"):
        open_volume(zipped("../../etc/evil.dcm", b"x"))
    with pytest.raises(InputError, match="points outside the archive"):
        open_volume(zipped("/abs/evil.dcm", b"x"))
    with pytest.raises(ResourceError, match="zip bomb"):
        open_volume(zipped("bomb.dcm", bytes(8 * 1024**2)))
    with pytest.raises(InputError, match="not a readable zip"):
        open_volume(b"PK\x03\x04" + b"\x00" * 40)
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(5):
            archive.writestr(f"f{i}", b"x")
    with pytest.raises(ResourceError, match="holds 5 files, more than the limit of 4"):
        Archive(many.getvalue(), "the zip", ArchiveLimits(max_members=4))


def test_two_series_are_refused_naming_their_uids_and_one_can_be_chosen(tmp_path):
    first = write_series(tmp_path / "mixed", n=5, prefix="a")
    second = write_series(tmp_path / "mixed", n=3, prefix="b", seed=1)
    with pytest.raises(InputError) as caught:
        open_volume(tmp_path / "mixed")
    message = caught.value.for_cli()
    assert f"{first} (CT, 5 slices); {second} (CT, 3 slices)" in message and "--series UID" in message
    assert "\n" not in message and "Synthetic" not in message and "SYN-0001" not in message
    with open_volume(tmp_path / "mixed", series=second) as volume:
        assert volume.info.n_slices == 3
    with pytest.raises(UserError, match="series 1.2.3 is not in"):
        open_volume(tmp_path / "mixed", series="1.2.3")


def test_missing_slices_and_uneven_spacing_warn_and_keep_position_order(tmp_path, caplog):
    write_series(tmp_path / "gappy", n=10, skip=(4, 5))
    with caplog.at_level("WARNING"), open_volume(tmp_path / "gappy") as volume:
        assert volume.info.n_slices == 8
        assert [int(_hu_of(volume, i)[-1, -1]) for i in range(8)] == [0, 10, 20, 30, 60, 70, 80, 90]
        assert volume.info.warnings == ["about 2 slice(s) missing: gaps of up to 7.5 mm in a series spaced 2.5 mm; "
                                        "continuing in position order"]
    assert "about 2 slice(s) missing" in caplog.text
    folder = tmp_path / "uneven"
    folder.mkdir()
    uid = generate_uid()
    for k, z in enumerate([0.0, 2.5, 5.0, 7.8, 10.3]):
        ct_dataset(slice_hu(k, 8, 8), series_uid=uid, z=z, instance=k + 1).save_as(folder / f"{k}.dcm",
                                                                                    enforce_file_format=True)
    with open_volume(folder) as volume:
        assert volume.info.warnings == ["uneven slice spacing (2.5 to 2.8 mm); continuing in position order"]


def test_instance_number_fallback_duplicates_localizers_and_other_planes(tmp_path):
    folder = tmp_path / "nopos"
    folder.mkdir()
    uid = generate_uid()
    for k in (2, 0, 1):
        ct_dataset(slice_hu(k, 8, 8), series_uid=uid, z=None, instance=k + 1).save_as(folder / f"{k}.dcm",
                                                                                       enforce_file_format=True)
    with open_volume(folder) as volume:
        assert volume.info.order == "InstanceNumber"
        assert [int(_hu_of(volume, i)[-1, -1]) for i in range(3)] == [0, 10, 20]
        assert "ordered by InstanceNumber" in volume.info.warnings[0]
    folder = tmp_path / "extras"
    uid = write_series(folder, n=4)
    ct_dataset(slice_hu(9, 24, 20), series_uid=uid, z=-50.0, instance=99).save_as(folder / "dup.dcm",
                                                                                   enforce_file_format=True)
    ct_dataset(slice_hu(0, 24, 20), series_uid=uid, z=0.0, instance=100, image_type=("ORIGINAL", "PRIMARY",
               "LOCALIZER")).save_as(folder / "scout.dcm", enforce_file_format=True)
    with open_volume(folder) as volume:
        assert volume.info.n_slices == 4
        assert volume.info.warnings == ["left out 1 localizer image(s)",
                                        "dropped 1 slice(s) at a position already taken"]
    folder = tmp_path / "coronal"
    folder.mkdir()
    uid = generate_uid()
    for k in range(3):
        ct_dataset(slice_hu(k, 8, 8), series_uid=uid, z=0.0, instance=k + 1, orientation=(1, 0, 0, 0, 0, -1),
                   position=[0.0, float(k), 0.0]).save_as(folder / f"{k}.dcm", enforce_file_format=True)
    with open_volume(folder) as volume:
        assert volume.info.plane == "coronal"
        assert "the slices are coronal; MedGemma was trained on axial CT/MR slices" in volume.info.warnings


def test_non_image_dicom_multiframe_single_file_and_compressed_without_decoder(tmp_path):
    folder = tmp_path / "objects"
    folder.mkdir()
    write_non_image(folder / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.11")
    write_non_image(folder / "rt.dcm", "1.2.840.10008.5.1.4.1.1.481.3")
    with pytest.raises(InputError, match=r"holds no CT or MR image slices, only Basic Text SR Storage \(1\), "
                                         r"RT Structure Set Storage \(1\); pass the image series"):
        open_volume(folder)
    write_series(folder, n=3)
    with open_volume(folder) as volume:
        assert volume.info.warnings[0] == ("ignored 2 other DICOM object(s): Basic Text SR Storage (1), "
                                           "RT Structure Set Storage (1)")
    enhanced = tmp_path / "enhanced"
    enhanced.mkdir()
    ds = ct_dataset(slice_hu(0, 8, 8), series_uid=generate_uid(), z=0.0, instance=1, sop_class=EnhancedCTImageStorage)
    ds.save_as(enhanced / "e.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="only multi-frame images .* convert it to NIfTI"):
        open_volume(enhanced)
    with pytest.raises(InputError, match="is one DICOM file; pass the folder"):
        open_volume(enhanced / "e.dcm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no DICOM files"):
        open_volume(tmp_path / "empty")
    compressed = tmp_path / "jpegls"
    uid = write_series(compressed, n=4)
    victim = sorted(compressed.iterdir())[0]
    ds = ct_dataset(slice_hu(0, 24, 20), series_uid=uid, z=-50.0, instance=4)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\x00" * 16])  # never decoded: the missing decoder is found from the header
    ds["PixelData"].VR = "OB"
    ds.save_as(victim, enforce_file_format=True)
    with pytest.raises(UserError, match=r"compressed with JPEG-LS Lossless .* install one: pip install"):
        open_volume(compressed, slices=4)


def test_dimension_bombs_and_bad_options_are_refused_before_decoding(tmp_path):
    write_series(tmp_path / "ct", n=3)
    with pytest.raises(ResourceError, match=r"20x24 = 480 pixels, more than the limit of 100"):
        open_volume(tmp_path / "ct", max_pixels=100)
    with pytest.raises(InputError, match="slices must be a whole number >= 1"):
        open_volume(tmp_path / "ct", slices=0)
    with pytest.raises(InputError, match="is CT but MR was asked for"):
        open_volume(tmp_path / "ct", modality="MR")
    with pytest.raises(InputError, match="modality must be CT or MR"):
        open_volume(tmp_path / "ct", modality="PET")
    with pytest.raises(UserError, match="does not exist"):
        open_volume(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a DICOM series folder, a zip or a NIfTI file"):
        open_volume(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="neither a zip of a DICOM series nor a NIfTI file"):
        open_volume(b"garbage bytes")
    sizes = tmp_path / "sizes"
    uid = write_series(sizes, n=3)
    ct_dataset(slice_hu(0, 10, 10), series_uid=uid, z=99.0, instance=7).save_as(sizes / "odd.dcm",
                                                                                 enforce_file_format=True)
    with pytest.raises(InputError, match=r"different sizes \(10x10, 20x24\)"):
        open_volume(sizes)


def test_mr_series_uses_the_whole_volume_min_max(tmp_path):
    values = write_mr_series(tmp_path / "mr", n=6)
    lo, hi = values.min(), values.max()
    with open_volume(tmp_path / "mr", slices=2) as volume:
        assert volume.info.modality == "MR" and volume.info.windows is None and volume.info.indices == [2, 5]
        images = list(volume.images(16))
    expected = np.round((values[5] - lo) / (hi - lo) * 255).astype(np.uint8)
    np.testing.assert_array_equal(images[1][..., 1], expected)
    assert "volume min-max to grey" in volume.info.describe()


# --- NIfTI -----------------------------------------------------------------------------------------------


def test_nifti_slices_are_ordered_oriented_and_exact(tmp_path):
    path = tmp_path / "ct.nii.gz"
    write_nifti(path, n=9)
    with open_volume(path, modality="CT") as volume:
        assert (volume.info.kind, volume.info.n_slices, volume.info.rows, volume.info.columns) == ("NIfTI", 9, 24, 20)
        assert volume.info.spacing_mm == pytest.approx(2.5)
        for k in range(9):
            np.testing.assert_array_equal(_hu_of(volume, k), slice_hu(k, 24, 20))
    # the same volume stored the other way round (L, P, I) gives the same slices
    import nibabel as nib

    img = nib.load(str(path))
    flipped = np.asarray(img.dataobj)[::-1, ::-1, ::-1]
    affine = img.affine @ np.array([[-1, 0, 0, 19], [0, -1, 0, 23], [0, 0, -1, 8], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(flipped, affine), str(tmp_path / "lpi.nii"))
    with open_volume(tmp_path / "lpi.nii", modality="CT") as volume:
        for k in (0, 4, 8):
            np.testing.assert_array_equal(_hu_of(volume, k), slice_hu(k, 24, 20))
    with open_volume(path.read_bytes(), modality="ct", slices=3) as inline:
        assert inline.info.indices == [3, 5, 8]
        temp = inline._reader.temp
        assert temp.exists() and len(list(inline.images(SIZE))) == 3
    assert not temp.exists()  # the private copy is gone once the volume is closed
    with pytest.raises(InputError, match="does not record the modality; pass modality CT or MR"):
        open_volume(path)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), str(tmp_path / "4d.nii"))
    with pytest.raises(InputError, match=r"shape \(4, 4, 3, 2\); pass one 3-D volume"):
        open_volume(tmp_path / "4d.nii", modality="CT")
    (tmp_path / "bad.nii").write_bytes(b"\x00" * 400)
    with pytest.raises(InputError, match="cannot read .*bad.nii as NIfTI"):
        open_volume(tmp_path / "bad.nii", modality="CT")


# --- where inputs may come from ----------------------------------------------------------------------------


def test_local_paths_only_where_allowed(tmp_path):
    root = tmp_path / "allowed"
    write_series(root / "ct", n=2)
    outside = tmp_path / "outside"
    write_series(outside, n=2)
    assert check_local_path(str(root / "ct"), what="volume", allow_local_files=False, allowed_roots=[root])
    with pytest.raises(AccessError, match="outside the allowed folders; put it under one of allowed_roots"):
        check_local_path(str(outside), what="volume", allow_local_files=False, allowed_roots=[root])
    with pytest.raises(AccessError, match="outside the allowed folders"):
        check_local_path(str(root / ".." / "outside"), what="volume", allow_local_files=False, allowed_roots=[root])
    with pytest.raises(AccessError, match="local volume paths are not allowed here"):
        check_local_path(str(root / "ct"), what="volume", allow_local_files=False)
    os.symlink(outside, root / "link")
    with pytest.raises(AccessError, match="outside the allowed folders"):
        check_local_path(str(root / "link"), what="volume", allow_local_files=False, allowed_roots=[root])
    os.symlink(next(outside.iterdir()), root / "ct" / "sneaky.dcm")
    with pytest.raises(AccessError, match="links outside the allowed folders"):
        open_volume(root / "ct", allowed_roots=[root])
    assert decode_payload("data:application/zip;base64,UEsDBA==", what="volume") == b"PK\x03\x04"
    for bad, message in (("", "must be base64 text"), ("@@@", "not valid base64"),
                         ("data:application/zip,abc", "not base64")):
        with pytest.raises(InputError, match=message):
            decode_payload(bad, what="volume")


def test_an_85_slice_ct_study_fits_the_servers_default_body_limit():
    import base64
    import json

    from medgemma_gguf.runtime.sources import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES

    ds = ct_dataset(np.zeros((512, 512), np.int32), series_uid=generate_uid(), z=0.0, instance=1)
    one = io.BytesIO()
    ds.save_as(one, enforce_file_format=True)
    study = io.BytesIO()
    with zipfile.ZipFile(study, "w", zipfile.ZIP_STORED) as archive:
        for k in range(85):
            archive.writestr(f"IM{k:04d}.dcm", one.getvalue())
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "volume", "data": base64.b64encode(study.getvalue()).decode()},
        {"type": "text", "text": "Findings?"}]}]})
    assert len(body) < DEFAULT_MAX_BODY_BYTES and DEFAULT_MAX_IMAGES >= 85
    assert len(body) > 0.6 * DEFAULT_MAX_BODY_BYTES  # the limit is sized for it, not far above


def test_volume_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as caught:
        open_volume(tmp_path / "empty")
    assert "\n" not in str(caught.value) and str(caught.value).endswith("CT or MR series")


def test_the_readme_study_commands_use_real_chat_options():
    import re
    import shlex

    from medgemma_gguf.runtime.cli import chat_command

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Imaging studies"):readme.index("## Serve")]
    commands = [shlex.split(line.replace("\\\n", " ")) for line in re.findall(
        r"^medgemma-gguf chat (?:[^\n]*\\\n)*[^\n]*", section, flags=re.MULTILINE)]
    assert len(commands) == 5
    known = {opt for param in chat_command.params for opt in param.opts}
    for words in commands:
        flags = {w for w in words if w.startswith("--")}
        assert flags <= known, flags - known
        context = chat_command.make_context("chat", words[2:], resilient_parsing=True)
        assert context.params["model"] == Path("out/")


def test_the_cli_refuses_missing_inputs_before_loading(tmp_path, capsys):
    from medgemma_gguf.cli import main

    model = str(tmp_path / "not-loaded.gguf")  # never opened: the input paths are checked first
    image = tmp_path / "cxr.png"
    image.write_bytes(b"checked when read")
    for args, message in ((["--image", "nope.png"], "error: image nope.png does not exist; check the path"),
                          (["--image", str(image), "--prior", "old.png"], "error: prior image old.png does not exist"),
                          (["--volume", "ct/"], "error: volume ct does not exist; check the path"),
                          (["--slide", "biopsy.svs"], "error: slide biopsy.svs does not exist; check the path")):
        assert main(["chat", model, "--prompt", "x", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [message] or (len(err) == 1 and err[0].startswith(message)), err
