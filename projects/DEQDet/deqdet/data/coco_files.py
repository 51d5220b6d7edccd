"""COCO-format annotation files as datasets: :func:`register_coco_file` (the project's counterpart
of Detectron2's ``register_coco_instances``) registers a file whose loader leaves out what
:mod:`deqdet.data.annotation_file` drops (malformed boxes, orphan annotations: evaluation drops
them too; the up-front check of :mod:`deqdet.data.loading` names them) where Detectron2's loader
stops at some of them;
``DATASETS.COCO_FILES`` entries ``"NAME=JSON_FILE[:IMAGE_ROOT]"`` are registered with it (the
image root defaults to the JSON file's folder), so that ``DATASETS.TRAIN`` / ``DATASETS.TEST`` can
name them. Boxes only: segmentations and keypoints are not read."""

from __future__ import annotations

import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..errors import UserInputError
from .annotation_file import check_coco_dict

__all__ = ["load_coco_file", "parse_coco_file_entry", "register_coco_file", "register_coco_files"]

logger = logging.getLogger("deqdet")


def load_coco_file(json_file: str, image_root: str, dataset_name: str) -> list[dict]:
    """Detectron2's list-of-dicts records of a COCO file (images sorted by id, contiguous category
    ids; the dataset's ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` set as Detectron2's
    ``load_coco_json`` sets them), without what :func:`check_coco_dict` drops (malformed boxes,
    orphan annotations).

    Raises:
        UserInputError: the file is unreadable or not JSON, or has a problem that is an error.
    """
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except OSError as e:
        raise UserInputError(f"cannot read annotation file of dataset {dataset_name!r}: {json_file}: "
                             f"{e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserInputError(f"malformed JSON in {json_file}: {e}") from e
    if not isinstance(coco, dict):
        raise UserInputError(f"{json_file}: not a COCO annotation file (a JSON object with 'images')")
    report = check_coco_dict(coco)
    error = report.error(json_file)
    if error:
        raise UserInputError(error)
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    MetadataCatalog.get(dataset_name).set(
        thing_classes=[c["name"] for c in categories], thing_dataset_id_to_contiguous_id=id_map)
    per_image = {}
    for ann in report.annotations:
        per_image.setdefault(ann["image_id"], []).append({
            "bbox": [float(v) for v in ann["bbox"]], "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[ann["category_id"]], "iscrowd": int(ann.get("iscrowd", 0)),
        })
    records = [
        {"file_name": os.path.join(image_root, image["file_name"]), "height": image["height"],
         "width": image["width"], "image_id": image["id"], "annotations": per_image.get(image["id"], [])}
        for image in sorted(coco.get("images", []), key=lambda image: image["id"])
    ]
    logger.info(f"loaded {len(records)} images and {len(report.annotations)} annotations of dataset "
                f"{dataset_name!r} from {json_file}")
    return records


def register_coco_file(name: str, json_file: str, image_root: str) -> None:
    """Register the COCO file ``json_file`` (images under ``image_root``) as dataset ``name``,
    loaded by :func:`load_coco_file`; evaluated with COCO's metric."""
    DatasetCatalog.register(name, lambda: load_coco_file(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


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
    """Register every ``cfg.DATASETS.COCO_FILES`` entry with :func:`register_coco_file` (again with
    the same files is a no-op); returns the names."""
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
            register_coco_file(name, json_file, image_root)
        names.append(name)
    return names
