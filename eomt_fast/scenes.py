"""Deterministic generated panoptic scenes: textured "stuff" backgrounds with overlapping "thing" shapes.

They train and evaluate the bundled default model (``tools/train_default_model.py``, ``eomt-fast
evaluate``) without any downloaded data. ``make_scene(index, seed)`` depends only on its arguments (numpy's
PCG64 seeded with ``[seed, index]``), so a held-out set is just another seed.

A scene is a square RGB image with:
- one or two stuff regions (split by a random straight line), each filled with a two-colour texture of
  its class: stripes (random angle and period), checker (random cell size) or dots (jittered grid);
- one to five things drawn on top in order (circle, square, triangle, star; random solid colour, size,
  position and rotation; radius ``THING_RADIUS`` of the image side). A placement that would leave an
  earlier thing less than ``MIN_VISIBLE_FRACTION`` visible, or a thing with fewer than ``MIN_THING_AREA``
  pixels, is drawn again, so every thing stays recognisable.
Ground truth is COCO-panoptic style: an int32 map of segment ids (1, 2, ...; every pixel belongs to a
segment) and one entry per segment (id, category_id, isthing, area). Each stuff class present is one
segment; each thing is one segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

THING_CLASSES = ("circle", "square", "triangle", "star")
STUFF_CLASSES = ("stripes", "checker", "dots")
CLASS_NAMES = THING_CLASSES + STUFF_CLASSES
NUM_CLASSES = len(CLASS_NAMES)
THING_IDS = tuple(range(len(THING_CLASSES)))
STUFF_IDS = tuple(range(len(THING_CLASSES), NUM_CLASSES))
ID2LABEL = {i: name for i, name in enumerate(CLASS_NAMES)}

DEFAULT_SIZE = 128
MAX_THINGS = 5
# a thing's radius as a fraction of the image side: at 128 px, 14-28 px, so that even the smallest spans a
# few of the default model's 8-px patches and its corners (or their absence) can be seen
THING_RADIUS = (0.11, 0.22)
MIN_THING_AREA = 150
MIN_VISIBLE_FRACTION = 0.6
TRAIN_SEED = 0
HELD_OUT_SEED = 1_000_003  # the seed of the held-out evaluation set: no overlap with training seeds


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    panoptic: np.ndarray  # (H, W) int32 segment ids, 1..len(segments)
    segments: list[dict] = field(default_factory=list)  # {"id", "category_id", "isthing", "area"}

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """(masks (N, H, W) bool, class ids (N,) int64): the per-segment labels transformers' EoMT loss takes."""
        ids = np.array([s["id"] for s in self.segments])
        masks = self.panoptic[None] == ids[:, None, None]
        return masks, np.array([s["category_id"] for s in self.segments], dtype=np.int64)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _two_colours(rng: np.random.Generator, min_distance: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart that the texture is visible."""
    while True:
        a, b = _colour(rng), _colour(rng)
        if np.linalg.norm(a - b) >= min_distance:
            return a, b


def _texture(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W, 3) float texture of stuff class ``kind``."""
    a, b = _two_colours(rng)
    name = CLASS_NAMES[kind]
    if name == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 14)
        phase = rng.uniform(0, period)
        on = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta) + phase) / period) > 0
    elif name == "checker":
        cell = rng.uniform(5, 12)
        ox, oy = rng.uniform(0, cell, size=2)
        on = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0
    elif name == "dots":
        spacing = rng.uniform(7, 12)
        radius = rng.uniform(1.5, 3.0)
        ox, oy = rng.uniform(0, spacing, size=2)
        # distance to the nearest point of a regular grid
        dx = (xx + ox) % spacing - spacing / 2
        dy = (yy + oy) % spacing - spacing / 2
        on = dx * dx + dy * dy <= radius * radius
    else:  # pragma: no cover - the classes are fixed above
        raise ValueError(f"not a stuff class: {kind}")
    return np.where(on[..., None], a, b)


