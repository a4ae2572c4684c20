"""Find the white blood cells in a smear photo, and cut the one canonical crop the classifier sees.

No Flask, no TensorFlow: numpy, scipy.ndimage, scikit-image and Pillow only.

How a white cell is found (all on a copy whose longest side is about ``WORK_SIDE`` pixels):

1. Black rotation borders (max channel < ``BLACK_LEVEL``) are not slide; the background colour is the median of the
   brightest slide pixels. Every pixel is white-balanced against it and turned into optical density (OD) per channel,
   which removes the lab's illumination and the pale/grey/beige background.
2. Nucleus stain: ``log(B / G)`` after white balance, i.e. OD(green) - OD(blue). Nuclei (violet, dark purple, magenta)
   absorb green but pass blue: 0.5-1.2 in all three labs; red cells sit near 0 (pink, beige) or ~0.2 (LISC's
   bluish red cells); background 0. Hysteresis threshold ``NUCLEUS_LOW`` / ``NUCLEUS_HIGH``, raised to stay
   ``LEVEL_MARGIN_LOW`` / ``LEVEL_MARGIN_HIGH`` above the red cells' own median level in this image.
3. Size reference: the red-cell radius, measured in the image, from the distance transform of the stained,
   non-nucleus mask (holes filled: pale red-cell centres). Everything after is in units of it, so the
   3x magnification differences between labs do not matter. (With SECOND_LOOK, off, an image where no white cell
   is found gets a second reading of the radius with only pale-centre-sized holes filled.)
4. Lobes of one nucleus (neutrophils: 2-5) are grouped when their gaps are below ``LOBE_GAP`` red-cell radii;
   a group is a white cell when its nucleus area is at least ``MIN_NUCLEUS_AREA`` red-cell areas (a platelet is
   ~0.1; a small lymphocyte's nucleus ~0.8).
5. The whole cell (nucleus + cytoplasm estimate) is the nucleus group's box grown by ``CYTOPLASM_MARGIN``
   red-cell radii on each side, mapped back to the given image's pixels.
6. Is it a stained smear at all? A photo, a screenshot, a page of text or noise can hold violet blobs too. No white
   cell is found in an image whose red cells are not red (their stain level below ``SMEAR_LEVEL_MIN``: the photo's
   "red cells" are green, yellow or blue) or whose empty slide is grainier than a microscope camera's
   (``SMEAR_NOISE_MAX``). A nucleus group inside the photo that fills its box like a rectangle
   (``RECTANGLE_EXTENT``: a button, a bar; a disc fills pi/4 of its box, a lobed nucleus less; one cut by the
   photo's edge can fill its clipped box) is not a white cell, and an image where at least half
   the groups are rectangles is not a smear. What it costs on three labs' images, and the margins it keeps, is
   measured by training/experiments/measure_smear_check.py.

The canonical crop is centred on the cell box's centre, with side ``CROP_SCALE`` x the cell diameter (the larger side
of the cell box), padded with the background colour where it leaves the photo, resized with Pillow bilinear, then
white-balanced: each channel scaled so that the slide background is the same neutral grey in every lab.
With MASK_NEIGHBOURS (off: measured, not adopted) the image's other white cells are hidden in it (their nucleus
boxes, outside this cell's own nucleus box, show the background colour), as a neighbour's nucleus in the square can
decide the type (BloodImage_00010's neutrophil read as its neighbour, an eosinophil;
training/experiments/measure_neighbours.py). A cell whose box overlaps this one's is never hidden: that is most
often the other half of this very cell, its nucleus split in two by the finder.
With CROP_SCALE = 2 the cell spans about half the crop: on the 372 annotated BCCD white cells the detected diameter is
1.005x the annotated box's larger side (median; p10 0.86, p90 1.16), i.e. the true cell is 43-58% of the crop side.
Measured by training/experiments/measure_detection.py (results/detection.json).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import filters

WORK_SIDE = 200  # detection runs on a copy with the longest side <= this (then boxes are mapped back)
BLACK_LEVEL = 40  # max(R, G, B) below this: rotation border / outside the photo, not slide
NUCLEUS_LOW = 0.30  # OD(G) - OD(B) hysteresis thresholds of nucleus stain
NUCLEUS_HIGH = 0.45
LEVEL_MARGIN_LOW = 0.15  # ... and at least this much above the red cells' own level
LEVEL_MARGIN_HIGH = 0.25
DENSITY_MIN = 0.15  # total OD above which a pixel is stained (a red cell), at least; Otsu decides above it
LOBE_GAP = 0.75  # nucleus pieces closer than this many red-cell radii belong to one cell
MIN_NUCLEUS_AREA = 0.6  # a cell's nucleus covers at least this many red-cell areas
CYTOPLASM_MARGIN = 0.5  # the cell box is the nucleus box grown by this many red-cell radii per side
CROP_SCALE = 2.0  # crop side = CROP_SCALE * cell diameter (larger side of the cell box): the cell is ~50% of it
SLIDE_WHITE = 235.0  # every crop is white-balanced so that its slide background is this neutral grey
GAIN_LIMITS = (0.6, 1.8)  # per-channel white-balance gains stay in this range (a mis-read background stays harmless)
SMEAR_LEVEL_MIN = -0.3  # the red cells' stain level (above) in a stained smear is at least this
SMEAR_NOISE_MAX = 25.0  # median |Laplacian| of the empty slide's grey levels (work copy) in a microscope photo
RECTANGLE_EXTENT = 0.9  # nucleus pixels / nucleus box: at or above, a rectangle, not a nucleus
RECTANGLE_MIN_SIDE = 6  # work pixels: a smaller group has too few pixels to have a shape
SMEAR_CHECK = True  # step 6 (off only to measure what it changes)
# Off: measured (docs/training.md, "A neighbouring white cell") and not adopted for the shipped model.
MASK_NEIGHBOURS = False  # crops hide the image's other white cells (their nucleus boxes)
# Off: measured (docs/training.md, "A second look for missed cells") and not adopted for the shipped model.
SECOND_LOOK = False  # where no white cell is found, read the red-cell radius again with only pale centres filled
PALE_CENTRE = 0.5  # a red cell's pale centre spans at most this share of its radius; larger holes are empty slide
RESAMPLE = Image.Resampling.BILINEAR  # as hematovision.imaging


@dataclass(frozen=True)
class Cell:
    """One white blood cell.

    box: xmin, ymin, xmax, ymax of the whole cell (nucleus + cytoplasm estimate) in the given image's pixels
    (xmax/ymax exclusive). nucleus_area: nucleus pixels, in the given image's pixels. score: nucleus area in red-cell
    areas (how clearly this is a white cell rather than a platelet). nucleus_box: the box of the nucleus alone
    (what another cell's crop hides of this one).
    """

    box: tuple[int, int, int, int]
    nucleus_area: int
    score: float
    nucleus_box: tuple[int, int, int, int] | None = None  # None: use the whole box

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def diameter(self) -> int:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0)


def downscale(rgb: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """A copy with the longest side <= side: numpy striding for huge images, then Pillow's box-filter reduce."""
    factor = math.ceil(max(rgb.shape[:2]) / side)
    if factor <= 1:
        return np.ascontiguousarray(rgb)
    stride = max(1, factor // 2)  # striding first keeps a 40 MP image cheap; reduce still averages 2x2+ pixels
    small = np.ascontiguousarray(rgb[::stride, ::stride])
    factor = math.ceil(max(small.shape[:2]) / side)
    return np.asarray(Image.fromarray(small).reduce(factor)) if factor > 1 else small


def channel_max(pixels: np.ndarray) -> np.ndarray:
    """Max over the last axis (R, G, B): the same as .max(axis=-1), several times faster on numpy's small last axis."""
    return np.maximum(np.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])


def channel_sum(pixels: np.ndarray) -> np.ndarray:
    """R + G + B, in that order: the same as .sum(axis=-1), several times faster."""
    return pixels[..., 0] + pixels[..., 1] + pixels[..., 2]


def _slide(small: np.ndarray) -> np.ndarray:
    """Pixels of the photographed slide (not black rotation borders), shrunk off the border's blurred edge."""
    valid = channel_max(small) >= BLACK_LEVEL
    if valid.all():
        return valid
    return ndi.binary_erosion(valid, iterations=2, border_value=1)


def background_colour(rgb: np.ndarray, small: np.ndarray | None = None) -> np.ndarray:
    """The empty-slide colour: median of the brightest tenth of the non-black pixels (float RGB, 3 values).
    A large image is read on its downscale(rgb) copy: `small`, when the caller already has it."""
    if max(rgb.shape[:2]) <= 2 * WORK_SIDE:
        small = rgb
    elif small is None:
        small = downscale(rgb)
    pixels = small.reshape(-1, 3)
    valid = channel_max(pixels) >= BLACK_LEVEL
    if not valid.all():
        pixels = rows(pixels, valid)
    if len(pixels) == 0:
        return np.array([255.0, 255.0, 255.0])
    brightness = channel_sum(pixels.astype(np.int32))
    return np.median(rows(pixels, brightness >= np.percentile(brightness, 90)), axis=0).astype(np.float64)


def rows(pixels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """pixels[keep] for (N, 3) pixels and an (N,) mask: the same rows, ~4x faster than boolean indexing."""
    return pixels.take(np.flatnonzero(keep), axis=0)


def _red_cell_radius(stained: np.ndarray, fallback: float, pale_centre_of: float | None = None) -> float:
    """Typical red-cell radius (work pixels), from the distance transform's local maxima on the stained non-nucleus
    mask with holes filled (pale red-cell centres). Touching red cells still peak at their centres. On BCCD it reads
    ~0.8x the radius of the annotated red-cell boxes (which include overlaps), p90/p10 spread 1.3.

    With `pale_centre_of` (a first reading of the radius), only the holes up to a pale centre of that radius
    (PALE_CENTRE of it) are filled: see _cells for when."""
    holes, count = ndi.label(~stained)
    hole = np.ones(count + 1, bool)  # binary_fill_holes, but one labelling instead of many dilations
    hole[np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])] = False  # touches the border: not a hole
    if pale_centre_of is not None:
        hole &= np.bincount(holes.ravel(), minlength=count + 1) <= math.pi * (PALE_CENTRE * pale_centre_of) ** 2
    filled = stained | hole[holes]
    dist = ndi.distance_transform_edt(filled)
    values = dist[(dist == ndi.maximum_filter(dist, size=5)) & (dist >= 2)]
    if len(values) < 3:
        return fallback
    # Low peaks along ragged edges outnumber the red-cell centres: keep the peaks at least half the 95th percentile.
    return float(np.median(values[values >= 0.5 * np.percentile(values, 95)]))


