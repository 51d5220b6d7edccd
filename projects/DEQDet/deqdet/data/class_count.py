"""One class count for every head, from the data unless the config says it.

Each detector reads its class count from its own key (``NUM_CLASSES_KEYS``; the combined detector from
two). :func:`resolve_class_count` makes them one number: the value of the key(s) the config file or the
command line sets (which must agree), else the number of ``thing_classes`` of the first training
dataset (the first test dataset when there is none), else the defaults stay.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Iterable, List, Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

from ..errors import UserInputError
from .loading import NUM_CLASSES_KEYS

__all__ = ["class_count_keys", "dataset_class_count", "resolve_class_count"]

logger = logging.getLogger(__name__)


def class_count_keys(cfg: CfgNode) -> List[str]:
    """The class-count keys the model of ``cfg`` reads (two for the combined detector)."""
    keys = list(NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ()))
    if cfg.MODEL.META_ARCHITECTURE == "DenseQueryDetector":
        keys += NUM_CLASSES_KEYS.get(cfg.MODEL.DENSE_QUERY.DENSE_DETECTOR, ())
    return keys


def dataset_class_count(name: str) -> Optional[int]:
    """The number of ``thing_classes`` of registered dataset ``name``: from its metadata, or the
    ``categories`` of its COCO file when that is not loaded yet; None when neither is known."""
    metadata = MetadataCatalog.get(name)
    classes = metadata.get("thing_classes")
    if classes is not None:
        return len(classes)
    json_file = metadata.get("json_file")
    if json_file is None:
        return None
    try:
        with open(json_file) as f:
            return len(json.load(f).get("categories", []))
    except (OSError, ValueError, AttributeError):
        return None  # the data check names the file when the dataset is loaded


def _get(cfg: CfgNode, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def _set(cfg: CfgNode, key: str, value) -> None:
    *path, last = key.split(".")
    setattr(functools.reduce(getattr, path, cfg), last, value)


def resolve_class_count(cfg: CfgNode, explicit: Iterable[str]) -> None:
    """Set every class-count key of ``cfg`` (not frozen) to one number (module docstring).

    Args:
        explicit: the keys the config file (with its bases) or the command line sets.
    Raises:
        UserInputError: the keys set disagree.
    """
    keys = class_count_keys(cfg)
    chosen = {key: _get(cfg, key) for key in keys if key in set(explicit)}
    if len(set(chosen.values())) > 1:
        raise UserInputError(
            "the heads' class counts disagree: " + ", ".join(f"{k} {v}" for k, v in chosen.items())
            + ": set one of them (or none, to take the count from the data)"
        )
    if chosen:
        count = next(iter(chosen.values()))
    else:
        datasets = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
        count = dataset_class_count(datasets[0]) if datasets else None
        if count is None:
            return
    for key in keys:
        _set(cfg, key, count)
