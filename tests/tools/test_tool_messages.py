"""What the tools say: the class-count warning only when the counts differ (with the right numbers),
a detection listing whose stated count is the count listed, and the files of an input folder that
are not images named once."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.structures import Instances
from PIL import Image

from deqdet.checkpoint.classes import resolve_classes
from deqdet.engine import build_config
from deqdet.inference import find_inputs, read_inputs
from tests.data.hostile_data import ATSS_CONFIG, TINY_ATSS


@pytest.fixture()
def three_class_config(tmp_path):
    """The tiny ATSS config (3 classes) whose DATASETS.TEST is a registered 3-class COCO file."""
    categories = [{"id": i, "name": name} for i, name in enumerate(["cat", "dog", "emu"], 1)]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    return build_config(ATSS_CONFIG, [
        *TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "3", "MODEL.WEIGHTS", "model.pth",
        "DATASETS.COCO_FILES", f"('three_val={gt}:{tmp_path}',)", "DATASETS.TEST", "('three_val',)"])


def _entry(names):
    return {"names": names, "dataset_ids": None, "source": "dataset 'mine_train'"}


def test_class_count_warning_only_when_the_counts_differ(three_class_config, caplog):
    with caplog.at_level(logging.WARNING, logger="deqdet"):
        classes = resolve_classes(three_class_config, _entry(["a", "b", "c"]))
    assert classes.names == ("a", "b", "c")
    assert [r.getMessage() for r in caplog.records] == []  # 3 classes each: nothing to say
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deqdet"):
        resolve_classes(three_class_config, _entry(["a", "b"]))
    assert [r.getMessage() for r in caplog.records] == [
        "class names from model.pth (trained on dataset 'mine_train') (2 classes) are used; the config's "
        "dataset 'three_val' has 3",
        "the model has 3 classes but model.pth (trained on dataset 'mine_train') names 2: labels may be "
        "wrong",
    ]


def _instances(scores):
    instances = Instances((10, 10))
    instances.scores = torch.tensor(scores)
    instances.pred_classes = torch.arange(len(scores))
    return instances


def test_predict_listing_states_the_count_it_lists():
    from tools.predict import Predictor

    predictor = SimpleNamespace(classes=None)  # labels are class indices
    six = Predictor.describe(predictor, _instances([0.3, 0.9, 0.5, 0.8, 0.7, 0.6]))
    assert six == "6 detections, the 5 highest: 1 0.90, 3 0.80, 4 0.70, 5 0.60, 2 0.50"
    assert Predictor.describe(predictor, _instances([0.4, 0.6])) == "2 detections: 1 0.60, 0 0.40"
    assert Predictor.describe(predictor, _instances([0.5])) == "1 detection: 0 0.50"
    assert Predictor.describe(predictor, _instances([])) == "0 detections"


def test_files_of_an_input_folder_that_are_not_images_are_named_once(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "labels.csv").write_text("x")
    (folder / ".DS_Store").write_bytes(b"")
    (folder / "more").mkdir()
    assert find_inputs([str(folder)]) == ([str(folder / "a.png")], [])
    assert capsys.readouterr().err.splitlines() == [
        f"skipped 2 files of {folder} that are not images (.jpg .jpeg .png .bmp .tif .tiff .webp): "
        "labels.csv, notes.txt"
    ]
    assert len(read_inputs([str(folder)], "BGR")) == 1
    assert capsys.readouterr().err.count("notes.txt") == 1