def analyse(rgb: np.ndarray) -> dict | None:
    """The detector's intermediate results on the work copy (for find_white_cells and for tuning); None: no slide."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 8:
        return None
    small = downscale(rgb)
    slide = _slide(small)
    if slide.sum() < 64:
        return None
    pixels = small.astype(np.float32) + 1.0
    bright = channel_sum(pixels)
    top = bright >= np.percentile(bright[slide], 90)
    background = np.median(rows(pixels.reshape(-1, 3), (slide & top).ravel()), axis=0)
    od = np.log(np.maximum(background / pixels, 1e-3))  # optical density against the empty slide
    stain = np.where(slide, od[..., 1] - od[..., 2], 0.0)
    density = np.where(slide, channel_sum(od), 0.0)
    seeds = stain > NUCLEUS_HIGH
    others = slide & ~ndi.binary_dilation(seeds, iterations=2)
    level = 0.0
    if others.sum() >= 64:
        cut = max(DENSITY_MIN, filters.threshold_otsu(density[others]))
        stained = others & (density > cut)
    else:
        stained = others
    if stained.sum() >= 64:
        level = float(np.median(stain[stained]))  # the red cells' own nucleus-stain level (LISC: ~0.2)
    low = max(NUCLEUS_LOW, level + LEVEL_MARGIN_LOW)
    high = max(NUCLEUS_HIGH, level + LEVEL_MARGIN_HIGH)
    nucleus = filters.apply_hysteresis_threshold(stain, low, high)
    radius = _red_cell_radius(stained & ~nucleus, fallback=max(small.shape[:2]) / 20)
    empty = others & ~stained
    grain = 0.0
    if empty.sum() >= 64:
        grey = channel_sum(small.astype(np.float32)) / 3
        grain = float(np.median(np.abs(ndi.laplace(grey))[empty]))
    return {"small": small, "slide": slide, "stain": stain, "density": density, "stained": stained,
            "nucleus": nucleus, "radius": radius, "level": level, "thresholds": (low, high), "grain": grain}


def is_smear(found: dict) -> bool:
    """Whether analyse()'s results look like a stained blood smear photographed through a microscope (step 6)."""
    return found["level"] >= SMEAR_LEVEL_MIN and found["grain"] <= SMEAR_NOISE_MAX


