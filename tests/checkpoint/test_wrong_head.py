"""A checkpoint of another class count (3) loaded into an 8-class model: evaluation (train_net.py
--eval-only), prediction (deqdet.predictor, tools/predict.py) and deqdet.inference.build_inference_model
stop with one line naming the checkpoint, both class counts and the NUM_CLASSES keys to set, where
fvcore used to skip the classifier and the model ran a random one; other shapes are refused naming
the first parameters. Fine-tuning from it names the layers that start fresh in one log line."""

import logging

import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import train_net
from deqdet.checkpoint.classes import CHECKPOINT_KEY
from deqdet.engine import Trainer, build_config
from deqdet.errors import UserInputError, one_line
from deqdet.inference import build_inference_model
from deqdet.predictor import Predictor
from tests.helpers import (
    ATSS_DYHEAD,
    COMMON,
    DENSE_QUERY_CONFIG,
    SHAPES_CONFIG,
    TINY,
    TINY_DENSE_QUERY,
    config_file,
    tiny_cfg,
)

NAMES = ["circle", "ring", "ellipse"]
FLAGSHIP_CONFIG = config_file("shapes", "retinanet_dyhead_deqdet_r18.yaml")


def _checkpoint(path, cfg, names=None):
    """Save the freshly built model of ``cfg`` at ``path`` as train_net.py does, with class names
    ``names`` when given; returns the path as a string."""
    torch.manual_seed(0)
    checkpoint = {"model": build_model(cfg).state_dict()}
    if names:
        checkpoint[CHECKPOINT_KEY] = {"names": names, "dataset_ids": [1, 2, 3], "source": "dataset 'three'"}
    torch.save(checkpoint, path)
    return str(path)


def _expected(path, keys, names=True) -> str:
    """The refusal of the 3-class checkpoint at ``path`` by an 8-class model whose class count is ``keys``."""
    quoted = " (circle, ring, ellipse)" if names else ""
    return (f"checkpoint {path} (named by MODEL.WEIGHTS) has 3 classes{quoted} but the model has 8: set "
            + " and ".join(f"{key} 3" for key in keys))


def _refusal(call) -> str:
    with pytest.raises(UserInputError) as info:
        call()
    message = one_line(info.value)
    assert message == str(info.value) and "\n" not in message, message
    return message


@pytest.mark.parametrize("config, dense_key", [(DENSE_QUERY_CONFIG, "MODEL.ATSS.NUM_CLASSES"),
                                               (FLAGSHIP_CONFIG, "MODEL.RETINANET.NUM_CLASSES")])
def test_inference_model_refuses_another_class_count(tmp_path, config, dense_key):
    three = build_config(config, [*TINY_DENSE_QUERY, "MODEL.QUERY.NUM_CLASSES", "3", dense_key, "3"])
    path = _checkpoint(tmp_path / "three.pth", three, NAMES)
    cfg = build_config(config, [*TINY_DENSE_QUERY, "MODEL.WEIGHTS", path])
    message = _refusal(lambda: build_inference_model(cfg))
    assert message == _expected(path, ["MODEL.QUERY.NUM_CLASSES", dense_key])


def test_eval_only_refuses_another_class_count(tmp_path):
    three = build_config(ATSS_DYHEAD[1], [*ATSS_DYHEAD[2:], "MODEL.ATSS.NUM_CLASSES", "3"])
    path = _checkpoint(tmp_path / "three.pth", three)
    argv = ["--eval-only", *ATSS_DYHEAD, "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as info:
        train_net.cli(argv)
    assert info.value.code == "error: " + _expected(path, ["MODEL.ATSS.NUM_CLASSES"], names=False)


def test_predictor_refuses_another_class_count(tmp_path):
    path = _checkpoint(tmp_path / "three.pth", tiny_cfg("MODEL.QUERY.NUM_CLASSES", "3"), NAMES)
    message = _refusal(lambda: Predictor(tiny_cfg("MODEL.WEIGHTS", path)))
    assert message == _expected(path, ["MODEL.QUERY.NUM_CLASSES"])


def test_predict_tool_refuses_another_class_count(tmp_path, capsys):
    """Where the Visualizer used to fail on labels beyond the checkpoint's class names."""
    from tools.predict import main

    path = _checkpoint(tmp_path / "three.pth", tiny_cfg("MODEL.QUERY.NUM_CLASSES", "3"), NAMES)
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 48), (90, 60, 30)).save(image)
    code = main(["--config-file", SHAPES_CONFIG, "--input", str(image), "--confidence-threshold", "0",
                 "--opts", *TINY, "MODEL.WEIGHTS", path])
    assert code == 2
    expected = "error: " + _expected(path, ["MODEL.QUERY.NUM_CLASSES"])
    assert capsys.readouterr().err.strip().splitlines() == [expected]


def test_inference_model_refuses_other_shapes_naming_them(tmp_path):
    narrow = _checkpoint(tmp_path / "narrow.pth", tiny_cfg("MODEL.QUERY.FFN_DIM", "32"))
    message = _refusal(lambda: build_inference_model(tiny_cfg("MODEL.WEIGHTS", narrow)))
    assert message.startswith(
        f"checkpoint {narrow} (named by MODEL.WEIGHTS) does not fit the model of this config, shapes differ: "
        "decoder.init_stage.ffn.0.weight 32x32 in the checkpoint, 64x32 in the model; "), message

    both = _checkpoint(tmp_path / "both.pth",
                       tiny_cfg("MODEL.QUERY.FFN_DIM", "32", "MODEL.QUERY.NUM_CLASSES", "3"))
    message = _refusal(lambda: build_inference_model(tiny_cfg("MODEL.WEIGHTS", both)))
    assert message.startswith(
        _expected(both, ["MODEL.QUERY.NUM_CLASSES"], names=False) + "; other parameters differ in shape "
        "too: decoder.init_stage.ffn.0.weight 32x32 in the checkpoint, 64x32 in the model; "), message


def test_fine_tuning_names_the_fresh_layers_once(tmp_path, caplog):
    path = _checkpoint(tmp_path / "three.pth", tiny_cfg("MODEL.QUERY.NUM_CLASSES", "3"))
    opts = [*TINY, *COMMON, "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "out")]
    cfg = build_config(SHAPES_CONFIG, opts)
    trainer = Trainer(cfg)
    with caplog.at_level(logging.WARNING, logger="deqdet"):
        trainer.resume_or_load(resume=False)
    fresh = [r.getMessage() for r in caplog.records if "start fresh" in r.getMessage()]
    assert fresh == [f"checkpoint {path} (named by MODEL.WEIGHTS): layers of other shapes start fresh: "
                     "decoder.init_stage.fc_cls, decoder.refine_stage.fc_cls"]
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    loaded = trainer.model.state_dict()
    assert torch.equal(loaded["decoder.init_stage.ffn.0.weight"], saved["decoder.init_stage.ffn.0.weight"])
    assert loaded["decoder.init_stage.fc_cls.weight"].shape[0] == 8
