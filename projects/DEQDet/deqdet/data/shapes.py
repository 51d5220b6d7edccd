"""The embedded synthetic detection dataset ``shapes``.

Every image is drawn from a seed of its own (``split seed * 1_000_003 + index``), so a split is
identical on every machine and can be generated in parallel. An image is a textured background,
distractor clutter and up to ``max_objects`` objects of :data:`CLASSES`, painted in a random
depth order. Each object's annotation is the tight box of the pixels that are still visible in
the final image (inside the image and not covered by anything painted later); objects whose
visible part falls under ``min_visible`` of their full extent are dropped from the annotations
(they stay in the picture, as occluded objects do in real data).

Classes come in look-alike pairs so that classification is not trivial: the same outline filled
or hollow (``circle``/``ring``, ``square``/``frame``) and the same shape at a different aspect
(``circle``/``ellipse``, ``square``/``bar``). Colours never depend on the class. Object sizes
cover COCO's small, medium and large area buckets. ``area`` in the JSON is the visible pixel
count, as COCO's area is the segment's area.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "SPLITS",
    "ShapesSplit",
    "compose_image",
    "generate_split",
    "render_image",
]

# Bump whenever the drawing changes: the version is part of the cache path.
GENERATOR_VERSION = 1

CLASSES = ("circle", "ring", "ellipse", "square", "frame", "bar", "triangle", "cross")


@dataclass(frozen=True)
class ShapesSplit:
    """How one split is generated. Everything about the pixels follows from these fields."""

    num_images: int
    seed: int
    min_size: tuple[int, int] = (192, 224)  # (height, width) lower bounds of the image size
    max_size: tuple[int, int] = (256, 320)  # (height, width) upper bounds, inclusive
    max_objects: int = 8
    max_clutter: int = 6
    empty_fraction: float = 0.05
    min_visible: float = 0.4


SPLITS = {
    "shapes_train": ShapesSplit(num_images=3000, seed=1),
    "shapes_val": ShapesSplit(num_images=300, seed=2),
    # held out: for checking settings chosen on shapes_val (generated on first use)
    "shapes_test": ShapesSplit(num_images=300, seed=5),
    # small splits for tests and smoke runs
    "shapes_mini_train": ShapesSplit(num_images=32, seed=3),
    "shapes_mini_val": ShapesSplit(num_images=16, seed=4),
}

# Object size s = sqrt(w * h) of the full (unoccluded) shape, in pixels: (probability, low, high).
_SIZE_BUCKETS = ((0.35, 10.0, 32.0), (0.45, 32.0, 96.0), (0.20, 96.0, 170.0))


def _random_color(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """An RGB colour (float32, 0-255) at least 80 away (L2) from ``avoid`` when given."""
    for _ in range(32):
        hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(60, 256)]]], np.uint8)
        color = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
        if avoid is None or np.linalg.norm(color - avoid) >= 80:
            return color
    return 255.0 - avoid


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background: smooth colour noise, optionally stripes or a checkerboard."""
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    cells = int(rng.integers(3, 9))
    low = rng.normal(0, 25, size=(cells, cells, 3)).astype(np.float32)
    img = base + cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    pattern = rng.integers(0, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if pattern == 1:  # stripes
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 24)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        img += (rng.uniform(8, 20) * np.sign(np.sin(phase)))[..., None]
    elif pattern == 2:  # checkerboard
        period = int(rng.integers(8, 32))
        checker = ((xx // period + yy // period) % 2) * 2 - 1
        img += (rng.uniform(8, 20) * checker)[..., None]
    return img


def _shape_mask(rng: np.random.Generator, cls: str, h: int, w: int, cx: float, cy: float, s: float):
    """Binary mask (uint8 h x w) of one object of class ``cls`` with size ``s`` centred at (cx, cy)."""
    mask = np.zeros((h, w), np.uint8)
    center = (int(round(cx)), int(round(cy)))
    thick = max(2, int(round(0.18 * s)))
    if cls in ("circle", "ring"):
        r = max(2, int(round(s / 2)))
        cv2.circle(mask, center, r, 1, -1 if cls == "circle" else thick, lineType=cv2.LINE_8)
        return mask
    if cls == "ellipse":
        aspect = rng.uniform(1.8, 2.6)
        axes = (max(2, int(round(s * math.sqrt(aspect) / 2))), max(1, int(round(s / math.sqrt(aspect) / 2))))
        cv2.ellipse(mask, center, axes, rng.uniform(-20, 20), 0, 360, 1, -1, lineType=cv2.LINE_8)
        return mask
    if cls in ("square", "frame", "bar"):
        aspect = rng.uniform(2.2, 3.0) if cls == "bar" else 1.0
        if cls == "bar" and rng.random() < 0.5:
            aspect = 1.0 / aspect
        bw, bh = s * math.sqrt(aspect), s / math.sqrt(aspect)
        rect = ((cx, cy), (bw, bh), rng.uniform(-20, 20))
        pts = np.round(cv2.boxPoints(rect)).astype(np.int32)
        if cls == "frame":
            cv2.polylines(mask, [pts], True, 1, thick, lineType=cv2.LINE_8)
        else:
            cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8)
        return mask
    if cls == "triangle":
        rot = rng.uniform(0, 2 * math.pi)
        r = s / math.sqrt(3) * 1.2
        angles = [rot + k * 2 * math.pi / 3 for k in range(3)]
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        cv2.fillPoly(mask, [np.round(np.array(pts)).astype(np.int32)], 1, lineType=cv2.LINE_8)
        return mask
    if cls == "cross":
        rot = rng.uniform(0, math.pi / 2)
        arm = max(2.0, 0.3 * s)
        for angle in (rot, rot + math.pi / 2):
            rect = ((cx, cy), (s, arm), math.degrees(angle))
            cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1, lineType=cv2.LINE_8)
        return mask
    raise ValueError(f"unknown shapes class {cls!r}")


