"""The combined detector: a dense head (ATSS or RetinaNet, with DyHead blocks) whose distinct top boxes,
features and scores initialise a query decoder (DEQ or AdaMixer) on the same pyramid."""

from .config import add_dense_query_config
from .criterion import IoUAwareCriterion, quality_logits
from .detector import DenseOutputs, DenseQueryDetector, first_kept

__all__ = [
    "DenseOutputs", "DenseQueryDetector", "IoUAwareCriterion", "add_dense_query_config", "first_kept",
    "quality_logits",
]
