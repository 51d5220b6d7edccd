"""Dynamic Head (Dai et al., CVPR 2021): DyHead blocks, FPN+DyHead backbones, ATSS, the DyHead box
head. Importing this package registers them."""

from . import atss, backbone, roi_head  # noqa: F401  (registers the meta-arch, backbones, box head)
from .config import add_dyhead_config

__all__ = ["add_dyhead_config"]
