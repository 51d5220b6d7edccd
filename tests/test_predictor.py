"""Inference on hostile inputs: DefaultPredictor on blank, 1x1, 16x16, very wide and very tall
images and on grayscale / RGBA files (read as Detectron2 reads them) returns well-formed
Instances (boxes inside the image, finite scores) for every kind of detector (random weights);
deqdet's Predictor also takes grayscale and RGBA arrays and refuses other arrays in one line."""

import os

import numpy as np
import pytest
import torch
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from PIL import Image

from deqdet.engine import build_config
from deqdet.errors import UserInputError
from deqdet.predictor import Predictor, as_three_channels
from tests.helpers import ROOT, config_file

DETECTORS = {  # config -> overrides keeping every candidate (random weights score low)
    "configs/shapes/deqdet_r18.yaml": [],
    "configs/shapes/atss_dyhead_r18.yaml": ["MODEL.ATSS.INFERENCE_TH", "0.0"],
    "configs/shapes/retinanet_r18.yaml": ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"],
    "configs/shapes/dyhead_deqdet_r18.yaml": [],
}


def _hostile_arrays():
    rng = np.random.default_rng(0)
    return {
        "blank": np.zeros((256, 256, 3), np.uint8),
        "1x1": np.full((1, 1, 3), 128, np.uint8),
        "16x16": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        "4000x300": rng.integers(0, 256, (300, 4000, 3), dtype=np.uint8),
        "300x4000": rng.integers(0, 256, (4000, 300, 3), dtype=np.uint8),
    }


def _hostile_files(folder, input_format):
    """A grayscale and an RGBA PNG, read by detectron2's read_image in the model's channel order."""
    rgb = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    images = {}
    for mode in ("L", "RGBA"):
        path = folder / f"{mode}.png"
        Image.fromarray(rgb).convert(mode).save(path)
        images[f"{mode} file"] = read_image(str(path), format=input_format)
    return images


def _assert_well_formed(instances, height, width, what):
    assert instances.image_size == (height, width), what
    boxes = instances.pred_boxes.tensor
    assert len(instances) > 0 and torch.isfinite(boxes).all() and torch.isfinite(instances.scores).all(), what
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all(), what
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all(), what
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all(), what
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < 8)).all(), what


@pytest.mark.parametrize("config", sorted(DETECTORS))
def test_default_predictor_on_hostile_images(config, tmp_path):
    torch.manual_seed(0)
    cfg = build_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu", *DETECTORS[config]])
    predictor = DefaultPredictor(cfg)
    for name, image in {**_hostile_arrays(), **_hostile_files(tmp_path, cfg.INPUT.FORMAT)}.items():
        with torch.no_grad():
            instances = predictor(image)["instances"]
        _assert_well_formed(instances, image.shape[0], image.shape[1], f"{config}: {name}")


def test_predictor_takes_grayscale_and_rgba_arrays():
    gray = np.random.default_rng(2).integers(0, 256, (30, 20), dtype=np.uint8)
    assert as_three_channels(gray).shape == (30, 20, 3)
    assert (as_three_channels(gray) == gray[:, :, None]).all()
    assert (as_three_channels(gray[:, :, None]) == as_three_channels(gray)).all()
    rgba = np.dstack([gray, gray // 2, gray // 3, np.full_like(gray, 7)])
    assert (as_three_channels(rgba) == rgba[:, :, :3]).all()
    cfg = build_config(config_file("shapes", "retinanet_r18.yaml"),
                       ["MODEL.DEVICE", "cpu", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"])
    predictor = Predictor(cfg)
    with torch.no_grad():
        for image in (gray, rgba):
            _assert_well_formed(predictor(image)["instances"], 30, 20, image.shape)
    for bad, fragment in [(gray.astype(np.float32), "expected a uint8 numpy image, got float32"),
                          (np.zeros((0, 5, 3), np.uint8), "got (0, 5, 3)"),
                          (np.zeros((5, 5, 2), np.uint8), "got (5, 5, 2)")]:
        with pytest.raises(UserInputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            predictor(bad)
