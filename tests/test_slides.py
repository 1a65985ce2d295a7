"""runtime.slides: a small pyramidal TIFF (written here with tifffile, read by OpenSlide) gives tissue patches
on a grid, inside the tissue, in row-major order, at the stated magnification; blank or broken slides are one
clear line."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from imaging_data import TISSUE_RGB, write_slide
from PIL import Image

from medgemma_gguf.errors import InputError, ResourceError, UserError
from medgemma_gguf.runtime import slides
from medgemma_gguf.runtime.slides import PATCH_SIZE, open_slide, otsu_threshold, saturation, tissue_mask


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "slide.tiff"
    mask, mpp = write_slide(path)
    return path, mask, mpp


def test_saturation_and_otsu_on_known_pixels():
    rgb = np.array([[[255, 255, 255], [200, 120, 170], [0, 0, 0], [100, 50, 50]]], np.uint8)
    assert saturation(rgb).tolist() == [[0, 102, 0, 128]]
    values = np.array([10] * 50 + [200] * 50, np.uint8)
    assert 10 <= otsu_threshold(values) < 200
    assert otsu_threshold(np.full(9, 7, np.uint8)) == 0.0  # constant: no split
    white = np.full((8, 8, 3), 245, np.uint8)
    assert not tissue_mask(white)[0].any()  # blank glass finds no tissue (saturation floor)
    assert tissue_mask(np.full((8, 8, 3), TISSUE_RGB, np.uint8))[0].all()  # wall-to-wall tissue is all tissue


def test_patches_lie_in_tissue_on_the_grid_in_row_major_order(slide_file):
    path, mask, mpp = slide_file
    with open_slide(path, patches=5, seed=3) as slide:
        info = slide.info
        assert (info.width, info.height, info.mpp, info.magnification) == (3584, 2688, mpp, 10.0)
        assert (info.level, info.read_side, info.cell_side) == (0, PATCH_SIZE, PATCH_SIZE)
        assert (info.grid_rows, info.grid_cols) == (3, 4)
        cells = [(p.row, p.col) for p in info.patches]
        assert len(cells) == 5 and cells == sorted(cells)
        for patch in info.patches:
            covered = mask[patch.y:patch.y + patch.side, patch.x:patch.x + patch.side].mean()
            assert covered >= 0.45 and patch.tissue >= 0.5  # the thumbnail's estimate agrees with the geometry
            assert (patch.x, patch.y) == (patch.col * PATCH_SIZE, patch.row * PATCH_SIZE)
        tissue_cells = {(r, c) for r in range(3) for c in range(4)
                        if mask[r * 896:(r + 1) * 896, c * 896:(c + 1) * 896].mean() >= 0.55}
        assert (0, 3) not in cells and (2, 3) not in cells  # right-hand corners are glass
        first = slide.patch(info.patches[0], 64)
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8
        full = [p for p in info.patches if mask[p.y:p.y + p.side, p.x:p.x + p.side].all()]
        if full:
            assert (slide.patch(full[0], 32) == TISSUE_RGB).all()
        assert "grid 3 rows x 4 columns of 896 level-0 px" in info.describe()
    with open_slide(path, patches=5, seed=3) as again, open_slide(path, patches=100) as every:
        assert again.info.patches == info.patches  # a seed gives the same choice
        assert len(every) == info.n_tissue and tissue_cells <= {(p.row, p.col) for p in every.info.patches}


def test_lower_magnification_reads_a_coarser_level(slide_file):
    path, _, _ = slide_file
    with open_slide(path, magnification=5, patches=2) as slide:
        # 5x = 2 µm/px: level 1 holds it exactly; a cell is 1792 level-0 px, read as 896 px there
        assert (slide.info.level, slide.info.level_mpp, slide.info.read_side) == (1, 2.0, 896)
        assert (slide.info.cell_side, slide.info.grid_rows, slide.info.grid_cols) == (1792, 1, 2)
    with pytest.raises(InputError, match="coarser than 40x"):
        open_slide(path, magnification=40)
    with pytest.raises(InputError, match="smaller than one 896-px patch at 2.5x"):
        open_slide(path, magnification=2.5)


def test_save_patches_writes_plain_pngs_an_overview_and_the_grid(slide_file, tmp_path):
    path, _, _ = slide_file
    with open_slide(path, patches=3) as slide:
        written = slide.save_patches(tmp_path / "seen", 48)
        names = sorted(p.name for p in (tmp_path / "seen").iterdir())
        assert names == sorted([p.name for p in written] + ["overview.png", "patches.tsv"])
        for patch_path, patch in zip(written, slide.info.patches, strict=True):
            assert patch_path.name.endswith(f"-r{patch.row}-c{patch.col}.png")
            np.testing.assert_array_equal(np.asarray(Image.open(patch_path)), slide.patch(patch, 48))
            data = patch_path.read_bytes()
            chunks, offset = [], 8
            while offset < len(data):
                length = int.from_bytes(data[offset:offset + 4], "big")
                chunks.append(data[offset + 4:offset + 8])
                assert zlib.crc32(data[offset + 4:offset + 8 + length]) == int.from_bytes(
                    data[offset + 8 + length:offset + 12 + length], "big")
                offset += 12 + length
            assert set(chunks) <= {b"IHDR", b"IDAT", b"IEND"}  # no text, time, EXIF or other metadata
        rows = (tmp_path / "seen" / "patches.tsv").read_text().splitlines()
        assert rows[0] == "index\trow\tcol\tx\ty\tside\ttissue" and len(rows) == 4
        with pytest.raises(UserError, match="already exists and is not an empty folder"):
            slide.save_patches(tmp_path / "seen")


def test_blank_broken_and_unsized_slides_are_one_line_errors(tmp_path, monkeypatch, slide_file):
    blank = tmp_path / "blank.tiff"
    write_slide(blank, 1792, 1792, tissue=False, levels=3)
    with pytest.raises(InputError, match=r"found no tissue on .*blank.tiff: none of its 4 patch cells at 10x"):
        open_slide(blank)
    (tmp_path / "junk.svs").write_bytes(b"not a slide at all" * 10)
    with pytest.raises(InputError, match="is not a whole-slide image OpenSlide can read"):
        open_slide(tmp_path / "junk.svs")
    with pytest.raises(UserError, match="does not exist"):
        open_slide(tmp_path / "missing.svs")
    import tifffile

    tifffile.imwrite(tmp_path / "nompp.tiff", np.full((1024, 1024, 3), TISSUE_RGB, np.uint8), tile=(256, 256),
                     photometric="rgb")
    with pytest.raises(InputError, match="records no pixel size .* pass mpp"):
        open_slide(tmp_path / "nompp.tiff")
    with open_slide(tmp_path / "nompp.tiff", mpp=1.0, patches=1) as slide:
        assert slide.info.mpp == 1.0
    small = tmp_path / "small.tiff"
    write_slide(small, 512, 512, levels=1)
    with pytest.raises(InputError, match="smaller than one 896-px patch"):
        open_slide(small)
    monkeypatch.setattr(slides, "MAP_MAX_PIXELS", 1000)
    with pytest.raises(ResourceError, match="too large for a tissue map"):
        open_slide(slide_file[0])
    for kwargs, message in (({"patches": 0}, "patches must be"), ({"magnification": 0}, "magnification must be"),
                            ({"mpp": -1.0}, "mpp must be"), ({"seed": -1}, "seed must be")):
        with pytest.raises(InputError, match=message):
            open_slide(slide_file[0], **kwargs)


def test_slide_bytes_are_read_from_a_private_copy_that_is_removed(slide_file):
    path, _, _ = slide_file
    with open_slide(path.read_bytes(), patches=2) as slide:
        temp = slide._temp
        assert temp is not None and temp.exists() and len(list(slide.images(16))) == 2
    assert not temp.exists()
