"""The combined detector's own training signals: IoU-aware classification targets, the predicted-IoU
branch and its score, and query content from the dense head's features; the papers' criterion keeps
the one-hot focal loss."""

import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from fvcore.nn import sigmoid_focal_loss

from deqdet.engine import build_config
from deqdet.modeling.dense_query import DenseOutputs, IoUAwareCriterion, quality_logits
from deqdet.modeling.query import HungarianMatcher, SetCriterion
from tests.helpers import config_file
from tests.test_dense_query import _inputs

COMBINED = config_file("shapes", "dyhead_deqdet_r18.yaml")
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.DEQDET.MAX_ITERS", "3", "MODEL.QUERY.NUM_QUERIES", "8"]
WEIGHTS = dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)


def _criterion(cls=IoUAwareCriterion, **kwargs):
    return cls(HungarianMatcher(**WEIGHTS), **WEIGHTS, **kwargs)


def _one_query_case():
    logits = torch.tensor([[[0.3, -1.0]]])  # (B=1, N=1, K=2)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 20.0]]])  # IoU with the gt below: 10 x 10 / (10 x 20) = 0.5
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
                "whwh": torch.tensor([100.0, 100.0, 100.0, 100.0])}]
    return {"logits": logits, "boxes": boxes}, targets


def test_iou_target_is_the_quality_focal_loss_hand_computed():
    prediction, targets = _one_query_case()
    loss = _criterion().single(prediction, targets, num_matched=1.0)["loss_cls"]
    p0, p1 = torch.sigmoid(torch.tensor(0.3)), torch.sigmoid(torch.tensor(-1.0))
    positive = -(0.5 * torch.log(p0) + 0.5 * torch.log(1 - p0)) * (0.5 - p0).abs() ** 2
    negative = -torch.log(1 - p1) * p1**2
    torch.testing.assert_close(loss, 2.0 * (positive + negative))


def test_papers_criterion_keeps_the_one_hot_focal_loss():
    prediction, targets = _one_query_case()
    loss = _criterion(SetCriterion).single(prediction, targets, num_matched=1.0)["loss_cls"]
    expected = sigmoid_focal_loss(
        prediction["logits"], torch.tensor([[[1.0, 0.0]]]), alpha=0.25, gamma=2.0, reduction="sum"
    )
    torch.testing.assert_close(loss, 2.0 * expected)


def test_iou_target_rewards_the_better_box():
    _, targets = _one_query_case()
    high = torch.tensor([[[4.0, -4.0]]])
    good = {"logits": high, "boxes": torch.tensor([[[0.0, 0.0, 10.0, 11.0]]])}
    bad = {"logits": high, "boxes": torch.tensor([[[0.0, 0.0, 10.0, 40.0]]])}
    crit = _criterion()
    # with a high score the loss is lower for the better box (its target is near 1)
    assert crit.single(good, targets, 1.0)["loss_cls"] < crit.single(bad, targets, 1.0)["loss_cls"]


def _three_queries_on_one_object():
    """One image of size 100 with one object of class 0 at (0, 0, 10, 10); query 0 is its exact box with
    a high score (matched), query 1 overlaps it by IoU 0.8, query 2 by 0.25."""
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
                "whwh": torch.tensor([100.0, 100.0, 100.0, 100.0])}]
    logits = torch.tensor([[[4.0, -4.0], [-4.0, -4.0], [-4.0, -4.0]]])
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 5.0, 5.0]]])
    return targets, {"logits": logits, "boxes": boxes}


def test_quality_loss_is_the_bce_to_each_overlapping_querys_iou_hand_computed():
    """Queries 0 (matched, IoU 1) and 1 (IoU 0.8) train the quality branch, query 2 (IoU 0.25) does not;
    the mean over them at the box losses' scale; the other losses are unchanged."""
    targets, prediction = _three_queries_on_one_object()
    quality = torch.tensor([[[0.5], [-1.0], [3.0]]])
    plain = _criterion().single(prediction, targets, 1.0)
    losses = _criterion(quality_weight=0.5).single({**prediction, "quality": quality}, targets, 1.0)
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    bce = lambda x, t: -(t * log_sigmoid(x) + (1 - t) * log_sigmoid(-x))  # noqa: E731
    expected = 0.5 * (bce(0.5, 1.0) + bce(-1.0, 0.8)) / 2
    torch.testing.assert_close(losses["loss_quality"], torch.tensor(expected))
    assert set(losses) == set(plain) | {"loss_quality"}
    for name, value in plain.items():
        torch.testing.assert_close(losses[name], value)
    with pytest.raises(ValueError, match="MODEL.QUERY.QUALITY_WEIGHT"):
        _criterion(quality_weight=-1.0)
    with pytest.raises(ValueError, match="MODEL.QUERY.QUALITY_WEIGHT"):  # a branch without a weight
        _criterion().single({**prediction, "quality": quality}, targets, 1.0)