def _polygon(vertices: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Pixels (centres) inside a simple polygon, by the even-odd crossing rule."""
    inside = np.zeros(yy.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y0 > yy) != (y1 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xx < x_at)
        x0, y0 = x1, y1
    return inside


def _shape(kind: int, rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of one thing of class ``kind`` at a random place, size and rotation."""
    radius = rng.uniform(*THING_RADIUS) * size
    cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
    name = CLASS_NAMES[kind]
    if name == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius
    rotation = rng.uniform(0, 2 * np.pi)
    if name == "square":
        angles, radii = np.arange(4) * np.pi / 2 + np.pi / 4, np.full(4, radius)
    elif name == "triangle":
        angles, radii = np.arange(3) * 2 * np.pi / 3, np.full(3, radius * 1.15)
    elif name == "star":
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius * 1.2, radius * 0.5)
    else:  # pragma: no cover
        raise ValueError(f"not a thing class: {kind}")
    angles = angles + rotation
    vertices = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return _polygon(vertices, yy, xx)


def make_scene(index: int, seed: int = TRAIN_SEED, size: int = DEFAULT_SIZE) -> Scene:
    """Scene number ``index`` of the stream ``seed``: the same arguments always give the same scene."""
    if size < 32:
        raise ValueError(f"scene size must be at least 32 pixels, got {size}")
    rng = np.random.default_rng([int(seed), int(index)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # stuff: one class, or two split by a line through the image
    stuff_map = np.empty((size, size), dtype=np.int64)
    kinds = rng.choice(STUFF_IDS, size=2, replace=False)
    if rng.random() < 0.6:
        theta = rng.uniform(0, 2 * np.pi)
        px, py = rng.uniform(0.3 * size, 0.7 * size, size=2)
        side = (xx - px) * np.cos(theta) + (yy - py) * np.sin(theta) > 0
        stuff_map[...] = np.where(side, kinds[0], kinds[1])
    else:
        stuff_map[...] = kinds[0]
    image = np.zeros((size, size, 3), dtype=np.float32)
    for kind in np.unique(stuff_map):
        region = stuff_map == kind
        image[region] = _texture(int(kind), rng, yy, xx)[region]

    # things, drawn in order on top; owner holds the index of the visible thing per pixel (-1: stuff)
    owner = np.full((size, size), -1, dtype=np.int64)
    full_areas: list[int] = []
    thing_kinds: list[int] = []
    for _ in range(int(rng.integers(1, MAX_THINGS + 1))):
        for _attempt in range(30):
            kind = int(rng.choice(THING_IDS))
            mask = _shape(kind, rng, size, yy, xx)
            area = int(mask.sum())
            if area < MIN_THING_AREA:
                continue
            trial = np.where(mask, len(full_areas), owner)
            visible = np.bincount(trial[trial >= 0], minlength=len(full_areas) + 1)
            if all(visible[i] >= max(MIN_VISIBLE_FRACTION * full_areas[i], MIN_THING_AREA)
                   for i in range(len(full_areas))):
                owner = trial
                full_areas.append(area)
                thing_kinds.append(kind)
                image[mask] = _colour(rng)
                break

    # panoptic ids: stuff segments first, then things in drawing order
    panoptic = np.zeros((size, size), dtype=np.int32)
    segments: list[dict] = []
    for kind in np.unique(stuff_map[owner < 0]):
        region = (stuff_map == kind) & (owner < 0)
        segments.append({"id": len(segments) + 1, "category_id": int(kind), "isthing": False,
                         "area": int(region.sum())})
        panoptic[region] = len(segments)
    for i, kind in enumerate(thing_kinds):
        region = owner == i
        segments.append({"id": len(segments) + 1, "category_id": kind, "isthing": True, "area": int(region.sum())})
        panoptic[region] = len(segments)

    noise = rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
    return Scene(image=image, panoptic=panoptic, segments=segments)


def make_scenes(count: int, seed: int = HELD_OUT_SEED, size: int = DEFAULT_SIZE, start: int = 0) -> list[Scene]:
    """Scenes ``start .. start+count-1`` of the stream ``seed`` (default: the held-out set)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [make_scene(start + i, seed, size) for i in range(count)]
