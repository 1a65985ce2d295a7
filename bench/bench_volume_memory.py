"""Peak memory of turning a CT series into MedGemma's slice images: ``runtime.volumes`` (one slice decoded at a
time) against the notebook's way (every sampled slice decoded into one HU volume, then windowed), same run.

A synthetic axial CT series of 512 x 512 16-bit slices is written to --workdir (reused when present). Both
paths sample 85 slices and produce the same 896 x 896 RGB images (checked); the images are consumed one by
one and dropped, so the peak measures the preparation, not the prompt that holds the images. Memory is
Python's tracemalloc peak (numpy reports its buffers to it), median of --rounds.

    .venv/bin/python bench/bench_volume_memory.py --workdir /tmp/volume-bench [--slices-in-series 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROWS = COLS = 512
IMAGE_SIZE = 896


def write_series(folder: Path, n: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.dcm"))) == n:
        return
    uid = generate_uid()
    rng = np.random.default_rng(0)
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", uid
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.5 * k], [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber, ds.RescaleSlope, ds.RescaleIntercept = n - k, 1, -1024
        ds.set_pixel_data(rng.integers(0, 2048, (ROWS, COLS), dtype=np.uint16), "MONOCHROME2", 16)
        ds.save_as(folder / f"IM{k:05d}.dcm", enforce_file_format=True)


def ours(folder: Path) -> list[bytes]:
    from medgemma_gguf.runtime.volumes import open_volume

    digests = []
    with open_volume(folder) as volume:
        for image in volume.images(IMAGE_SIZE):
            digests.append(image.tobytes()[:64] + image.tobytes()[-64:])
    return digests


def notebook(folder: Path) -> list[bytes]:
    """The notebook's way: headers, sort, sample, then all sampled slices into one HU array, windowed at once."""
    import pydicom
    from PIL import Image

    from medgemma_gguf.runtime.volumes import ct_to_rgb, sample_indices

    headers = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in folder.glob("*.dcm")]
    headers = sorted(headers, key=lambda h: float(h[0].ImagePositionPatient[2]))
    chosen = [headers[i][1] for i in sample_indices(len(headers))]
    volume = np.stack([pydicom.pixels.apply_rescale(pydicom.dcmread(p).pixel_array, pydicom.dcmread(p))
                       for p in chosen])
    windowed = ct_to_rgb(volume)
    digests = []
    for rgb in windowed:
        image = np.asarray(Image.fromarray(rgb).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
        digests.append(image.tobytes()[:64] + image.tobytes()[-64:])
    return digests


def measure(function, folder: Path) -> tuple[float, float, list[bytes]]:
    tracemalloc.start()
    started = time.perf_counter()
    result = function(folder)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6, seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--slices-in-series", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = args.workdir / f"ct-{args.slices_in_series}"
    write_series(folder, args.slices_in_series)
    rows = {"runtime.volumes": [], "notebook": []}
    for _ in range(args.rounds):
        for name, function in (("runtime.volumes", ours), ("notebook", notebook)):
            peak, seconds, digests = measure(function, folder)
            rows[name].append((peak, seconds, digests))
    assert rows["runtime.volumes"][0][2] == rows["notebook"][0][2], "the two paths made different images"
    print(f"series: {args.slices_in_series} slices of {COLS}x{ROWS}, 85 sampled, images {IMAGE_SIZE}x{IMAGE_SIZE}")
    medians = {}
    for name, results in rows.items():
        medians[name] = (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))
        print(f"{name:16s} peak traced memory {medians[name][0]:8.1f} MB   time {medians[name][1]:6.2f} s")
    ratio = medians["runtime.volumes"][0] / medians["notebook"][0]
    print(f"peak memory ratio runtime.volumes / notebook: {ratio:.3f}; time ratio "
          f"{medians['runtime.volumes'][1] / medians['notebook'][1]:.2f}")


if __name__ == "__main__":
    main()
