"""A procedural 2D part-based dataset in the spirit of FunnyBirds.

Each image is a "bird" — an elliptical body with five part types (beak, eye ×2, wing ×2, tail,
foot ×2) — on a plain canvas with distractor clutter. A class is a unique tuple of part
*variants* (one variant per part type; a variant is a shape and a colour), so which parts decide
a class is known by construction. Every image comes with an integer part map drawn in the same
pass as the pixels (occlusion respected):

* 0 = canvas, 9 = body,
* 1 beak, 2/3 eyes, 4/5 wings, 6 tail, 7/8 feet (part instances),
* 100 + i = background object i.

Rendering is deterministic given `(class_id, image_seed, removed parts, removed background
objects)`, so interventions ("the same image without its tail") are made by re-rendering; no
files are involved. Drawing is vectorised numpy on the bounding box of each shape.

    >>> batch = generate(8, seed=0)            # images [8,64,64,3] uint8, labels, part maps
    >>> img, pmap = render(batch.scenes[0], removed=("tail",))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ...errors import SaliencyError

PART_TYPES = ("beak", "eye", "wing", "tail", "foot")
#: part-map ids of the instances of each part type
PART_IDS = {"beak": (1,), "eye": (2, 3), "wing": (4, 5), "tail": (6,), "foot": (7, 8)}
BODY_ID = 9
BG_BASE = 100
N_VARIANTS = 4
DEFAULT_SIZE = 64
DEFAULT_CLASSES = 10
CLASS_SEED = 1234

# Two colours per part type; variant v = (shape v // 2, colour v % 2), so neither the shape nor the
# colour alone identifies a variant.
PART_COLOURS = {
    "beak": ((255, 140, 0), (200, 30, 30)),
    "eye": ((20, 20, 20), (30, 60, 230)),
    "wing": ((40, 170, 60), (150, 60, 200)),
    "tail": ((240, 220, 30), (0, 170, 190)),
    "foot": ((230, 80, 170), (120, 70, 20)),
}
BODY_COLOUR = (150, 150, 150)
#: distractor colours: four not used by any part, plus one shared with a wing variant
BG_COLOURS = ((250, 190, 190), (180, 200, 255), (200, 240, 200), (110, 110, 80), (40, 170, 60))
BG_SHAPES = ("circle", "square", "triangle", "star", "bar")


def class_table(n_classes: int = DEFAULT_CLASSES, seed: int = CLASS_SEED) -> np.ndarray:
    """`[n_classes, 5]` variant ids (columns in `PART_TYPES` order): unique tuples, sampled with a
    seeded RNG, every two classes differing in at least 2 part types."""
    return _class_table(int(n_classes), int(seed)).copy()


@lru_cache(maxsize=16)
def _class_table(n_classes: int, seed: int) -> np.ndarray:
    """`[n_classes, 5]` variant ids (columns in `PART_TYPES` order): unique tuples, sampled with a
    seeded RNG, every two classes differing in at least 2 part types."""
    if not 2 <= n_classes <= 100:
        raise SaliencyError(f"n_classes must be in 2..100, got {n_classes}")
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    for _ in range(100000):
        cand = rng.integers(0, N_VARIANTS, len(PART_TYPES))
        if all((cand != r).sum() >= 2 for r in rows):
            rows.append(cand)
            if len(rows) == n_classes:
                return np.stack(rows)
    raise SaliencyError(f"could not sample {n_classes} classes differing in >= 2 parts")


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image."""
    class_id: int
    seed: int
    size: int = DEFAULT_SIZE
    n_classes: int = DEFAULT_CLASSES
    omitted: tuple = ()          # parts left out of this sample by the dataset (training augmentation)
    max_bg: int = 16


@dataclass
class PartsBatch:
    images: np.ndarray           # [N,H,W,3] uint8
    labels: np.ndarray           # [N] int64
    part_maps: np.ndarray        # [N,H,W] int16
    scenes: list = field(default_factory=list)

    def __len__(self):
        return len(self.labels)

    def part_masks(self) -> dict[str, np.ndarray]:
        """Per part type: `[N,H,W]` bool masks (instances of one type merged)."""
        return {p: np.isin(self.part_maps, PART_IDS[p]) for p in PART_TYPES}

    def region_masks(self) -> dict[str, np.ndarray]:
        """`named_regions` of every image: `[N,H,W]` bool masks."""
        return named_regions(self.part_maps)


