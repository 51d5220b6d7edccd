"""The "deqdet" converter maps the official R50 checkpoint's key set (fixture, read from the official
code) onto QueryDetector + DEQDecoder built from configs/deqdet_r50_1x.yaml, tensor for tensor."""


import pytest
import torch
from detectron2.modeling import build_model

from deqdet.checkpoint import convert_official
from deqdet.engine import build_config
from tests.helpers import config_file, official_state_dict


@pytest.fixture(scope="module")
def model():
    return build_model(build_config(config_file("deqdet_r50_1x.yaml"), ["MODEL.DEVICE", "cpu"]))


def test_every_tensor_of_the_official_forward_maps_onto_the_model(model):
    official = official_state_dict("deqdet")
    conversion = convert_official(official, "deqdet")
    ours = model.state_dict()
    assert sorted(conversion.state_dict) == sorted(ours)
    for name, tensor in conversion.state_dict.items():
        assert tuple(tensor.shape) == tuple(ours[name].shape), name
    # Dropped, listed explicitly: the BatchNorm counters and, per stage, DIIHead's unused DynamicConv
    # (dynamic_layer, norm_in, norm_out, fc_layer, fc_norm: 10 tensors) and its LayerNorm (2).
    counters = [k for k in official if k.endswith("num_batches_tracked")]
    unused = [k for k in official if ".instance_interactive_conv" in k]
    assert len(counters) == 53 and len(unused) == 2 * 12
    assert conversion.dropped == sorted(counters + unused)
    pairs = {
        "neck.convs.2.conv.weight": "neck.convs.2.weight",
        "neck.gn_out.bias": "neck.norm.bias",
        "rpn_head.init_proposal_features.weight": "queries.content.weight",
        "rpn_head.init_proposal_bboxes.weight": "queries.init_boxes",
        "roi_head.bbox_head.0.fc_cls.bias": "decoder.init_stage.fc_cls.bias",
        "roi_head.bbox_head.1.iof_tau": "decoder.refine_stage.iof_tau",
        "roi_head.bbox_head.1.sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight":
            "decoder.refine_stage.mixing.parameter_generator.weight",
        "roi_head.bbox_head.1.ffn.layers.1.bias": "decoder.refine_stage.ffn.2.bias",
        "backbone.layer4.2.bn3.running_mean": "backbone.res5.2.conv3.norm.running_mean",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(conversion.state_dict[mine], official[theirs]), (theirs, mine)
    model.load_state_dict(conversion.state_dict, strict=True)


def test_unknown_key_is_named():
    official = official_state_dict("deqdet")
    official["roi_head.bbox_head.2.fc_cls.weight"] = torch.zeros(1)  # DEQDet has exactly two stages
    with pytest.raises(KeyError, match=r"roi_head\.bbox_head\.2\.fc_cls\.weight"):
        convert_official(official, "deqdet")


def test_cli_converts_and_lists_dropped(tmp_path, capsys):
    from tools.convert_official import main

    stage_1 = "roi_head.bbox_head.1."
    official = {k: v.clone() for k, v in official_state_dict("deqdet").items() if k.startswith(stage_1)}
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"state_dict": official, "meta": {}}, src)
    assert main(["--source", "deqdet", str(src), str(dst)]) == 0
    assert "roi_head.bbox_head.1.instance_interactive_conv.fc_layer.weight" in capsys.readouterr().out
    saved = torch.load(dst, weights_only=False)["model"]
    assert torch.equal(saved["decoder.refine_stage.attention.in_proj_weight"],
                       official["roi_head.bbox_head.1.attention.attn.in_proj_weight"])