def find_white_cells(rgb: np.ndarray) -> list[Cell]:
    """Every white blood cell in an HxWx3 uint8 RGB image, sorted top to bottom, then left to right (box centres)."""
    return _cells(rgb, analyse(rgb))


def survey(rgb: np.ndarray) -> tuple[list[Cell], np.ndarray | None]:
    """find_white_cells(rgb), and the slide's colour as background_colour(rgb) gives it (None when there is no
    cell to crop), from one downscaled copy of the image."""
    found = analyse(rgb)
    cells = _cells(rgb, found)
    if not cells:
        return cells, None
    return cells, background_colour(rgb, found["small"])


def _cells(rgb: np.ndarray, found: dict | None) -> list[Cell]:
    if found is None or not found["nucleus"].any() or (SMEAR_CHECK and not is_smear(found)):
        return []
    cells = _cells_at(rgb, found, found["radius"])
    if not cells and SECOND_LOOK:
        # A second look where none was found: a ring of touching red cells encloses empty slide, and filling it as
        # if it were a pale centre read the radius 2-3x too large, so the white cell's nucleus looked smaller than
        # one red cell. Read again with only pale-centre-sized holes filled; a smaller radius gets a second pass.
        radius = _red_cell_radius(found["stained"] & ~found["nucleus"], found["radius"], found["radius"])
        if radius < found["radius"]:
            cells = _cells_at(rgb, found, radius)
    return cells