def named_regions(part_map: np.ndarray) -> dict[str, np.ndarray]:
    """Everything a concept may sit on, by name: each part type, the body, the background objects
    and the empty canvas (bool masks of the part map's shape, [H,W] or [N,H,W])."""
    out = {p: np.isin(part_map, PART_IDS[p]) for p in PART_TYPES}
    out.update({"body": part_map == BODY_ID, "background object": part_map >= BG_BASE, "canvas": part_map == 0})
    return out


# ------------------------------------------------------------------------------ geometry
# Shapes are tested at pixel centres in a local frame (u, v), in units of the body half-length L.

def _convex(u, v, pts):
    pts = np.asarray(pts, float)
    inside = np.ones(u.shape, bool)
    e1, e2 = pts[1] - pts[0], pts[2] - pts[1]
    sign = np.sign(e1[0] * e2[1] - e1[1] * e2[0])
    for i in range(len(pts)):
        a, b = pts[i], pts[(i + 1) % len(pts)]
        inside &= sign * ((b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0])) >= 0
    return inside


def _segment(u, v, a, b, w):
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    t = np.clip(((u - a[0]) * d[0] + (v - a[1]) * d[1]) / float(d @ d), 0, 1)
    return (u - a[0] - t * d[0]) ** 2 + (v - a[1] - t * d[1]) ** 2 <= w * w


def _part_shapes(part: str, variant: int, side: float):
    """(test(u, v) -> bool, (u0, v0, radius) bounding circle) for one part instance."""
    shape = variant // 2
    if part == "beak":
        length, half = (0.55, 0.28) if shape == 0 else (0.95, 0.13)
        pts = [(0.9, -half), (0.9 + length, 0.0), (0.9, half)]
        return (lambda u, v: _convex(u, v, pts)), (0.9 + length / 2, 0.0, length / 2 + half + 0.05)
    if part == "eye":
        c = (0.5, 0.3 * side)
        if shape == 0:
            return (lambda u, v: (u - c[0]) ** 2 + (v - c[1]) ** 2 <= 0.24 ** 2), (*c, 0.3)
        return (lambda u, v: ((u - c[0]) ** 2 + (v - c[1]) ** 2 <= 0.3 ** 2)
                & ((u - c[0]) ** 2 + (v - c[1]) ** 2 > 0.14 ** 2)), (*c, 0.35)
    if part == "wing":
        if shape == 0:      # swept triangle
            pts = [(0.45, 0.5 * side), (-0.5, 1.55 * side), (-0.35, 0.5 * side)]
        else:               # broad quad
            pts = [(0.3, 0.5 * side), (0.15, 1.3 * side), (-0.45, 1.3 * side), (-0.35, 0.5 * side)]
        pts = pts if side > 0 else pts[::-1]
        return (lambda u, v: _convex(u, v, pts)), (0.0, 1.0 * side, 0.95)
    if part == "tail":
        half, rad = (np.deg2rad(18), 0.95) if shape == 0 else (np.deg2rad(50), 0.7)
        o = (-0.85, 0.0)

        def tail(u, v):
            du, dv = o[0] - u, v - o[1]
            r2 = du * du + dv * dv
            return (r2 <= rad * rad) & (np.abs(np.arctan2(dv, du)) <= half) & (du > 0)
        return tail, (o[0] - rad / 2, 0.0, rad / 2 + 0.75)
    if part == "foot":
        a, b = (-0.55, 0.55 * side), (-0.7, 1.3 * side)
        if shape == 0:      # leg with three claws
            segs = [(a, b), (b, (-0.95, 1.45 * side)), (b, (-0.7, 1.6 * side)), (b, (-0.45, 1.45 * side))]
        else:               # leg with a flat bar
            segs = [(a, b), ((-1.0, 1.3 * side), (-0.4, 1.3 * side))]

        def foot(u, v):
            out = np.zeros(u.shape, bool)
            for s, e in segs:
                out |= _segment(u, v, s, e, 0.09)
            return out
        return foot, (-0.7, 1.1 * side, 0.7)
    raise SaliencyError(f"unknown part {part!r}")


