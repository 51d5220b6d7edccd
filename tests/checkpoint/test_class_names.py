"""Class names travel with the model: checkpoints hold the training dataset's class names and
category ids; tools/predict.py and the DefaultPredictor-based Predictor label with them whatever
DATASETS says (DATASETS only for a checkpoint without them), warning when counts disagree."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import train_net
from deqdet.checkpoint.classes import CHECKPOINT_KEY
from deqdet.engine import build_config
from deqdet.predictor import Predictor
from tests.data.hostile_data import ATSS_CONFIG, TINY_ATSS, write_coco

CATEGORY_IDS = (3, 7, 12)
NAMES = ["class3", "class7", "class12"]
SHAPES_NAMES = {"circle", "ring", "ellipse", "square", "frame", "bar", "triangle", "cross"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration ATSS on a 3-class dataset with category ids 3, 7, 12; its final checkpoint."""
    folder = tmp_path_factory.mktemp("own")
    json_path = write_coco(folder / "data", ["good", "good2", "grayscale"], category_ids=CATEGORY_IDS)
    train_net.main(train_net.default_argument_parser().parse_args([
        "--config-file", ATSS_CONFIG, *TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "3", "SOLVER.MAX_ITER", "2",
        "DATASETS.COCO_FILES", f"('names_train={json_path}',)", "DATASETS.TRAIN", "('names_train',)",
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(folder / "out")]))
    return folder / "out" / "model_final.pth", json_path.parent / "good.png"


def test_checkpoints_hold_the_training_class_names(trained):
    checkpoint = torch.load(trained[0], map_location="cpu", weights_only=True)
    assert checkpoint[CHECKPOINT_KEY] == {"names": NAMES, "dataset_ids": list(CATEGORY_IDS),
                                          "source": "dataset 'names_train'"}


def test_predict_labels_with_the_checkpoint_names(trained, capsys, caplog):
    """The README's command with the shapes config (DATASETS.TEST shapes_val, 8 classes): before,
    boxes were labelled with shapes names."""
    from tools.predict import main

    weights, image = trained
    with caplog.at_level(logging.WARNING, logger="deqdet"):
        assert main(["--config-file", ATSS_CONFIG, "--input", str(image), "--confidence-threshold", "0",
                     "--opts", *TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "3", "MODEL.WEIGHTS", str(weights)]) == 0
    listed = capsys.readouterr().out
    labels = {part.split()[0] for part in listed.split(":", 2)[-1].split(",")}
    assert labels and labels <= set(NAMES), listed
    assert any(f"class names from {weights} (trained on dataset 'names_train') (3 classes) are used; the "
               "config's dataset 'shapes_val' has 8" in r.getMessage() for r in caplog.records)


def test_default_predictor_uses_the_checkpoint_names(trained):
    cfg = build_config(ATSS_CONFIG, [*TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "3",
                                     "MODEL.WEIGHTS", str(trained[0]), "DATASETS.TEST", "()"])
    predictor = Predictor(cfg)
    assert predictor.metadata.thing_classes == NAMES
    assert predictor.metadata.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
    out = predictor(np.asarray(Image.open(trained[1]).convert("RGB")))
    assert len(out["instances"]) > 0


def test_checkpoint_without_names_falls_back_to_datasets_with_warnings(trained, tmp_path, caplog):
    checkpoint = torch.load(trained[0], map_location="cpu", weights_only=True)
    del checkpoint[CHECKPOINT_KEY]
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    cfg = build_config(ATSS_CONFIG, [*TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "3", "MODEL.WEIGHTS", str(old)])
    with caplog.at_level(logging.WARNING, logger="deqdet"):
        predictor = Predictor(cfg)
    assert set(predictor.metadata.thing_classes) == SHAPES_NAMES
    messages = [r.getMessage() for r in caplog.records]
    assert f"MODEL.WEIGHTS {old} holds no class names: using those of dataset 'shapes_val'" in messages
    assert "the model has 3 classes but dataset 'shapes_val' names 8: labels may be wrong" in messages
