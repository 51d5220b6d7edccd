"""The "adamixer" converter maps the official R50 checkpoint's key set (fixture, read from the
official code) onto QueryDetector built from configs/adamixer_r50_1x.yaml, tensor for tensor."""


import pytest
import torch
from detectron2.modeling import build_model

from deqdet.checkpoint import convert_official
from deqdet.engine import build_config
from tests.helpers import config_file, official_state_dict


@pytest.fixture(scope="module")
def model():
    return build_model(build_config(config_file("adamixer_r50_1x.yaml"), ["MODEL.DEVICE", "cpu"]))


def test_every_tensor_of_the_official_forward_maps_onto_the_model(model):
    official = official_state_dict("adamixer")
    conversion = convert_official(official, "adamixer")
    ours = model.state_dict()
    assert sorted(conversion.state_dict) == sorted(ours)
    for name, tensor in conversion.state_dict.items():
        assert tuple(tensor.shape) == tuple(ours[name].shape), name
    # Dropped, listed explicitly: only the BatchNorm counters (the backbone runs with norm_eval).
    assert conversion.dropped == sorted(k for k in official if k.endswith("num_batches_tracked"))
    assert len(conversion.dropped) == 53
    # Spot checks that values land on the right tensors.
    pairs = {
        "backbone.layer3.5.bn2.running_var": "backbone.res4.5.conv2.norm.running_var",
        "backbone.layer1.0.downsample.0.weight": "backbone.res2.0.shortcut.weight",
        "backbone.bn1.bias": "backbone.stem.conv1.norm.bias",
        "neck.lateral_convs.3.conv.weight": "neck.convs.3.weight",
        "rpn_head.init_proposal_bboxes.weight": "queries.init_boxes",
        "roi_head.bbox_head.4.ffn.layers.1.weight": "decoder.stages.4.ffn.2.weight",
        "roi_head.bbox_head.0.sampling_n_mixing.norm.bias": "decoder.stages.0.mixing_norm.bias",
        "roi_head.bbox_head.5.attention.attn.in_proj_weight": "decoder.stages.5.attention.in_proj_weight",
        "roi_head.bbox_head.2.sampling_n_mixing.adaptive_mixing.out_proj.weight":
            "decoder.stages.2.mixing.out_proj.weight",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(conversion.state_dict[mine], official[theirs]), (theirs, mine)
    model.load_state_dict(conversion.state_dict, strict=True)


def test_unknown_key_is_named():
    official = official_state_dict("adamixer")
    official["roi_head.bbox_head.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="roi_head.bbox_head.0.mystery.weight"):
        convert_official(official, "adamixer")


def test_cli_writes_a_detectron2_checkpoint(tmp_path, capsys):
    from tools.convert_official import main

    official = {
        k: v for k, v in official_state_dict("adamixer").items() if k.startswith(("neck.", "rpn_head."))
    }
    official["backbone.bn1.num_batches_tracked"] = torch.tensor(7)
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"state_dict": {k: v.clone() for k, v in official.items()}, "meta": {}}, src)
    assert main(["--source", "adamixer", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "dropped (unused by the official forward): backbone.bn1.num_batches_tracked" in out
    saved = torch.load(dst, weights_only=False)
    assert saved["matching_heuristics"] is False
    content = official["rpn_head.init_content_features.weight"]
    assert torch.equal(saved["model"]["queries.content.weight"], content)
