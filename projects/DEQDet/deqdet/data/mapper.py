"""Dataset mappers."""

from __future__ import annotations

from typing import List

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from PIL import UnidentifiedImageError

from ..errors import UserInputError

__all__ = ["CheckedDatasetMapper", "build_train_mapper", "detr_augmentations"]


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` whose image errors name the file at fault."""

    def __call__(self, dataset_dict: dict) -> dict:
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            return super().__call__(dataset_dict)
        except FileNotFoundError as e:
            raise UserInputError(f"image not found: {file_name}") from e
        except (UnidentifiedImageError, OSError) as e:
            raise UserInputError(f"cannot read image {file_name}: {e}") from e
        except SizeMismatchError as e:
            raise UserInputError(f"image {file_name} does not match its annotation: {e}") from e


def detr_augmentations(cfg) -> List[T.Augmentation]:
    """DETR-style training augmentation: horizontal flip; with probability ``INPUT.DETR_CROP.PROB``
    a resize of the shortest edge to one of ``RESIZE_SIZES`` and a random ``absolute_range`` crop of
    ``CROP_SIZE``; then the multi-scale resize of ``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN``."""
    c = cfg.INPUT.DETR_CROP
    crop = T.AugmentationList([
        T.ResizeShortestEdge(c.RESIZE_SIZES, cfg.INPUT.MAX_SIZE_TRAIN, sample_style="choice"),
        T.RandomCrop("absolute_range", c.CROP_SIZE),
    ])
    return [
        T.RandomFlip(horizontal=True),
        T.RandomApply(crop, prob=c.PROB),
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
    ]


def build_train_mapper(cfg) -> CheckedDatasetMapper:
    """The training mapper: Detectron2's augmentation, or the DETR-style one when
    ``INPUT.DETR_CROP.ENABLED`` (boxes cut by the crop are clipped, empty ones removed)."""
    if cfg.INPUT.DETR_CROP.ENABLED:
        return CheckedDatasetMapper(cfg, is_train=True, augmentations=detr_augmentations(cfg))
    return CheckedDatasetMapper(cfg, is_train=True)
