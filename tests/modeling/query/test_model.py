"""The AdaMixer stage, the decoder and the QueryDetector meta-architecture end to end."""


import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from deqdet.engine import build_config
from deqdet.modeling.query import AdaMixerStage, ChannelMapper, InitialQueries
from deqdet.modeling.query.boxes import xyzr_to_xyxy
from tests.helpers import config_file

SHAPES = config_file("shapes", "adamixer_r18.yaml")
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.QUERY.NUM_STAGES", "2", "MODEL.QUERY.NUM_QUERIES", "10"]


def _stage(**kw):
    args = dict(num_classes=3, strides=(4, 8), content_dim=32, feat_channels=16, num_heads=4, ffn_dim=64,
                in_points=4, out_points=6, num_groups=2)
    args.update(kw)
    return AdaMixerStage(**args)


def _features(batch=2, size=(64, 96), channels=16, strides=(4, 8)):
    return [torch.randn(batch, channels, size[0] // s, size[1] // s, requires_grad=True) for s in strides]


def test_official_initialisation():
    torch.manual_seed(0)
    stage = _stage(in_points=9)  # 9 = 3 x 3: offsets start on a regular grid over the box
    bias = stage.sampling_offsets.bias.view(2, 9, 3)
    assert sorted(set(bias[..., 0].flatten().tolist())) == pytest.approx([-1 / 3, 0.0, 1 / 3])
    assert torch.equal(bias[..., 2], torch.full((2, 9), -1.0))
    assert stage.sampling_offsets.weight.abs().sum() == 0
    assert stage.mixing.parameter_generator.weight.abs().sum() == 0
    assert stage.fc_reg.weight.abs().sum() == 0 and stage.fc_reg.bias.abs().sum() == 0
    assert stage.fc_cls.bias.tolist() == pytest.approx([-4.59512] * 3, abs=1e-4)  # prior 0.01
    assert ((stage.iof_tau >= 0) & (stage.iof_tau <= 4)).all()
    odd = _stage(in_points=5).sampling_offsets.bias.view(2, 5, 3)
    assert (odd[..., :2].abs() <= 0.5).all() and torch.equal(odd[..., 2], torch.full((2, 5), -1.0))


def test_stage_shapes_gradients_and_detached_boxes():
    torch.manual_seed(0)
    stage = _stage()
    queries = InitialQueries(num_queries=5, content_dim=32)
    content, xyzr = queries([(64, 96), (60, 80)])
    xyzr = xyzr.clone().requires_grad_()
    features = _features()
    new_content, new_xyzr, logits, boxes, quality = stage(content, xyzr, features)
    assert quality is None  # the papers' stage has no quality branch
    assert new_content.shape == (2, 5, 32) and new_xyzr.shape == (2, 5, 4)
    assert logits.shape == (2, 5, 3) and boxes.shape == (2, 5, 4)
    # fc_reg starts at zero: the first refinement keeps the whole-image boxes
    torch.testing.assert_close(boxes[1], torch.tensor([[0.0, 0.0, 80.0, 60.0]] * 5), atol=1e-3, rtol=0)
    (logits.sum() + boxes.sum()).backward()
    assert xyzr.grad is None  # boxes are detached at the stage's entry
    assert all(f.grad.abs().sum() > 0 for f in features)
    assert queries.content.weight.grad.abs().sum() > 0
    assert stage.fc_reg.weight.grad.abs().sum() > 0 and stage.iof_tau.grad.abs().sum() > 0


def test_initial_queries_cover_the_image_and_content_is_normalised():
    queries = InitialQueries(num_queries=4, content_dim=8)
    content, xyzr = queries([(30, 40)])
    torch.testing.assert_close(xyzr_to_xyxy(xyzr)[0], torch.tensor([[0.0, 0.0, 40.0, 30.0]] * 4))
    torch.testing.assert_close(content.mean(-1), torch.zeros(1, 4), atol=1e-5, rtol=0)
    assert "init_boxes" in queries.state_dict()
    assert not any(p is queries.init_boxes for p in queries.parameters())


@pytest.mark.parametrize("style,kernel", [("AdaMixer", 1), ("DEQDet", 3)])
def test_channel_mappers(style, kernel):
    from detectron2.layers import ShapeSpec

    shapes = {"res2": ShapeSpec(channels=8, stride=4), "res3": ShapeSpec(channels=16, stride=8)}
    neck = ChannelMapper(shapes, ["res2", "res3"], out_channels=32, style=style, num_groups=8)
    assert [c.kernel_size for c in neck.convs] == [(kernel, kernel)] * 2 and neck.strides == [4, 8]
    outs = neck({"res2": torch.randn(2, 8, 16, 16) - 3, "res3": torch.randn(2, 16, 8, 8)})
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8)]
    # what sample_3d gathers from
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs)
    # one shared GroupNorm: per level and group, zero mean (the affine starts as identity)
    torch.testing.assert_close(outs[0].reshape(2, 8, -1).mean(-1), torch.zeros(2, 8), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="NECK_STYLE"):
        ChannelMapper(shapes, ["res2"], 32, "FPN")


def _batch(model_input_size=(96, 128), with_objects=(True, False)):
    batch = []
    for has in with_objects:
        h, w = model_input_size
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0]]) if has else torch.zeros(0, 4))
        inst.gt_classes = torch.tensor([2] if has else [], dtype=torch.int64)
        batch.append({"image": torch.randint(0, 256, (3, h, w)).float(), "instances": inst})
    return batch


def test_query_detector_trains_with_an_empty_image_and_infers():
    torch.manual_seed(0)
    cfg = build_config(SHAPES, SMALL + ["TEST.DETECTIONS_PER_IMAGE", "7"])
    model = build_model(cfg)
    losses = model(_batch())
    assert sorted(losses) == sorted(f"s{i}_loss_{n}" for i in range(2) for n in ("cls", "l1", "giou"))
    sum(losses.values()).backward()
    assert model.backbone.stem.conv1.weight.grad.abs().sum() > 0
    assert model.queries.content.weight.grad.abs().sum() > 0

    model.eval()
    blank = {"image": torch.zeros(3, 96, 128), "height": 192, "width": 256}
    with torch.no_grad():
        (out,) = model([blank])
    inst = out["instances"]
    assert len(inst) == 7 and inst.image_size == (192, 256)
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 192).all()
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all() and (inst.pred_classes < 8).all()
    assert torch.equal(inst.scores, inst.scores.sort(descending=True).values)
