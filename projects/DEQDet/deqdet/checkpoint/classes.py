"""The classes a model was trained on travel in its checkpoints (as mmdetection keeps them in a
checkpoint's meta): the training dataset's class names and category ids, under
:data:`CHECKPOINT_KEY`. Inference reads them from ``MODEL.WEIGHTS`` (:func:`resolve_classes`), so
detections are labelled with the training data's names whatever ``DATASETS`` says; the config's
datasets are only the fallback for checkpoints without them."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Optional, Tuple

from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog

from ..data.loading import NUM_CLASSES_KEYS

__all__ = ["CHECKPOINT_KEY", "ClassNames", "dataset_classes", "model_num_classes", "resolve_classes"]

CHECKPOINT_KEY = "classes"

logger = logging.getLogger("deqdet")

@dataclass(frozen=True)
class ClassNames:
    """Class names by the model's (contiguous) class index, the dataset's category id of each
    (``None`` when unknown) and where they come from (for messages)."""

    names: Tuple[str, ...]
    dataset_ids: Optional[Tuple[int, ...]]
    source: str

    def to_checkpoint(self) -> dict:
        ids = None if self.dataset_ids is None else list(self.dataset_ids)
        return {"names": list(self.names), "dataset_ids": ids, "source": self.source}

    @classmethod
    def from_checkpoint(cls, entry: dict, path: str) -> "ClassNames":
        ids = entry.get("dataset_ids")
        source = f"{path} (trained on {entry.get('source')})"
        return cls(tuple(entry["names"]), None if ids is None else tuple(ids), source)

    def metadata(self) -> Metadata:
        """A Detectron2 ``Metadata`` (not registered) with ``thing_classes`` (and the id mapping),
        for ``Visualizer`` and the like."""
        meta = Metadata(name=f"classes of {self.source}")
        meta.thing_classes = list(self.names)
        if self.dataset_ids is not None:
            meta.thing_dataset_id_to_contiguous_id = {d: i for i, d in enumerate(self.dataset_ids)}
        return meta

    def label(self, index: int) -> str:
        return self.names[index] if 0 <= index < len(self.names) else str(index)


def model_num_classes(cfg) -> Optional[int]:
    """The class count configured for ``cfg.MODEL.META_ARCHITECTURE`` (None for an unknown one)."""
    keys = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    return functools.reduce(getattr, keys[0].split("."), cfg) if keys else None


def dataset_classes(name: str) -> Optional[ClassNames]:
    """The classes of registered dataset ``name``: its metadata's ``thing_classes`` (set when the
    dataset is loaded), else the ``categories`` of its COCO file; None when neither is known."""
    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    names = meta.get("thing_classes")
    id_map = meta.get("thing_dataset_id_to_contiguous_id")
    if names is None and meta.get("json_file"):
        try:
            with open(meta.json_file) as f:
                categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
            names, id_map = [c["name"] for c in categories], {c["id"]: i for i, c in enumerate(categories)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # the loader names the problem
            return None
    if names is None:
        return None
    ids = tuple(sorted(id_map, key=id_map.get)) if id_map and len(id_map) == len(names) else None
    return ClassNames(tuple(names), ids, f"dataset {name!r}")


def resolve_classes(cfg, checkpoint_entry: Optional[dict]) -> Optional[ClassNames]:
    """The class names for a model built from ``cfg`` whose checkpoint (``MODEL.WEIGHTS``) holds
    ``checkpoint_entry`` under :data:`CHECKPOINT_KEY`: those of the checkpoint; for a checkpoint
    without them, those of ``DATASETS.TEST[0]`` (else ``DATASETS.TRAIN[0]``), with a warning.
    Warns when the count disagrees with the model's class count or with the config's dataset."""
    datasets = [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN][:1]
    configured = dataset_classes(datasets[0]) if datasets else None
    if checkpoint_entry:
        classes = ClassNames.from_checkpoint(checkpoint_entry, cfg.MODEL.WEIGHTS)
        if configured is not None and len(configured.names) != len(classes.names):
            logger.warning(f"class names from {classes.source} ({len(classes.names)} classes) are used; "
                           f"the config's {configured.source} has {len(configured.names)}")
    elif configured is not None:
        classes = configured
        if cfg.MODEL.WEIGHTS:  # (no weights at all is warned about on its own)
            logger.warning(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} holds no class names: using those of "
                           f"{configured.source}")
    else:
        logger.warning("no class names (neither in MODEL.WEIGHTS nor in DATASETS): detections are "
                       "labelled with class indices")
        return None
    expected = model_num_classes(cfg)
    if expected is not None and expected != len(classes.names):
        logger.warning(f"the model has {expected} classes but {classes.source} names "
                       f"{len(classes.names)}: labels may be wrong")
    return classes
