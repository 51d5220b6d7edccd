"""Datasets named in the config: ``DATASETS.COCO_FILES`` entries ``"NAME=JSON_FILE[:IMAGE_ROOT]"``
are registered with Detectron2's ``register_coco_instances`` (the image root defaults to the JSON
file's folder), so that ``DATASETS.TRAIN`` / ``DATASETS.TEST`` can name them."""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..errors import UserInputError

__all__ = ["parse_coco_file_entry", "register_coco_files"]


def parse_coco_file_entry(entry: str) -> tuple[str, str, str]:
    """``"NAME=JSON_FILE[:IMAGE_ROOT]"`` -> ``(name, json_file, image_root)``, the files checked."""
    name, sep, files = entry.partition("=")
    json_file, _, image_root = files.partition(":")
    if not sep or not name or not json_file:
        raise UserInputError(f"DATASETS.COCO_FILES entry {entry!r} is not NAME=JSON_FILE[:IMAGE_ROOT]")
    image_root = image_root or os.path.dirname(json_file) or "."
    if not os.path.isfile(json_file):
        raise UserInputError(f"DATASETS.COCO_FILES: annotation file of {name!r} not found: {json_file}")
    if not os.path.isdir(image_root):
        raise UserInputError(f"DATASETS.COCO_FILES: image folder of {name!r} not found: {image_root}")
    return name, json_file, image_root


def register_coco_files(cfg) -> list[str]:
    """Register every ``cfg.DATASETS.COCO_FILES`` entry (again with the same files is a no-op);
    returns the names."""
    names = []
    for entry in cfg.DATASETS.COCO_FILES:
        name, json_file, image_root = parse_coco_file_entry(entry)
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name)
            if (registered.get("json_file"), registered.get("image_root")) != (json_file, image_root):
                raise UserInputError(
                    f"DATASETS.COCO_FILES: dataset name {name!r} is already registered with other files"
                )
        else:
            register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names
