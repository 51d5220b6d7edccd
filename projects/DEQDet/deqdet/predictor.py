"""``Predictor``: Detectron2's ``DefaultPredictor`` that also takes grayscale and RGBA arrays,
follows ``TEST.AUTOCAST`` and labels with the class names stored in its checkpoint."""

from __future__ import annotations

import numpy as np
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor

from .autocast import with_inference_autocast
from .errors import UserInputError
from .inference import build_inference_model

__all__ = ["Predictor", "as_three_channels"]


def as_three_channels(image: np.ndarray) -> np.ndarray:
    """``image`` as a uint8 (H, W, 3) array: a grayscale (H, W) or (H, W, 1) array is repeated
    over 3 channels, the alpha channel of an (H, W, 4) array is dropped.

    Raises:
        UserInputError: not a non-empty uint8 array of one of these shapes.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise UserInputError(
            f"expected a uint8 numpy image, got {getattr(image, 'dtype', type(image).__name__)}"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise UserInputError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}"
        )
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


class Predictor(DefaultPredictor):
    """``DefaultPredictor`` (one image in ``cfg.INPUT.FORMAT`` channel order -> ``{"instances"}``)
    whose input goes through :func:`as_three_channels` first, run under ``TEST.AUTOCAST``.

    Attributes:
        classes: the class names of the training data (:class:`~deqdet.checkpoint.classes.ClassNames`,
            from ``MODEL.WEIGHTS``, else from ``DATASETS``; None when neither knows them).
        metadata: a Detectron2 ``Metadata`` with those names as ``thing_classes`` (for ``Visualizer``).
    """

    def __init__(self, cfg):  # DefaultPredictor's, keeping what the checkpoint holds besides the model
        self.cfg = cfg.clone()
        model, self.classes = build_inference_model(self.cfg)
        self.model = with_inference_autocast(model, cfg)
        if self.classes is not None:
            self.metadata = self.classes.metadata()
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise UserInputError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")

    def __call__(self, original_image: np.ndarray) -> dict:
        return super().__call__(as_three_channels(original_image))
