"""Dataset mappers."""

from __future__ import annotations

import logging
from typing import List

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from PIL import UnidentifiedImageError

from ..errors import UserInputError

__all__ = ["CheckedDatasetMapper", "build_train_mapper", "detr_augmentations"]


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` for images that passed the up-front checks
    (:mod:`deqdet.data.loading`) but still fail when decoded (a truncated pixel stream, a file
    changed since): in evaluation a one-line error naming the file; in training the image is
    skipped, with a warning naming it (Detectron2's ``MapDataset`` then draws another image)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = 0  # images skipped by this mapper (in this loader process)

    def __call__(self, dataset_dict: dict) -> dict | None:
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            return super().__call__(dataset_dict)
        except (UnidentifiedImageError, OSError, SizeMismatchError) as e:
            if isinstance(e, FileNotFoundError):
                problem = f"image not found: {file_name}"
            elif isinstance(e, SizeMismatchError):
                problem = f"image {file_name} does not match its annotation: {e}"
            else:
                problem = f"cannot read image {file_name}: {e}"
            if not self.is_train:
                raise UserInputError(problem) from e
        self.skipped += 1
        logging.getLogger("deqdet").warning(
            f"skipped in training: {problem} ({self.skipped} skipped by this loader)"
        )
        return None


# The DETR crop, a fixed recipe as DETR / AdaMixer: probability, shortest edges, crop height and width range.
DETR_CROP_PROB = 0.5
DETR_CROP_RESIZE_SIZES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)


def detr_augmentations(cfg) -> List[T.Augmentation]:
    """DETR-style training augmentation: horizontal flip; with probability :data:`DETR_CROP_PROB` a
    resize of the shortest edge to one of :data:`DETR_CROP_RESIZE_SIZES` and a random crop with height
    and width each in :data:`DETR_CROP_SIZE`; then the multi-scale resize of ``INPUT.MIN_SIZE_TRAIN`` /
    ``MAX_SIZE_TRAIN``."""
    crop = T.AugmentationList([
        T.ResizeShortestEdge(DETR_CROP_RESIZE_SIZES, cfg.INPUT.MAX_SIZE_TRAIN, sample_style="choice"),
        T.RandomCrop("absolute_range", DETR_CROP_SIZE),
    ])
    return [
        T.RandomFlip(horizontal=True),
        T.RandomApply(crop, prob=DETR_CROP_PROB),
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        ),
    ]


def build_train_mapper(cfg) -> CheckedDatasetMapper:
    """The training mapper: Detectron2's augmentation, or the DETR-style one when
    ``INPUT.DETR_CROP.ENABLED`` (boxes cut by the crop are clipped, empty ones removed)."""
    if cfg.INPUT.DETR_CROP.ENABLED:
        return CheckedDatasetMapper(cfg, is_train=True, augmentations=detr_augmentations(cfg))
    return CheckedDatasetMapper(cfg, is_train=True)
