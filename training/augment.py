"""Training-time augmentation of canonical cell crops, in NumPy and Pillow on uint8 batches (any Keras backend;
cheap next to a training step), with one seeded generator.

What varies between labs and between two photos of one cell: orientation (any quarter-turn, mirror), a little
scale and centring (the cell finder's box is not exact), stain colour (haematoxylin/eosin amounts), brightness,
contrast, saturation and white balance, focus; some labs' cameras are close to grey. The cell's own shape and
texture are what stay, and what the network should learn. Cameras differ in resolution and compression too.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFilter

# Ruifrok & Johnston's haematoxylin / eosin / DAB optical densities (rows: stains, columns: R, G, B).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = (_RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)).astype(np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def place(image: np.ndarray, size: int, rng: np.random.Generator, min_scale: float) -> Image.Image:
    """A random square of `min_scale`..1 of the crop's side, anywhere inside it, resized to `size`."""
    side = image.shape[0]
    cut = int(round(side * rng.uniform(min_scale, 1.0)))
    x, y = rng.integers(0, side - cut + 1, size=2)
    picture = Image.fromarray(image).crop((int(x), int(y), int(x) + cut, int(y) + cut))
    return picture.resize((size, size), Image.Resampling.BILINEAR)


def colour(batch: np.ndarray, rng: np.random.Generator, stain: float, light: float, grey: float,
           contrast: float | None = None) -> np.ndarray:
    """Per-image stain jitter in optical-density space (Tellez et al. 2018), brightness / contrast / saturation /
    white balance, and a share `grey` of images turned grey. Contrast is scaled by 1 +- `contrast` (by default
    `light`, as brightness). float32 0-255 in and out."""
    n = len(batch)

    def factor(low, high, channels=1):
        return rng.uniform(low, high, (n, 1, 1, channels)).astype(np.float32)

    density = -np.log((batch + 1.0) / 256.0)
    stains = density @ _HED_FROM_RGB
    batch = 256.0 * np.exp(-((stains * factor(1 - stain, 1 + stain, 3) + factor(-stain, stain, 3)) @ _RGB_FROM_HED))
    batch -= 1.0
    grey_level = batch.mean(axis=-1, keepdims=True)
    batch = grey_level + (batch - grey_level) * factor(1 - 2 * light, 1 + light)
    mean = batch.mean(axis=(1, 2, 3), keepdims=True)
    spread = light if contrast is None else contrast
    batch = mean + (batch - mean) * factor(1 - spread, 1 + spread)
    batch *= factor(1 - light, 1 + light) * factor(1 - light / 3, 1 + light / 3, 3)
    to_grey = rng.random(n) < grey
    batch[to_grey] = batch[to_grey].mean(axis=-1, keepdims=True)
    return np.clip(batch, 0.0, 255.0, out=batch)


def stain_templates(crops: np.ndarray, sample: int = 1000) -> np.ndarray:
    """(4, 3): over up to `sample` of the crops (evenly spaced), the mean and the spread of each image's CIELAB
    channel means, then of its channel spreads: the distribution restain() draws a lab's colours from."""
    from skimage.color import rgb2lab

    picked = crops[np.linspace(0, len(crops) - 1, min(sample, len(crops))).astype(int)]
    lab = np.stack([rgb2lab(image) for image in picked])
    means, spreads = lab.mean(axis=(1, 2)), lab.std(axis=(1, 2))
    return np.stack([means.mean(0), means.std(0), spreads.mean(0), spreads.std(0)]).astype(np.float32)


def restain(batch: np.ndarray, rng: np.random.Generator, templates: np.ndarray, share: float) -> np.ndarray:
    """A share of the images moved, channel by channel in CIELAB (Reinhard et al. 2001), to a mean and spread drawn
    from `templates` (stain_templates()): each becomes the same cells as another lab might have stained and
    photographed them. float32 0-255 in and out."""
    from skimage.color import lab2rgb, rgb2lab

    for i in np.flatnonzero(rng.random(len(batch)) < share):
        lab = rgb2lab(batch[i] / 255.0)
        mean, spread = lab.mean(axis=(0, 1)), lab.std(axis=(0, 1)) + 1e-3
        new_mean = rng.normal(templates[0], templates[1])
        new_spread = np.maximum(rng.normal(templates[2], templates[3]), 0.25 * templates[2])
        with warnings.catch_warnings():  # lab2rgb clips out-of-gamut colours, and says so for every image
            warnings.simplefilter("ignore", UserWarning)
            batch[i] = 255.0 * lab2rgb((lab - mean) / spread * new_spread + new_mean)
    return batch


def coarse(picture: Image.Image, rng: np.random.Generator, most: float = 3.5) -> Image.Image:
    """The picture as a lower-resolution camera would give it: 1.5-`most` x fewer pixels per side, JPEG-compressed
    at quality 40-90, then enlarged back (a small crop from another lab is upscaled the same way by the cell crop)."""
    size = picture.size[0]
    small = max(16, round(size / rng.uniform(1.5, most)))
    buffer = io.BytesIO()
    picture.resize((small, small), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=int(rng.integers(40, 91)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def augment(crops: np.ndarray, size: int, rng: np.random.Generator, *, min_scale: float = 0.85,
            stain: float = 0.08, light: float = 0.15, grey: float = 0.0, blur: float = 0.2,
            lowres: float = 0.0, contrast: float | None = None, restained: float = 0.0,
            templates: np.ndarray | None = None, lowres_most: float = 3.5) -> np.ndarray:
    """(N, H, W, 3) uint8 crops -> (N, size, size, 3) float32 0-255 augmented copies; a share `lowres` of them
    through coarse() (up to `lowres_most` x fewer pixels per side), a share `restained` through restain() with
    `templates` before the colour jitter."""
    out = np.empty((len(crops), size, size, 3), np.float32)
    for i, image in enumerate(crops):
        picture = place(image, size, rng, min_scale)
        if rng.random() < lowres:
            picture = coarse(picture, rng, lowres_most)
        elif rng.random() < blur:
            picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * size / 224))
        array = np.rot90(np.asarray(picture), k=int(rng.integers(4)))
        out[i] = array[:, ::-1] if rng.random() < 0.5 else array
    if restained:
        out = restain(out, rng, templates, restained)
    return colour(out, rng, stain, light, grey, contrast)
