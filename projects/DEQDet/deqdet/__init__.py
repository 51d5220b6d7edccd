"""DEQDet, AdaMixer and Dynamic Head for Detectron2.

Importing ``deqdet`` registers everything the package adds to Detectron2's registries and
catalogs (the ``shapes`` datasets; models as they land).
"""

from . import checkpoint, data, modeling  # noqa: F401  (registers datasets, models, converters)
from .config import add_deqdet_config
from .evaluation import install_fast_coco_eval

install_fast_coco_eval()

__all__ = ["add_deqdet_config"]