def _clutter_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One distractor: a line, a jagged blob or a scatter of dots."""
    mask = np.zeros((h, w), np.uint8)
    kind = rng.integers(0, 3)
    if kind == 0:
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(mask, p0, p1, 1, int(rng.integers(1, 4)), lineType=cv2.LINE_8)
    elif kind == 1:
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 30)
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = r * rng.uniform(0.3, 1.0, n)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    else:
        for _ in range(int(rng.integers(5, 20))):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(mask, centre, int(rng.integers(1, 3)), 1, -1)
    return mask


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray, rng: np.random.Generator) -> None:
    """Paint ``color`` with a random linear shading over ``mask`` (in place)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    g = rng.normal(0, 0.4, size=2)
    shade = (xs - xs.mean()) * g[0] + (ys - ys.mean()) * g[1]
    img[ys, xs] = color + np.clip(shade, -35, 35)[:, None]


def compose_image(
    seed: int, spec: ShapesSplit
) -> tuple[np.ndarray, list[tuple[np.ndarray, int]], list[np.ndarray]]:
    """Draw one image and return how it was composed.

    Returns:
        image: uint8 array (H, W, 3), RGB.
        layers: ``(mask, class index)`` per painted item, bottom to top; masks are uint8
            (H, W) in {0, 1}; the class index is -1 for clutter.
        visible: per layer, the part of its mask not covered by any layer above it.
    """
    rng = np.random.default_rng(seed)
    h = int(rng.integers(spec.min_size[0], spec.max_size[0] + 1))
    w = int(rng.integers(spec.min_size[1], spec.max_size[1] + 1))
    img = _background(rng, h, w)
    bg_mean = img.reshape(-1, 3).mean(0)

    num_objects = 0 if rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    layers = []  # (mask, class index or -1 for clutter), bottom to top
    for _ in range(num_objects):
        cls = int(rng.integers(0, len(CLASSES)))
        bucket = rng.choice(len(_SIZE_BUCKETS), p=[b[0] for b in _SIZE_BUCKETS])
        lo, hi = _SIZE_BUCKETS[bucket][1:]
        s = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        layers.append((_shape_mask(rng, CLASSES[cls], h, w, cx, cy, s), cls))
    for _ in range(int(rng.integers(0, spec.max_clutter + 1))):
        layers.append((_clutter_mask(rng, h, w), -1))
    order = rng.permutation(len(layers))
    layers = [layers[i] for i in order]

    covered = np.zeros((h, w), np.uint8)  # painted by anything above, walking top to bottom
    visible = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        mask, _ = layers[i]
        visible[i] = mask & (1 - covered)
        covered |= mask
    for mask, _ in layers:
        _paint(img, mask, _random_color(rng, avoid=bg_mean), rng)

    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return image, layers, visible


def render_image(seed: int, spec: ShapesSplit) -> tuple[np.ndarray, list[dict]]:
    """Draw one image.

    Returns:
        image: uint8 array (H, W, 3), RGB.
        annotations: dicts with ``bbox`` (XYWH, pixel edges: the box spans pixels
            x .. x + w - 1), ``category_id`` (index into :data:`CLASSES`) and ``area``
            (visible pixel count).
    """
    image, layers, visible = compose_image(seed, spec)
    annotations = []
    for (mask, cls), vis in zip(layers, visible):
        full = int(mask.sum())
        area = int(vis.sum())
        if cls < 0 or full == 0 or area < spec.min_visible * full:
            continue
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        bbox = [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
        annotations.append({"bbox": bbox, "category_id": cls, "area": area})
    return image, annotations


def _render_and_save(args: tuple[int, int, ShapesSplit, str]) -> tuple[int, int, int, list[dict]]:
    index, seed, spec, path = args
    image, annotations = render_image(seed, spec)
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write image {path}")
    return index, image.shape[0], image.shape[1], annotations


def generate_split(name: str, spec: ShapesSplit, root: str | os.PathLike, workers: int | None = None) -> Path:
    """Generate images and a COCO JSON for one split under ``root/name``; returns the JSON path.

    The JSON is written last (atomically), so its presence marks a complete split.
    """
    out = Path(root) / name
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (i, spec.seed * 1_000_003 + i, spec, str(image_dir / f"{i:06d}.png")) for i in range(spec.num_images)
    ]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_render_and_save, jobs, chunksize=16))
    else:
        results = [_render_and_save(job) for job in jobs]

    images, annotations = [], []
    for index, h, w, anns in results:
        images.append({"id": index + 1, "file_name": f"images/{index:06d}.png", "height": h, "width": w})
        for ann in anns:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": ann["category_id"] + 1,
                    "bbox": ann["bbox"],
                    "area": ann["area"],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"deqdet shapes v{GENERATOR_VERSION}, {name}", "seed": spec.seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)],
    }
    json_path = out / "annotations.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(json_path)
    return json_path
