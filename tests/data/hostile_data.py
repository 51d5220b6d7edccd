"""Tiny COCO-format datasets written by the tests: good images, images in every odd format and
broken ones, each with a bright square object on a dark background and its box."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from tests.helpers import config_file

ATSS_CONFIG = config_file("shapes", "atss_r18.yaml")
# ATSS on the tests' 64 x 48 images: trained and evaluated at 64 px, batch 2, every candidate kept
TINY_ATSS = [
    "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.ATSS.INFERENCE_TH", "0.0",
]

W, H = 64, 48  # every image's size as annotated (after EXIF rotation), except the large one
OBJECT = (16, 12, 24, 20)  # the bright square of every image: x, y, w, h (XYWH, pixels)


def picture(width: int = W, height: int = H, box=OBJECT) -> np.ndarray:
    """uint8 RGB (height, width, 3): dark noise with a bright square at ``box`` (XYWH)."""
    rng = np.random.default_rng(width * 7 + height)
    image = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    x, y, w, h = box
    image[y : y + h, x : x + w] = 230
    return image


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def write_image(folder: Path, kind: str) -> tuple[str, int, int, list]:
    """Write one image of ``kind``; returns (file name, annotated width, annotated height, box XYWH)."""
    rgb = Image.fromarray(picture())
    path = folder / f"{kind}.png"
    if kind in ("good", "good2", "boxes"):
        rgb.save(path)
    elif kind == "grayscale":
        rgb.convert("L").save(path)
    elif kind == "rgba":
        rgb.convert("RGBA").save(path)
    elif kind == "palette":
        rgb.convert("P").save(path)
    elif kind == "16bit":
        Image.fromarray(picture()[:, :, 0].astype(np.uint16) * 257).save(path)
    elif kind == "cmyk":
        path = path.with_suffix(".jpg")
        rgb.convert("CMYK").save(path, quality=95)
    elif kind == "exif_rotated":
        # stored as a portrait (H x W transposed); EXIF orientation 6 turns it back to W x H
        path = path.with_suffix(".jpg")
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    elif kind == "large":
        big = (40 * W, 40 * H)  # 2560 x 1920, far above the tests' training size
        box = [x * 40 for x in OBJECT]
        path = path.with_suffix(".jpg")
        Image.fromarray(picture(*big, box=box)).save(path, quality=90)
        return path.name, big[0], big[1], box
    elif kind == "size_mismatch":
        rgb.save(path)
        return path.name, W + 10, H, list(OBJECT)
    elif kind == "truncated":  # header fine, pixel stream cut: only decoding finds it
        data = _png_bytes(rgb)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif kind == "missing":
        pass
    else:
        raise KeyError(kind)
    return path.name, W, H, list(OBJECT)


# kinds whose pictures train fine; those that the up-front check refuses; the one found by decoding
READABLE = ("good", "good2", "grayscale", "rgba", "palette", "cmyk", "exif_rotated", "large", "boxes")
REFUSED = ("16bit", "size_mismatch", "zero_bytes", "corrupt", "missing")
FOUND_WHEN_DECODED = ("truncated",)

# Extra annotations of the "boxes" image, each with the outcome the checks give it.
HOSTILE_BOXES = [
    ([10, 10, 0, 8], "dropped"),  # zero width
    ([10, 10, -5, 8], "dropped"),  # negative width
    ([float("nan"), 10, 5, 5], "dropped"),  # NaN
    ([500, 500, 10, 10], "dropped"),  # entirely outside
    ([-8, -6, 20, 20], "clipped"),  # partly outside (negative corner)
    ([50, 40, 30, 30], "clipped"),  # partly outside (far corner)
]


def write_coco(folder: Path, kinds, *, category_ids=(1, 2), extra_boxes=True, empty_images=0) -> Path:
    """A COCO JSON over one image per kind (file names relative to ``folder``); the object of each
    image alternates between ``category_ids``; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, kind in enumerate(kinds):
        file_name, width, height, box = write_image(folder, kind)
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        boxes = [box] + ([b for b, _ in HOSTILE_BOXES] if kind == "boxes" and extra_boxes else [])
        for b in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": b, "iscrowd": 0,
                                "category_id": category_ids[i % len(category_ids)], "area": 100.0})
    for j in range(empty_images):
        name = f"empty{j}.png"
        Image.fromarray(picture(box=(0, 0, 0, 0))).save(folder / name)
        images.append({"id": len(images) + 1, "file_name": name, "width": W, "height": H})
    categories = [{"id": c, "name": f"class{c}"} for c in category_ids]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def register(name: str, json_path: Path) -> list:
    """Register the COCO JSON ``json_path`` as ``name`` (replacing an earlier registration); its records."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_path), str(json_path.parent))
    return DatasetCatalog.get(name)


def perfect_instances(record: dict) -> Instances:
    """Predictions that are exactly the record's annotated boxes and classes, each with score 1."""
    anns = record["annotations"]
    instances = Instances((record["height"], record["width"]))
    instances.pred_boxes = Boxes(torch.tensor(
        [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns], dtype=torch.float32))
    instances.scores = torch.ones(len(anns))
    instances.pred_classes = torch.tensor([a["category_id"] for a in anns])
    return instances
