"""hematovision.cells: the white-cell detector and the canonical crop, on small committed fields and drawn images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision import cells as cells_module
from hematovision.cells import (
    CROP_SCALE,
    SLIDE_WHITE,
    Cell,
    background_colour,
    canonical_crop,
    crop_window,
    find_white_cells,
    primary_index,
    white_balance,
)
from tests.conftest import drawn_smear

FIELDS = Path(__file__).parent / "data" / "fields"
TWO_WBC_BOXES = [(11, 114, 102, 210), (119, 126, 255, 235)]  # BloodImage_00010 at 320x240 (README there)
ONE_WBC_BOX = (34, 157, 143, 240)  # BloodImage_00001 at 320x240
KAGGLE_EOSINOPHIL_BOX = (100, 140, 170, 205)  # the eosinophil of kaggle_train_eosinophil_16_6740.jpeg, by eye


def field(name: str) -> np.ndarray:
    with Image.open(FIELDS / name) as image:
        return np.asarray(image.convert("RGB"))


def inside(cell: Cell, box: tuple[int, int, int, int]) -> bool:
    cx, cy = cell.centre
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def test_two_white_cells_each_in_its_annotated_box():
    found = find_white_cells(field("bccd_00010_two_wbc.jpg"))
    assert len(found) == 2
    assert sorted(next(i for i, b in enumerate(TWO_WBC_BOXES) if inside(c, b)) for c in found) == [0, 1]
    assert [c.centre[1] for c in found] == sorted(c.centre[1] for c in found)  # sorted top to bottom


def test_one_white_cell_box_is_the_whole_cell():
    rgb = field("bccd_00001_one_wbc.jpg")
    found = find_white_cells(rgb)
    assert len(found) == 1
    cell = found[0]
    assert inside(cell, ONE_WBC_BOX)
    x0, y0, x1, y1 = cell.box
    assert all(isinstance(v, int) for v in cell.box)
    assert 0 <= x0 < x1 <= rgb.shape[1] and 0 <= y0 < y1 <= rgb.shape[0]
    true_diameter = max(ONE_WBC_BOX[2] - ONE_WBC_BOX[0], ONE_WBC_BOX[3] - ONE_WBC_BOX[1])
    assert 0.7 < cell.diameter / true_diameter < 1.4
    assert cell.nucleus_area > 0 and cell.score > 0


def test_white_cell_beside_a_ring_of_red_cells_is_found_by_the_second_look(monkeypatch):
    """A Kaggle TRAIN image whose touching red cells enclose empty slide: filled as if it were pale red-cell centres,
    it made the red-cell radius 2-3x too large and the eosinophil too small to count (README there). The second
    look (off in the shipped pipeline) finds it."""
    rgb = field("kaggle_train_eosinophil_16_6740.jpeg")
    assert find_white_cells(rgb) == []  # as shipped
    monkeypatch.setattr(cells_module, "SECOND_LOOK", True)
    found = find_white_cells(rgb)
    assert len(found) == 1 and inside(found[0], KAGGLE_EOSINOPHIL_BOX)
    assert 0.7 < found[0].diameter / (KAGGLE_EOSINOPHIL_BOX[2] - KAGGLE_EOSINOPHIL_BOX[0]) < 1.4


def test_boxes_scale_with_the_image():
    small = field("bccd_00010_two_wbc.jpg")
    big = np.asarray(Image.fromarray(small).resize((960, 720), Image.Resampling.BILINEAR))
    for a, b in zip(find_white_cells(small), find_white_cells(big), strict=True):
        assert np.allclose(np.array(b.box) / 3, a.box, atol=6)


@pytest.mark.parametrize(
    "rgb",
    [
        np.full((240, 320, 3), 255, np.uint8),
        np.zeros((240, 320, 3), np.uint8),
        np.full((5, 5, 3), 128, np.uint8),
        field("bccd_00010_two_wbc.jpg")[:100],  # the top of the field: red cells only
        field("bccd_00001_one_wbc.jpg")[:120],
    ],
    ids=["white", "black", "tiny", "red-cells-a", "red-cells-b"],
)
def test_no_white_cell(rgb):
    assert find_white_cells(rgb) == []


@pytest.mark.parametrize(
    "rgb",
    [
        np.asarray(drawn_smear(rectangle=True)),
        np.asarray(drawn_smear(red_cells=(170, 200, 120))),
        np.clip(field("bccd_00001_one_wbc.jpg") + np.random.default_rng(0).normal(0, 40, (240, 320, 3)), 0, 255),
    ],
    ids=["violet-rectangle", "green-red-cells", "grainy"],
)
def test_not_a_smear_has_no_white_cell(rgb, monkeypatch):
    rgb = rgb.astype(np.uint8)
    assert find_white_cells(rgb) == []
    monkeypatch.setattr(cells_module, "SMEAR_CHECK", False)  # the smear check, not the drawing, removed the cell
    assert len(find_white_cells(rgb)) >= 1


def test_a_nucleus_cut_by_the_photos_edge_is_not_taken_for_a_rectangle():
    """Cut by the edge, a nucleus fills its clipped box: the rectangle test leaves it alone (a tight crop's cell)."""
    field = np.asarray(drawn_smear(rectangle=True))
    assert find_white_cells(field) == []
    assert len(find_white_cells(np.ascontiguousarray(field[:, :165]))) == 1


def test_a_drawn_smear_has_its_white_cell():
    found = find_white_cells(np.asarray(drawn_smear()))
    assert len(found) == 1 and inside(found[0], (135, 95, 185, 145))


def test_black_rotation_corners_are_not_cells():
    rgb = field("bccd_00001_one_wbc.jpg").copy()
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    rgb[(xx + yy < 90) | (xx - yy > 250)] = 0  # black wedges like Kaggle's rotated copies
    found = find_white_cells(rgb)
    assert len(found) == 1 and inside(found[0], ONE_WBC_BOX)


def test_huge_image_is_downscaled_first(monkeypatch):
    rgb = np.asarray(Image.fromarray(field("bccd_00001_one_wbc.jpg")).resize((4800, 3600), Image.Resampling.NEAREST))
    seen = []
    analyse = cells_module.analyse

    def spy(image):
        result = analyse(image)
        seen.append(result["small"].shape)
        return result

    monkeypatch.setattr(cells_module, "analyse", spy)
    found = find_white_cells(rgb)
    assert max(seen[0][:2]) <= cells_module.WORK_SIDE
    assert len(found) == 1 and inside(found[0], tuple(v * 15 for v in ONE_WBC_BOX))


def test_primary_index():
    assert primary_index([], (240, 320, 3)) is None
    cells = [Cell((0, 0, 40, 40), 100, 1.0), Cell((140, 100, 180, 140), 100, 1.0), Cell((280, 200, 320, 240), 100, 1.0)]
    assert primary_index(cells, (240, 320, 3)) == 1
    assert primary_index(cells[:1], (240, 320)) == 0


def test_canonical_crop_shape_centre_and_scale():
    rgb = field("bccd_00010_two_wbc.jpg")
    cell = Cell((100, 80, 160, 140), 100, 1.0)  # a 60 px cell well inside the field
    crop = canonical_crop(rgb, cell)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    side = round(CROP_SCALE * 60)
    expected = np.asarray(white_balance(
        Image.fromarray(rgb[110 - side // 2 : 110 + side // 2, 130 - side // 2 : 130 + side // 2])
        .resize((224, 224), Image.Resampling.BILINEAR), background_colour(rgb)))
    assert np.array_equal(crop, expected)
    assert canonical_crop(rgb, cell, size=64).shape == (64, 64, 3)


def test_canonical_crop_at_the_border_is_padded_with_background_not_black():
    rgb = field("bccd_00001_one_wbc.jpg")
    cell = find_white_cells(rgb)[0]  # touches the bottom edge
    crop = canonical_crop(rgb, cell)
    assert crop.shape == (224, 224, 3)
    bottom = crop[-10:].reshape(-1, 3).astype(int)
    assert np.abs(bottom.mean(axis=0) - SLIDE_WHITE).max() < 8  # the slide's colour, white-balanced
    assert bottom.min() > 100  # not black


def test_canonical_crop_is_white_balanced_against_the_slide():
    """A lab's colour cast (lamp, camera: here a yellow one) is gone from the crop; the stains' colours stay."""
    rgb = field("bccd_00001_one_wbc.jpg")
    cell = find_white_cells(rgb)[0]
    yellow = np.clip(rgb * np.array([1.0, 0.93, 0.72]), 0, 255).astype(np.uint8)
    plain, cast = canonical_crop(rgb, cell).astype(int), canonical_crop(yellow, cell).astype(int)
    assert np.abs(cast.mean(axis=(0, 1)) - plain.mean(axis=(0, 1))).max() < 3
    assert np.abs(cast - plain).mean() < 3
    unbalanced = np.asarray(Image.fromarray(yellow).resize((224, 224))).mean(axis=(0, 1))
    assert unbalanced[0] - unbalanced[2] > 30  # the cast was strong before
    assert np.median(plain[plain.sum(-1) > 600], axis=0) == pytest.approx([SLIDE_WHITE] * 3, abs=6)


def test_canonical_crop_fills_black_corners_with_background():
    rgb = field("bccd_00001_one_wbc.jpg").copy()
    rgb[:, :60] = 0
    crop = canonical_crop(rgb, Cell((40, 100, 140, 200), 100, 1.0))
    assert crop[:, :20].min() > 100


def _in_crop(box, cell: Cell, size: int = 224):
    """A box in the image's pixels -> the same box in the cell's canonical crop's pixels (rounded inwards)."""
    x0, y0, side = crop_window(cell.box)
    scale = size / side
    a0, b0, a1, b1 = box
    return (max(0, int(np.ceil((a0 - x0) * scale))), max(0, int(np.ceil((b0 - y0) * scale))),
            min(size, int((a1 - x0) * scale)), min(size, int((b1 - y0) * scale)))


def test_a_neighbouring_white_cell_is_hidden_in_the_crop_and_the_cell_itself_is_not(monkeypatch):
    """BloodImage_00010: each cell's square reaches the other cell's nucleus, which would decide its type."""
    monkeypatch.setattr(cells_module, "MASK_NEIGHBOURS", True)  # measured, not adopted (docs/training.md)
    rgb = field("bccd_00010_two_wbc.jpg")
    found = find_white_cells(rgb)
    assert len(found) == 2 and all(c.nucleus_box is not None for c in found)
    background = background_colour(rgb)
    for cell, other in (found, found[::-1]):
        alone = canonical_crop(rgb, cell, background=background).astype(int)
        masked = canonical_crop(rgb, cell, background=background, others=found).astype(int)
        a0, b0, a1, b1 = _in_crop(other.nucleus_box, cell)
        c0, d0, c1, d1 = _in_crop(cell.nucleus_box, cell)
        # the part of the neighbour's nucleus that is in the square and not in this cell's own nucleus box
        hidden = np.zeros((224, 224), bool)
        hidden[b0 + 2:b1 - 2, a0 + 2:a1 - 2] = True
        hidden[max(0, d0 - 2):d1 + 2, max(0, c0 - 2):c1 + 2] = False
        assert hidden.sum() > 200  # the neighbour really is in this cell's square
        assert np.abs(masked[hidden] - SLIDE_WHITE).max() <= 2  # flat slide colour (white-balanced)
        assert np.abs(alone[hidden] - SLIDE_WHITE).max() > 60  # where a stained nucleus was
        np.testing.assert_array_equal(masked[d0 + 2:d1 - 2, c0 + 2:c1 - 2], alone[d0 + 2:d1 - 2, c0 + 2:c1 - 2])


def test_the_field_s_crops_hide_neighbours_only_when_switched_on(monkeypatch):
    """Off (the shipped model's crops): each cell's plain crop. On: the same crops with the neighbours hidden."""
    from hematovision.imaging import prepare_field

    data = (FIELDS / "bccd_00010_two_wbc.jpg").read_bytes()
    rgb = field("bccd_00010_two_wbc.jpg")
    found = find_white_cells(rgb)
    plain = prepare_field(data).crops
    for crop, cell in zip(plain, found, strict=True):
        np.testing.assert_array_equal(crop, canonical_crop(rgb, cell))
    monkeypatch.setattr(cells_module, "MASK_NEIGHBOURS", True)
    for crop, cell in zip(prepare_field(data).crops, found, strict=True):
        np.testing.assert_array_equal(crop, canonical_crop(rgb, cell, others=found))
    assert not np.array_equal(prepare_field(data).crops, plain)


def test_a_cell_whose_box_overlaps_is_not_hidden_it_is_most_often_the_other_half_of_the_same_cell(monkeypatch):
    """The finder can split one cell's nucleus in two (LISC's eosinophils: two lobes): both halves stay in its crop."""
    monkeypatch.setattr(cells_module, "MASK_NEIGHBOURS", True)
    rgb = field("bccd_00010_two_wbc.jpg")
    cell = find_white_cells(rgb)[0]
    x0, y0, x1, y1 = cell.box
    half = Cell((x1 - 20, y0, x1 + 40, y1), 100, 1.0, (x1 - 10, y0 + 10, x1 + 30, y1 - 10))  # overlaps by 20 px
    apart = Cell((x1 + 2, y0, x1 + 62, y1), 100, 1.0, (x1 + 12, y0 + 10, x1 + 52, y1 - 10))  # touches nothing
    alone = canonical_crop(rgb, cell)
    np.testing.assert_array_equal(canonical_crop(rgb, cell, others=[cell, half]), alone)
    assert not np.array_equal(canonical_crop(rgb, cell, others=[cell, apart]), alone)
