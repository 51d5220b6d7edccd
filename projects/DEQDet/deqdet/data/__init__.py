"""Datasets and dataset mappers. Importing this package registers the ``shapes`` splits."""

from .coco_files import register_coco_file
from .datasets import ensure_shapes, register_shapes, shapes_root
from .shapes import CLASSES, SPLITS

register_shapes()

__all__ = ["CLASSES", "SPLITS", "ensure_shapes", "register_coco_file", "register_shapes", "shapes_root"]
