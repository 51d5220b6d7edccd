"""What the inference tools (``tools/predict.py``, ``visualize_refinement.py``, ``measure_latency.py``,
``export.py``) share: expanding ``--input`` into image files (and reading them, skipping what cannot be
read), and building a model with its weights and class names, with
one-line errors."""

from __future__ import annotations

import glob
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from .checkpoint.classes import CHECKPOINT_KEY as CLASSES_KEY
from .checkpoint.classes import ClassNames, resolve_classes
from .checkpoint.loading import shapes_checked
from .errors import UserInputError

__all__ = ["IMAGE_EXTENSIONS", "find_inputs", "read_inputs", "check_weights", "build_inference_model"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_NAMED_FILES = 5  # files that are not images named per folder; the others are counted


def _name_other_files(folder: str) -> None:
    """Name on stderr, in one line, the files of ``folder`` that are not images by their extension
    (hidden files, such as ``.DS_Store``, left out)."""
    others = sorted(
        f for f in os.listdir(folder)
        if not f.startswith(".") and not f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, f))
    )
    if others:
        named = ", ".join(others[:_NAMED_FILES]) + (
            f" and {len(others) - _NAMED_FILES} more" if len(others) > _NAMED_FILES else ""
        )
        noun = "file" if len(others) == 1 else "files"
        print(f"skipped {len(others)} {noun} of {folder} that are not images "
              f"({' '.join(IMAGE_EXTENSIONS)}): {named}", file=sys.stderr)


def find_inputs(patterns: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``--input`` patterns -> ``(image files, patterns that named no file)``: files as given, globs
    expanded (sorted), folders -> their image files (sorted, by extension; the folder's other files
    are named on stderr, ``skipped N files of FOLDER that are not images ...``)."""
    paths: List[str] = []
    missing: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            _name_other_files(pattern)
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not found:
            missing.append(pattern)
        paths.extend(found)
    return paths, missing


def read_inputs(patterns: Sequence[str], image_format: str) -> List[np.ndarray]:
    """The readable images of ``--input`` patterns (:func:`find_inputs`), (H, W, 3) in
    ``image_format``; a pattern that names no file and a file that is not a readable image are named
    on stderr (``skipped ...``) and left out. Raises UserInputError when none is left."""
    paths, missing = find_inputs(patterns)
    for pattern in missing:
        print(f"skipped {pattern}: no such file, folder with images, or matching glob", file=sys.stderr)
    images = []
    for path in paths:
        try:
            images.append(read_image(path, format=image_format))
        except Exception as e:  # PIL / OS errors: any reason the file is not a readable image
            print(f"skipped {path}: cannot read image: {' '.join(str(e).split())}", file=sys.stderr)
    if not images:
        raise UserInputError(f"no readable image among --input {' '.join(patterns)}")
    return images


def check_weights(path: str) -> None:
    """Fail early, naming ``MODEL.WEIGHTS``, when it names a local file that does not exist; warn
    when it is empty (the model keeps its random initialisation)."""
    if not path:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation")
    elif "://" not in path and not os.path.isfile(path):
        raise UserInputError(f"MODEL.WEIGHTS: checkpoint file not found: {path}")


def build_inference_model(cfg) -> Tuple[torch.nn.Module, Optional[ClassNames]]:
    """``build_model(cfg)`` in eval mode with ``MODEL.WEIGHTS`` loaded (:func:`check_weights`), and
    the class names of its training data (:func:`~deqdet.checkpoint.classes.resolve_classes`).

    Raises:
        UserInputError: ``MODEL.WEIGHTS`` names no file, or weights whose shapes differ from the
            model's (another class count: the message names both and the ``NUM_CLASSES`` keys to set;
            :func:`~deqdet.checkpoint.loading.shapes_checked`).
    """
    check_weights(cfg.MODEL.WEIGHTS)
    model = build_model(cfg)
    checkpointer = DetectionCheckpointer(model)
    with shapes_checked(checkpointer, cfg.MODEL.WEIGHTS, inference_cfg=cfg):
        rest = checkpointer.load(cfg.MODEL.WEIGHTS)  # what the checkpoint holds besides the model
    return model.eval(), resolve_classes(cfg, rest.get(CLASSES_KEY))