def nucleus_groups(nucleus: np.ndarray, radius: float):
    """(slices, nucleus area) of each group of nucleus pieces (lobes closer than LOBE_GAP red-cell radii) large
    enough to be a white cell's nucleus (MIN_NUCLEUS_AREA red-cell areas), in work-copy pixels."""
    groups, _ = ndi.label(ndi.binary_dilation(nucleus, iterations=max(1, round(LOBE_GAP * radius / 2))))
    groups = np.where(nucleus, groups, 0)
    least = MIN_NUCLEUS_AREA * (math.pi * radius**2)
    for index, where in enumerate(ndi.find_objects(groups), start=1):
        if where is not None:
            area = int((groups[where] == index).sum())
            if area >= least:
                yield where, area


def _cells_at(rgb: np.ndarray, found: dict, radius: float) -> list[Cell]:
    small = found["small"]
    rbc_area = math.pi * radius**2
    sy = rgb.shape[0] / small.shape[0]
    sx = rgb.shape[1] / small.shape[1]
    margin = CYTOPLASM_MARGIN * radius
    cells = []
    rectangles = 0
    for where, area in nucleus_groups(found["nucleus"], radius):
        ys, xs = where
        height, width = ys.stop - ys.start, xs.stop - xs.start
        # A shape needs pixels to show (a speck of a few pixels fills its box), and a nucleus cut by the photo's
        # edge fills its clipped box: only a group of some size inside the photo can be a rectangle.
        shaped = min(height, width) >= RECTANGLE_MIN_SIDE and ys.start > 0 and xs.start > 0 and \
            ys.stop < small.shape[0] and xs.stop < small.shape[1]
        if SMEAR_CHECK and shaped and area >= RECTANGLE_EXTENT * height * width:
            rectangles += 1
            continue
        x0 = max(0, math.floor((xs.start - margin) * sx))
        y0 = max(0, math.floor((ys.start - margin) * sy))
        x1 = min(rgb.shape[1], math.ceil((xs.stop + margin) * sx))
        y1 = min(rgb.shape[0], math.ceil((ys.stop + margin) * sy))
        nucleus_box = (math.floor(xs.start * sx), math.floor(ys.start * sy), math.ceil(xs.stop * sx),
                       math.ceil(ys.stop * sy))
        cells.append(Cell((x0, y0, x1, y1), round(area * sx * sy), round(area / rbc_area, 3), nucleus_box))
    if rectangles and rectangles >= len(cells):  # at least half the groups are rectangles: a screenshot
        return []
    return sorted(cells, key=lambda c: (c.centre[1], c.centre[0]))


def primary_index(cells: list[Cell], shape: tuple[int, ...]) -> int | None:
    """Index of the cell whose box centre is nearest the centre of an image of this shape (H, W, ...); None if none."""
    if not cells:
        return None
    cy, cx = shape[0] / 2, shape[1] / 2
    return min(range(len(cells)), key=lambda i: (cells[i].centre[0] - cx) ** 2 + (cells[i].centre[1] - cy) ** 2)


