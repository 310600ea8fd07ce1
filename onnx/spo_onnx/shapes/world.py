"""The shapes world: one shape on a uniform background, its caption, the
held-out (fg, bg) pairs and a small pixel judge.

Images are 128x128 RGB uint8. Shapes: circle, square (axis-aligned) and
triangle (isosceles, upright, base at the bottom), 35-60% of the side, at a
random position fully inside the image. Colours are the exact RGB values of
`COLOURS`; foreground and background always differ. Captions:
`a {fg} {shape} on a {bg} background`.

The judge (`judge`): background = the per-channel median of the image
border (a 4-pixel band 3 pixels in from the edge, as decoders may leave a
thin frame at the very edge); foreground = the pixels far from the background
(RGB distance > 50; the outer 3 pixels ignored);
colours = the nearest palette entry to the background median and to the
median of the foreground pixels; shape = the fill ratio of the foreground's
bounding box (square ~1 above 0.90, circle ~pi/4 above 0.69, triangle
~1/2, about 0.6 once its apex rows are trimmed). The bounding box only
counts rows and columns holding at least 10% of the widest row's (column's)
foreground pixels, so thin streaks along the edges do not widen it.
"""

import numpy as np

from ..export.preference import COLOURS

SIZE = 128
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
# held out of training for every shape: fg -> bg
HELD_OUT = (
    ("red", "white"), ("blue", "yellow"), ("green", "black"), ("yellow", "blue"),
    ("white", "red"), ("black", "orange"), ("purple", "green"), ("orange", "purple"),
)
SIZE_RANGE = (0.35, 0.60)
FG_THRESHOLD = 50.0
MARGIN = 3  # pixels at the very edge the judge ignores
BAND = 4  # width of the border band the background is read from
SUPERSAMPLE = 4


def caption(fg, shape, bg):
    return f"a {fg} {shape} on a {bg} background"


def all_pairs():
    return [(f, b) for f in COLOUR_NAMES for b in COLOUR_NAMES if f != b]


def seen_pairs():
    held = set(HELD_OUT)
    return [p for p in all_pairs() if p not in held]


def is_held_out(fg, bg):
    return (fg, bg) in set(HELD_OUT)


def coverage(shape, x0, y0, s, size=SIZE, ss=SUPERSAMPLE):
    """Fraction of each pixel inside the shape (box-filtered supersampling);
    the shape's bounding box is [x0, x0+s] x [y0, y0+s] in pixel units."""
    n = size * ss
    c = (np.arange(n, dtype=np.float32) + 0.5) / ss
    x, y = c[None, :], c[:, None]
    if shape == "circle":
        r = s / 2
        inside = (x - x0 - r) ** 2 + (y - y0 - r) ** 2 <= r * r
    elif shape == "square":
        inside = (x >= x0) & (x <= x0 + s) & (y >= y0) & (y <= y0 + s)
    elif shape == "triangle":
        # apex (x0+s/2, y0), base from (x0, y0+s) to (x0+s, y0+s)
        half = (y - y0) / 2  # half-width at height y
        inside = (y >= y0) & (y <= y0 + s) & (np.abs(x - x0 - s / 2) <= half)
    else:
        raise ValueError(shape)
    return inside.astype(np.float32).reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(fg, shape, bg, rng, size=SIZE):
    """One image (uint8 [size,size,3]); `rng` a numpy Generator draws the
    size and position."""
    s = rng.uniform(*SIZE_RANGE) * size
    x0 = rng.uniform(0, size - s)
    y0 = rng.uniform(0, size - s)
    a = coverage(shape, x0, y0, s, size)[..., None]
    img = a * np.array(COLOURS[fg], np.float32) + (1 - a) * np.array(COLOURS[bg], np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def sample(rng, pairs=None):
    """(fg, shape, bg) drawn uniformly from `pairs` (default: the seen pairs)."""
    pairs = pairs or seen_pairs()
    fg, bg = pairs[rng.integers(len(pairs))]
    return fg, SHAPES[rng.integers(len(SHAPES))], bg


def nearest_colour(rgb):
    return COLOUR_NAMES[int(np.argmin(((PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(-1)))]


def _background(img):
    """(background RGB, foreground mask [H,W]): the median of the border band
    (rows and columns MARGIN to MARGIN+BAND-1 from each edge; decoders leave
    a one- or two-pixel frame at the very edge), and the pixels farther than
    FG_THRESHOLD from it, the outer MARGIN pixels excluded."""
    img = np.asarray(img, np.float32)[..., :3]
    m = MARGIN
    inner = img[m:-m, m:-m]
    band = np.concatenate([inner[:BAND].reshape(-1, 3), inner[-BAND:].reshape(-1, 3),
                           inner[BAND:-BAND, :BAND].reshape(-1, 3), inner[BAND:-BAND, -BAND:].reshape(-1, 3)])
    bg_rgb = np.median(band, axis=0)
    mask = np.zeros(img.shape[:2], bool)
    mask[m:-m, m:-m] = np.sqrt(((inner - bg_rgb) ** 2).sum(-1)) > FG_THRESHOLD
    return bg_rgb, mask


def _extent(counts, frac=0.1):
    idx = np.nonzero(counts >= max(1.0, frac * counts.max()))[0]
    return idx[0], idx[-1] + 1


def judge(img):
    """(fg, shape, bg) read from an image (uint8 or float 0-255, [H,W,3]);
    fg and shape are None when no foreground is found."""
    bg_rgb, mask = _background(img)
    bg = nearest_colour(bg_rgb)
    if mask.sum() < 16:
        return None, None, bg
    fg = nearest_colour(np.median(img[mask], axis=0))
    r0, r1 = _extent(mask.sum(1))
    c0, c1 = _extent(mask.sum(0))
    fill = mask[r0:r1, c0:c1].mean()
    shape = "square" if fill > 0.90 else "circle" if fill > 0.69 else "triangle"
    return fg, shape, bg


def fill_ratio(img):
    _, mask = _background(img)
    r0, r1 = _extent(mask.sum(1))
    c0, c1 = _extent(mask.sum(0))
    return float(mask[r0:r1, c0:c1].mean())
