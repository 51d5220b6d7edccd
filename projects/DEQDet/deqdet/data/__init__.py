"""Datasets and dataset mappers. Importing this package registers the ``shapes`` splits."""

from .datasets import ensure_shapes, register_shapes, shapes_root
from .shapes import CLASSES, SPLITS

register_shapes()

__all__ = ["CLASSES", "SPLITS", "ensure_shapes", "register_shapes", "shapes_root"]
