"""tools/extract_backbone.py: the RetinaNet demo's trained ResNet initialises the query detectors'
ResNet (same depth and widths) tensor for tensor, through Detectron2's checkpointer."""


import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.modeling.backbone import ResNet

from deqdet.engine import build_config
from tests.helpers import config_file


def _model(name):
    return build_model(build_config(config_file("shapes", name), ["MODEL.DEVICE", "cpu"]))


def test_demo_backbone_loads_into_the_query_detector(tmp_path, capsys):
    from tools.extract_backbone import main

    retinanet = _model("retinanet_demo.yaml")
    with torch.no_grad():  # make every tensor distinguishable from a fresh initialisation
        for i, p in enumerate(retinanet.backbone.bottom_up.state_dict().values()):
            p.fill_(i + 0.5)
    src, dst = tmp_path / "demo.pth", tmp_path / "backbone.pth"
    torch.save({"model": retinanet.state_dict()}, src)
    assert main([str(src), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out

    query = _model("adamixer_r18.yaml")
    DetectionCheckpointer(query).load(str(dst))
    expected = retinanet.backbone.bottom_up.state_dict()
    loaded = query.backbone.state_dict()
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_wrong_prefix_is_named(tmp_path, capsys):
    from tools.extract_backbone import main

    src = tmp_path / "plain.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1)}}, src)
    assert main([str(src), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "backbone.bottom_up." in err and "top-level names: backbone" in err


def _trunk(model):
    """The one ResNet of any of the shapes detectors, wherever the detector nests it."""
    (resnet,) = [m for m in model.modules() if isinstance(m, ResNet)]
    return resnet


def test_by_suffix_backbone_loads_into_every_detector(tmp_path):
    from tools.extract_backbone import main

    retinanet = _model("retinanet_demo.yaml")
    with torch.no_grad():
        for i, p in enumerate(retinanet.backbone.bottom_up.state_dict().values()):
            p.fill_(i + 0.5)
    src, dst = tmp_path / "demo.pth", tmp_path / "trunk.pth"
    torch.save({"model": retinanet.state_dict()}, src)
    assert main([str(src), str(dst), "--by-suffix"]) == 0
    assert next(iter(torch.load(dst)["model"])).split(".")[0] in ("stem", "res2", "res3", "res4", "res5")

    expected = retinanet.backbone.bottom_up.state_dict()
    for name in ("retinanet_dyhead_deqdet_r18.yaml", "atss_dyhead_r18.yaml", "deqdet_r18.yaml"):
        model = _model(name)
        untouched = {k: v.clone() for k, v in model.state_dict().items()}
        DetectionCheckpointer(model).load(str(dst))
        loaded = _trunk(model).state_dict()
        assert sorted(loaded) == sorted(expected), name
        for key, tensor in expected.items():
            assert torch.equal(loaded[key], tensor), (name, key)
        trunk_ids = {id(t) for t in _trunk(model).state_dict(keep_vars=True).values()}
        for key, tensor in model.state_dict(keep_vars=True).items():  # nothing else was overwritten
            if id(tensor) not in trunk_ids:
                assert torch.equal(tensor, untouched[key]), (name, key)
