"""DEQDet, AdaMixer and Dynamic Head for Detectron2.

Importing ``deqdet`` registers everything the package adds to Detectron2's registries and
catalogs (the ``shapes`` datasets; models as they land).
"""

import warnings

# Installed before anything imports Detectron2 (scripts import deqdet first), these silence two
# warnings of Detectron2's and fvcore's code that a user cannot act on, by their exact messages:
# - fvcore and Detectron2 apply torch.jit.script to a few functions when imported, and PyTorch
#   deprecates torch.jit.script with a FutureWarning per call;
# - Detectron2's DefaultAnchorGenerator (ATSS, RetinaNet) calls torch.meshgrid without `indexing`,
#   meaning the "ij" indexing that PyTorch's warning says will stay the default.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings(
    "ignore", category=UserWarning,
    message=r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument")

from . import checkpoint, data, modeling  # noqa: E402,F401  (registers datasets, models, converters)
from .config import add_deqdet_config  # noqa: E402
from .evaluation import install_fast_coco_eval  # noqa: E402

install_fast_coco_eval()

__all__ = ["add_deqdet_config"]