def _bg_shape(kind, u, v):
    if kind == "circle":
        return u * u + v * v <= 1
    if kind == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if kind == "triangle":
        return _convex(u, v, [(0, -1), (0.87, 0.5), (-0.87, 0.5)])
    if kind == "star":
        return _convex(u, v, [(0, -1), (0.87, 0.5), (-0.87, 0.5)]) | _convex(u, v, [(0, 1), (-0.87, -0.5), (0.87, -0.5)])
    return (np.abs(u) <= 1) & (np.abs(v) <= 0.25)       # bar


class _Canvas:
    def __init__(self, size, colour):
        self.size = size
        self.img = np.empty((size, size, 3), np.uint8)
        self.img[:] = colour
        self.pmap = np.zeros((size, size), np.int16)
        self.centres = np.arange(size, dtype=np.float64) + 0.5

    def paint(self, cx, cy, radius_px, cos, sin, scale, test, colour, label):
        """Paint `test(u, v)` where (u, v) = rotation of (x - cx, y - cy) / scale."""
        s = self.size
        x0, x1 = max(int(cx - radius_px), 0), min(int(np.ceil(cx + radius_px)) + 1, s)
        y0, y1 = max(int(cy - radius_px), 0), min(int(np.ceil(cy + radius_px)) + 1, s)
        if x0 >= x1 or y0 >= y1:
            return
        dx = (self.centres[x0:x1] - cx)[None, :]
        dy = (self.centres[y0:y1] - cy)[:, None]
        u = (dx * cos + dy * sin) / scale
        v = (-dx * sin + dy * cos) / scale
        m = test(u, v)
        self.img[y0:y1, x0:x1][m] = colour
        self.pmap[y0:y1, x0:x1][m] = label


def _layout(scene: Scene):
    """The random draws of a scene (independent of what is removed)."""
    rng = np.random.default_rng([scene.seed, 7919])
    s = scene.size
    n_bg = int(rng.integers(0, scene.max_bg + 1))
    bg = []
    for i in range(n_bg):
        bg.append(dict(kind=BG_SHAPES[int(rng.integers(len(BG_SHAPES)))], x=rng.uniform(0, s), y=rng.uniform(0, s),
                       r=rng.uniform(0.04, 0.09) * s, angle=rng.uniform(0, 2 * np.pi),
                       colour=BG_COLOURS[int(rng.integers(len(BG_COLOURS)))]))
    scale = rng.uniform(0.7, 1.3)
    L = 0.12 * scale * s
    reach = 1.9 * L
    cx, cy = rng.uniform(reach, s - reach, 2)
    angle = rng.uniform(0, 2 * np.pi)
    canvas = tuple(int(c) for c in rng.integers(215, 246, 3))
    return bg, L, cx, cy, angle, canvas


def render(scene: Scene, removed=(), removed_bg=()) -> tuple[np.ndarray, np.ndarray]:
    """Image `[H,W,3]` uint8 and part map `[H,W]` int16 of `scene` with the part types in `removed`
    and the background objects (indices) in `removed_bg` left out."""
    removed = set(removed) | set(scene.omitted)
    bad = removed - set(PART_TYPES)
    if bad:
        raise SaliencyError(f"unknown part type(s) {sorted(bad)}; parts are {', '.join(PART_TYPES)}")
    table = class_table(scene.n_classes)
    if not 0 <= scene.class_id < len(table):
        raise SaliencyError(f"class_id {scene.class_id} out of range 0..{len(table) - 1}")
    variants = dict(zip(PART_TYPES, (int(v) for v in table[scene.class_id])))
    bg, L, cx, cy, angle, canvas_colour = _layout(scene)
    cv = _Canvas(scene.size, canvas_colour)
    removed_bg = set(int(i) for i in removed_bg)
    for i, obj in enumerate(bg):
        if i in removed_bg:
            continue
        c, sn = np.cos(obj["angle"]), np.sin(obj["angle"])
        cv.paint(obj["x"], obj["y"], obj["r"] * 1.5, c, sn, obj["r"], lambda u, v, k=obj["kind"]: _bg_shape(k, u, v),
                 obj["colour"], BG_BASE + i)
    c, sn = np.cos(angle), np.sin(angle)
    cv.paint(cx, cy, 1.05 * L, c, sn, L, lambda u, v: u * u + (v / 0.62) ** 2 <= 1, BODY_COLOUR, BODY_ID)
    # drawing order = occlusion order: tail, feet, wings, beak, eyes (eyes lie on the body)
    for part in ("tail", "foot", "wing", "beak", "eye"):
        if part in removed:
            continue
        var = variants[part]
        colour = PART_COLOURS[part][var % 2]
        ids = PART_IDS[part]
        sides = (1.0, -1.0) if len(ids) == 2 else (1.0,)
        for pid, side in zip(ids, sides):
            test, (u0, v0, rad) = _part_shapes(part, var, side)
            px = cx + L * (u0 * c - v0 * sn)
            py = cy + L * (u0 * sn + v0 * c)
            cv.paint(px, py, rad * L + 1, c, sn, L, _shift(test, u0, v0), colour, pid)
    return cv.img, cv.pmap