def test_quality_scores_are_the_geometric_mean_of_class_and_iou_hand_computed():
    logits, quality = torch.tensor([[[2.0, -3.0], [0.0, 30.0]]]), torch.tensor([[[-1.0], [40.0]]])
    got = quality_logits({"logits": logits, "boxes": torch.zeros(1, 2, 4), "quality": quality}).sigmoid()
    expected = (logits.sigmoid() * quality.sigmoid()).sqrt()
    torch.testing.assert_close(got, expected)
    assert torch.equal(quality_logits({"logits": logits}), logits)


def test_papers_detector_refuses_the_predicted_iou_branch():
    with pytest.raises(ValueError, match="MODEL.QUERY.QUALITY_WEIGHT"):
        build_model(build_config(config_file("shapes", "deqdet_r18.yaml"),
                                 ["MODEL.DEVICE", "cpu", "MODEL.QUERY.QUALITY_WEIGHT", "1.0"]))


def test_quality_branch_trains_in_every_supervised_stage_and_scores_the_detections():
    default = build_model(build_config(COMBINED, SMALL))
    assert default.decoder.refine_stage.fc_quality is None
    assert not any("quality" in n for n in default.state_dict())
    torch.manual_seed(0)
    model = build_model(build_config(COMBINED, SMALL + ["MODEL.QUERY.QUALITY_WEIGHT", "1.0"]))
    assert model.criterion.quality_weight == 1.0
    # zero-initialised: every query starts at a predicted IoU of 0.5
    assert model.decoder.init_stage.fc_quality.weight.abs().sum() == 0
    with EventStorage(0):
        losses = model(_inputs())
    assert {"init_loss_quality", "init^1_loss_quality", "iter2_loss_quality"} <= set(losses)
    sum(losses.values()).backward()
    for stage in (model.decoder.init_stage, model.decoder.refine_stage):
        assert stage.fc_quality.weight.grad.abs().sum() > 0
    model.eval()
    batch = _inputs()
    with torch.no_grad():
        queries = model.initial_queries(batch)
        prediction = model.decoder.predict(queries.content, queries.xyzr, queries.features)
        out = model(batch)
    assert prediction["quality"].shape == (*prediction["logits"].shape[:2], 1)
    scores = (prediction["logits"] + queries.prior).sigmoid().mul(prediction["quality"].sigmoid()).sqrt()
    top = scores.flatten(1).max(dim=1).values
    for i, result in enumerate(out):
        torch.testing.assert_close(result["instances"].scores.max(), top[i])


def test_dense_feature_content_is_the_projected_feature_at_the_boxs_anchor():
    torch.manual_seed(0)
    model = build_model(build_config(COMBINED, SMALL)).eval()
    images = model.dense.preprocess_image([{"image": torch.rand(3, 96, 128) * 255}])
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # P3-P7 of a 96 x 128 input
    # every feature says where it is: channels 0, 1, 2 = level, row, column
    dense = []
    for level, (h, w) in enumerate(sizes):
        f = torch.zeros(1, 64, h, w)
        f[0, 0], f[0, 1], f[0, 2] = float(level), *torch.meshgrid(
            torch.arange(float(h)), torch.arange(float(w)), indexing="ij"
        )
        dense.append(f)
    logits = [torch.full((1, 8, h, w), -10.0) for h, w in sizes]
    logits[1][0, 5, 2, 3] = 10.0  # one confident anchor: level 1 (stride 16), row 2, column 3, class 5
    predictions = (
        logits, [torch.zeros(1, 4, h, w) for h, w in sizes], [torch.zeros(1, 1, h, w) for h, w in sizes]
    )
    with torch.no_grad():
        outputs = DenseOutputs.of(model.dense, dense, predictions)
        proposals = model.dense_proposals(images, dense, outputs)[0]
        content, xyzr, _ = model._queries(images, dense, outputs)
    assert proposals.features[0, :3].tolist() == [1.0, 2.0, 3.0]
    # its box is that anchor (zero deltas): 64 px centred on ((3 + 0.5) x 16, (2 + 0.5) x 16)
    assert proposals.pred_boxes.tensor[0].tolist() == [24.0, 8.0, 88.0, 72.0]
    n = len(proposals)
    torch.testing.assert_close(content[0, :n], model.content_proj(proposals.features))
    learned = torch.nn.functional.layer_norm(model.queries.content.weight, (content.shape[-1],))
    torch.testing.assert_close(content[0, n:], learned[n:])


def test_dense_feature_content_trains_its_projection():
    torch.manual_seed(0)
    model = build_model(build_config(COMBINED, SMALL))
    with EventStorage(0):
        losses = model(_inputs())
    sum(losses.values()).backward()
    assert model.content_proj[0].weight.grad.abs().sum() > 0
