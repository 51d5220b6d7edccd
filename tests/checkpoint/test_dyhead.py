"""The official microsoft/DynamicHead checkpoint (key names and shapes in a fixture written from their
code) maps one-to-one onto our ATSS R50 + DyHead model, through the API and the CLI."""


import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from deqdet.checkpoint import convert_official
from deqdet.engine import build_config
from tests.helpers import config_file, official_keys


@pytest.fixture(scope="module")
def official():
    shapes = official_keys("dyhead")
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def model():
    cfg = build_config(config_file("dyhead_r50_atss_fpn_1x.yaml"), ["MODEL.DEVICE", "cpu"])
    return build_model(cfg)


def test_official_keys_and_shapes_equal_ours(official, model):
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(official) == 412
    assert ours == {k: list(v.shape) for k, v in official.items()}


def test_conversion_is_the_identity_and_loads_every_tensor(official, model):
    conversion = convert_official(official, "dyhead")
    assert conversion.dropped == []
    assert sorted(conversion.state_dict) == sorted(official)
    model.load_state_dict(conversion.state_dict, strict=True)
    state = model.state_dict()
    for key, value in official.items():
        assert torch.equal(state[key], value), key


def test_cli_round_trip(official, model, tmp_path, capsys):
    from tools.convert_official import main

    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"model": official, "iteration": 89999}, src)
    assert main(["--source", "dyhead", str(src), str(dst)]) == 0
    assert "dropped" not in capsys.readouterr().out
    saved = torch.load(dst, weights_only=False)["model"]
    model.load_state_dict(saved, strict=True)  # raises on any missing or unexpected key
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    DetectionCheckpointer(model).load(str(dst))  # as MODEL.WEIGHTS loads it
    for key, value in official.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_unknown_or_incomplete_keys_are_named(official):
    with pytest.raises(KeyError, match="head.cls_logitz.weight"):
        convert_official({**official, "head.cls_logitz.weight": torch.zeros(1)}, "dyhead")
    partial = dict(official)
    del partial["backbone.dyhead_tower.3.offset.bias"]
    with pytest.raises(KeyError, match="dyhead_tower.3 lacks 'offset.bias'"):
        convert_official(partial, "dyhead")
    with pytest.raises(KeyError, match="dyhead_tower.0.extra.weight"):
        convert_official({**official, "backbone.dyhead_tower.0.extra.weight": torch.zeros(1)}, "dyhead")