def _shift(test, u0, v0):
    # `paint` centres (u, v) on the crop centre; shapes are defined in body coordinates
    return lambda u, v: test(u + u0, v + v0)


def scene_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])


def make_scenes(n: int, seed: int = 0, size: int = DEFAULT_SIZE, n_classes: int = DEFAULT_CLASSES,
                omit_prob: float = 0.0, max_bg: int = 16) -> list[Scene]:
    """`n` scenes with balanced classes (i % n_classes, shuffled by the seed). With `omit_prob`,
    that fraction of the scenes leave out 1-4 random part types (in-distribution interventions)."""
    if n < 1:
        raise SaliencyError(f"n must be >= 1, got {n}")
    if size < 32:
        raise SaliencyError(f"size must be >= 32 pixels, got {size}")
    if not 0 <= omit_prob <= 1:
        raise SaliencyError(f"omit_prob must be in [0, 1], got {omit_prob}")
    class_table(n_classes)
    rng = np.random.default_rng([int(seed), 104729])
    classes = rng.permutation(np.arange(n) % n_classes)
    scenes = []
    for i in range(n):
        omitted = ()
        if omit_prob and rng.random() < omit_prob:
            k = int(rng.integers(1, 5))
            omitted = tuple(sorted(rng.choice(PART_TYPES, k, replace=False).tolist()))
        scenes.append(Scene(int(classes[i]), scene_seed(seed, i), size, n_classes, omitted, max_bg))
    return scenes


def render_many(scenes, removed=(), removed_bg=()) -> PartsBatch:
    """Render a list of scenes (the same interventions for all, or one per scene when `removed` is
    a list of tuples of the same length)."""
    per_scene = isinstance(removed, list) and len(removed) == len(scenes)
    imgs, maps = [], []
    for j, sc in enumerate(scenes):
        img, pm = render(sc, removed[j] if per_scene else removed, removed_bg)
        imgs.append(img)
        maps.append(pm)
    return PartsBatch(np.stack(imgs), np.array([s.class_id for s in scenes], np.int64), np.stack(maps), list(scenes))


def generate(n: int, seed: int = 0, size: int = DEFAULT_SIZE, n_classes: int = DEFAULT_CLASSES,
             omit_prob: float = 0.0, max_bg: int = 16) -> PartsBatch:
    """`n` images with labels and part maps; the same arguments give the same arrays."""
    return render_many(make_scenes(n, seed, size, n_classes, omit_prob, max_bg))


def to_tensor(images: np.ndarray):
    """uint8 `[N,H,W,3]` -> float `[N,3,H,W]` normalised with mean = std = 0.5."""
    import torch

    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:   # a PIL image's buffer: torch wants memory it may write
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def labels(n_classes: int = DEFAULT_CLASSES) -> list[str]:
    """Class names spelling their variants, e.g. `bird03(beak1,eye0,wing2,tail3,foot1)`."""
    t = class_table(n_classes)
    return [f"bird{k:02d}(" + ",".join(f"{p}{v}" for p, v in zip(PART_TYPES, row)) + ")" for k, row in enumerate(t)]
