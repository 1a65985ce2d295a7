"""Synthetic imaging studies the tests write themselves: DICOM CT/MR series, NIfTI volumes, pyramidal TIFF slides."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

# HU values whose three-window RGB the tests check by hand (row 0 of every slice)
KNOWN_HU = (-1024, -135, 0, 40, 80, 215, 1024, -500)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def slice_hu(k: int, rows: int, cols: int) -> np.ndarray:
    """Slice ``k`` (spatial index, feet to head) of the synthetic CT: row 0 holds KNOWN_HU, the last pixel 10*k,
    the rest a smooth pattern that changes with k."""
    y, x = np.mgrid[0:rows, 0:cols]
    hu = ((x * 37 + y * 53 + k * 101) % 1500 - 700).astype(np.int32)
    hu[0, : len(KNOWN_HU)] = KNOWN_HU
    hu[-1, -1] = 10 * k
    return hu


def new_dataset(sop_class: str, *, modality: str | None = None, syntax=ExplicitVRLittleEndian) -> Dataset:
    """An empty DICOM object of ``sop_class``: file meta (transfer syntax, a new instance UID) and modality."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    return ds


def ct_dataset(hu: np.ndarray, *, series_uid: str, z: float | None, instance: int | None,
               slope: float = 1.0, intercept: float = -1024.0, orientation=AXIAL, sop_class=CTImageStorage,
               modality: str = "CT", syntax=ExplicitVRLittleEndian, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
               position=None) -> Dataset:
    """A single-frame CT (or MR) slice storing ``(hu - intercept) / slope`` as unsigned 16-bit."""
    ds = new_dataset(sop_class, modality=modality, syntax=syntax)
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN-0001"
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.ImageType = list(image_type)
    if z is not None:
        ds.ImagePositionPatient = list(position) if position is not None else [-100.0, -120.0, z]
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    stored = np.round((hu - intercept) / slope).astype(np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 16)
    return ds


def write_series(folder: Path, n: int = 10, rows: int = 24, cols: int = 20, *, spacing: float = 2.5,
                 series_uid: str | None = None, seed: int = 0, prefix: str = "", skip: tuple[int, ...] = (),
                 **kwargs) -> str:
    """An axial CT series in ``folder``: file names shuffled, InstanceNumber reversed against position
    (spatial index k at z = -50 + k * spacing has InstanceNumber n - k). Returns the SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    names = [f"{prefix}IM{i:04d}.dcm" for i in range(n)]
    random.Random(seed).shuffle(names)
    for k in range(n):
        if k in skip:
            continue
        ds = ct_dataset(slice_hu(k, rows, cols), series_uid=uid, z=-50.0 + k * spacing, instance=n - k, **kwargs)
        ds.save_as(folder / names[k], enforce_file_format=True)
    return uid


def write_non_image(path: Path, sop_class: str) -> None:
    """A DICOM object without pixels (an SR or RT Structure Set stand-in)."""
    ds = new_dataset(sop_class, modality="SR" if ".88." in sop_class else "RTSTRUCT")
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)


def write_mr_series(folder: Path, n: int = 6, rows: int = 16, cols: int = 16) -> np.ndarray:
    """An MR series; returns its values stacked in position order (to check the volume min-max rule)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    volume = []
    for k in range(n):
        y, x = np.mgrid[0:rows, 0:cols]
        values = (x * 7 + y * 3 + k * 40 + 100).astype(np.int32)
        volume.append(values)
        ds = ct_dataset(values, series_uid=uid, z=float(k), instance=k + 1, intercept=0.0, sop_class=MRImageStorage,
                        modality="MR")
        ds.save_as(folder / f"mr{k}.dcm", enforce_file_format=True)
    return np.stack(volume)


def write_nifti(path: Path, n: int = 9, rows: int = 24, cols: int = 20) -> None:
    """The CT of ``write_series`` as NIfTI in RAS+ order (i: patient right, j: anterior, k: superior), so that
    slice k shown radiologically (row 0 anterior, column 0 the patient's right) equals ``slice_hu(k)``."""
    import nibabel as nib

    data = np.zeros((cols, rows, n), np.int16)
    for k in range(n):
        display = slice_hu(k, rows, cols)  # [row (anterior->posterior), col (right->left)]
        data[:, :, k] = np.flip(display, axis=(0, 1)).T  # i grows toward the right, j toward anterior
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))


TISSUE_RGB = (200, 120, 170)  # H&E-like pink: saturation 0.4


def write_slide(path: Path, width: int = 3584, height: int = 2688, *, mpp: float = 1.0, tissue: bool = True,
                levels: int = 4) -> tuple[np.ndarray, float]:
    """A tiled pyramidal TIFF OpenSlide reads as generic-tiff: white glass with a pink ellipse of tissue.

    Returns the level-0 tissue mask and the mpp. Each level is a main IFD, zlib tiles of 256, resolution in
    pixels per centimetre (1e4 / mpp).
    """
    import tifffile

    y, x = np.ogrid[0:height, 0:width]
    mask = ((x - width * 0.35) / (width * 0.3)) ** 2 + ((y - height * 0.5) / (height * 0.38)) ** 2 <= 1.0
    if not tissue:
        mask[:] = False
    image = np.full((height, width, 3), 245, np.uint8)
    image[mask] = TISSUE_RGB
    with tifffile.TiffWriter(path) as tif:
        level = image
        for index in range(levels):
            scale = 2**index
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)), resolutionunit="CENTIMETER",
                      subfiletype=0 if index == 0 else 1)
            level = level[::2, ::2]
    return mask, mpp
