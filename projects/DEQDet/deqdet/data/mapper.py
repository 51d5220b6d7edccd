"""Dataset mappers."""

from __future__ import annotations

from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError
from PIL import UnidentifiedImageError

from ..errors import UserInputError

__all__ = ["CheckedDatasetMapper"]


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