def crop_window(box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """(x0, y0, side): the square of the image that a cell's canonical crop shows (CROP_SCALE x the cell's
    diameter, centred on its box), in the image's pixels; it may reach past the edges."""
    x0, y0, x1, y1 = box
    side = max(1, round(CROP_SCALE * max(x1 - x0, y1 - y0)))
    return round((x0 + x1) / 2 - side / 2), round((y0 + y1) / 2 - side / 2), side


def canonical_crop(rgb: np.ndarray, cell: Cell, size: int = 224, background: np.ndarray | None = None,
                   others: Sequence[Cell] = ()) -> np.ndarray:
    """(size, size, 3) uint8: a square of side CROP_SCALE x cell.diameter centred on the cell box, resized with
    Pillow bilinear. Where it leaves the photo, and on black rotation borders, it shows the background colour
    (`background`, else background_colour(rgb): pass it when cropping several cells of one image).
    `others`: the image's other white cells; with MASK_NEIGHBOURS the nucleus boxes of those whose cell box does not
    overlap this one's (outside this cell's own nucleus box) show the background colour too, so that a neighbour's
    nucleus cannot decide this cell's type."""
    height, width = rgb.shape[:2]
    x0, y0, side = crop_window(cell.box)
    x1, y1 = x0 + side, y0 + side
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    colour = np.round(background_colour(rgb) if background is None else background).astype(np.uint8)
    if (ix0, iy0, ix1, iy1) == (x0, y0, x1, y1):  # inside the photo: nothing to pad
        canvas = window = rgb[y0:y1, x0:x1]
    else:
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[0] = colour  # one row, then whole rows: broadcasting 3 values over the canvas is ~50x slower
        canvas[1:] = canvas[0]
        window = canvas[max(0, iy0 - y0) : max(0, iy1 - y0), max(0, ix0 - x0) : max(0, ix1 - x0)]
        if window.size:
            window[:] = rgb[iy0:iy1, ix0:ix1]
    if window.size and window.min() < BLACK_LEVEL:  # a black pixel needs all three channels below BLACK_LEVEL
        # black rotation borders look like empty slide too (per-channel compares: a max over the last axis is slow)
        if canvas is window:
            canvas = window = window.copy()
        red, green, blue = window[..., 0], window[..., 1], window[..., 2]
        window[(red < BLACK_LEVEL) & (green < BLACK_LEVEL) & (blue < BLACK_LEVEL)] = colour
    neighbours = [o.nucleus_box or o.box for o in others if o.box != cell.box and not _overlap(o.box, cell.box)
                  ] if MASK_NEIGHBOURS else []
    neighbours = [(a0 - x0, b0 - y0, a1 - x0, b1 - y0) for a0, b0, a1, b1 in neighbours
                  if a0 < x1 and a1 > x0 and b0 < y1 and b1 > y0]  # in canvas pixels, only those in the square
    if neighbours:
        if canvas is window:
            canvas = canvas.copy()
        own_box = cell.nucleus_box or cell.box
        c0, d0, c1, d1 = (max(0, v) for v in (own_box[0] - x0, own_box[1] - y0, own_box[2] - x0, own_box[3] - y0))
        own = canvas[d0:d1, c0:c1].copy()  # where they overlap, this cell's own nucleus wins
        for a0, b0, a1, b1 in neighbours:
            canvas[max(0, b0):max(0, b1), max(0, a0):max(0, a1)] = colour
        canvas[d0:d1, c0:c1] = own
    image = Image.fromarray(np.ascontiguousarray(canvas))
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    return np.asarray(white_balance(image, colour))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Do two cell boxes share pixels? Boxes reach CYTOPLASM_MARGIN red-cell radii past their nuclei, so two cells
    whose nuclei are closer than about a red-cell radius overlap: most often one cell whose lobes the finder split
    (LOBE_GAP), whose other half must stay in its crop."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def white_balance(image: Image.Image, background: np.ndarray) -> Image.Image:
    """The RGB image with each channel scaled so that the slide's `background` colour becomes neutral SLIDE_WHITE
    grey: the colour cast of a lab's lamp, camera and mounting medium (grey, peach, yellow) is gone before the
    network sees the cell; the stains' own colours stay."""
    gain = np.clip(SLIDE_WHITE / np.maximum(np.asarray(background, np.float32), 1.0), *GAIN_LIMITS)
    levels = np.arange(256, dtype=np.float32)
    table = np.clip(levels[None, :] * gain[:, None] + 0.5, 0, 255).astype(np.uint8)  # a lookup table per channel
    return image.point(table.ravel().tolist())
