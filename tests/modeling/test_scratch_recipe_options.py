"""Options for training the combined detector from scratch: per-level tower norms, identity-initialised
DyHead blocks, query content from the dense head's features, IoU-aware decoder targets, one-to-many
matching, box and classification losses on every query on an object, box-relative RAP. Each default
keeps the official behaviour."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from fvcore.nn import sigmoid_focal_loss

from deqdet.engine import build_config
from deqdet.modeling.dyhead.atss import ATSSHead
from deqdet.modeling.dyhead.dyconv import DyConv
from deqdet.modeling.meta_arch import quality_logits
from deqdet.modeling.query import HungarianMatcher, SetCriterion
from tests.helpers import config_file
from tests.test_dense_query import _inputs

COMBINED = config_file("shapes", "dyhead_deqdet_r18.yaml")
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.DEQDET.MAX_ITERS", "3", "MODEL.QUERY.NUM_QUERIES", "8"]


def _pyramid(channels=32, sizes=(16, 8, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i + 3}": torch.randn(2, channels, s, s, generator=g) for i, s in enumerate(sizes)}


# ----------------------------------------------------------------------------------------- DyHead block
def test_identity_init_block_starts_as_the_identity_and_learns_its_scale():
    torch.manual_seed(0)
    block = DyConv(32, 32, identity_init=True)
    features = _pyramid()
    out = block(features)
    for name, x in features.items():
        torch.testing.assert_close(out[name], x, rtol=0, atol=0)
    sum(o.square().sum() for o in block(_pyramid(seed=1)).values()).backward()
    assert block.residual_scale.grad.abs().sum() > 0


def test_identity_init_block_adds_the_official_block_scaled():
    torch.manual_seed(0)
    official = DyConv(32, 32)
    torch.manual_seed(0)
    residual = DyConv(32, 32, identity_init=True)
    with torch.no_grad():
        residual.residual_scale.fill_(0.5)
    features = _pyramid()
    expected, got = official(features), residual(features)
    for name, x in features.items():
        torch.testing.assert_close(got[name], x + 0.5 * expected[name])


def test_official_block_has_no_residual_parameter():
    names = set(DyConv(32, 32).state_dict())
    assert not any("residual" in n for n in names)
    assert set(DyConv(32, 32, identity_init=True).state_dict()) == names | {"residual_scale"}


# ------------------------------------------------------------------------------------ ATSS tower norms
def _head(norm, per_level, seed=0):
    torch.manual_seed(seed)
    shapes = [ShapeSpec(channels=32, stride=s) for s in (8, 16, 32)]
    return ATSSHead(input_shape=shapes, num_classes=3, num_anchors=1, num_convs=2, norm=norm, prior_prob=0.01,
                    norm_per_level=per_level)


def test_per_level_norms_train_like_the_shared_norm_but_keep_each_levels_statistics():
    shared, per_level = _head("BN", False), _head("BN", True)
    assert per_level.cls_norms is not None and len(per_level.cls_norms) == 3
    features = list(_pyramid().values())
    # in training both normalise each level with its own batch statistics: same outputs
    for a, b in zip(shared(features), per_level(features)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
    # but the shared norm's running mean has seen the levels one after another; each per-level norm
    # holds only its own level's: 0.1 x the batch mean of the first conv's output on that level
    for level, feature in enumerate(features):
        conv_out = per_level.cls_tower[0](feature)
        torch.testing.assert_close(
            per_level.cls_norms[level][0].running_mean, 0.1 * conv_out.mean(dim=(0, 2, 3))
        )
    means = torch.stack([per_level.cls_norms[lv][0].running_mean for lv in range(3)])
    assert not torch.allclose(means[0], means[2])


def test_per_level_norms_default_off_keeps_the_official_names():
    assert _head("GN", False).cls_norms is None
    official = set(_head("GN", False).state_dict())
    assert "cls_tower.1.weight" in official and not any("norms" in n for n in official)


# ------------------------------------------------------------------------------ IoU-aware set targets
def _criterion(cls_target):
    w = dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)
    return SetCriterion(HungarianMatcher(**w), **w, cls_target=cls_target)


def _one_query_case():
    logits = torch.tensor([[[0.3, -1.0]]])  # (B=1, N=1, K=2)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 20.0]]])  # IoU with the gt below: 10 x 10 / (10 x 20) = 0.5
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
                "whwh": torch.tensor([100.0, 100.0, 100.0, 100.0])}]
    return logits, boxes, targets


def test_iou_target_is_the_quality_focal_loss_hand_computed():
    logits, boxes, targets = _one_query_case()
    loss = _criterion("iou").single(logits, boxes, targets, num_matched=1.0)["loss_cls"]
    p0, p1 = torch.sigmoid(torch.tensor(0.3)), torch.sigmoid(torch.tensor(-1.0))
    positive = -(0.5 * torch.log(p0) + 0.5 * torch.log(1 - p0)) * (0.5 - p0).abs() ** 2
    negative = -torch.log(1 - p1) * p1**2
    torch.testing.assert_close(loss, 2.0 * (positive + negative))


def test_one_hot_target_is_the_papers_focal_loss():
    logits, boxes, targets = _one_query_case()
    loss = _criterion("one_hot").single(logits, boxes, targets, num_matched=1.0)["loss_cls"]
    expected = sigmoid_focal_loss(
        logits, torch.tensor([[[1.0, 0.0]]]), alpha=0.25, gamma=2.0, reduction="sum"
    )
    torch.testing.assert_close(loss, 2.0 * expected)


def test_iou_target_rewards_the_better_box():
    _, _, targets = _one_query_case()
    good = torch.tensor([[[0.0, 0.0, 10.0, 11.0]]])
    bad = torch.tensor([[[0.0, 0.0, 10.0, 40.0]]])
    crit = _criterion("iou")
    # with a high score the loss is lower for the better box (its target is near 1)
    high = torch.tensor([[[4.0, -4.0]]])
    assert (
        crit.single(high, good, targets, 1.0)["loss_cls"] < crit.single(high, bad, targets, 1.0)["loss_cls"]
    )
    with pytest.raises(ValueError, match="MODEL.QUERY.CLS_TARGET"):
        _criterion("soft")


def _three_queries_on_one_object():
    """Loss weights and one image of size 100 with one object of class 0 at (0, 0, 10, 10); query 0 is its
    exact box with a high score (matched), query 1 overlaps it by IoU 0.8, query 2 by 0.25."""
    w = dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
                "whwh": torch.tensor([100.0, 100.0, 100.0, 100.0])}]
    logits = torch.tensor([[[4.0, -4.0], [-4.0, -4.0], [-4.0, -4.0]]])
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 5.0, 5.0]]])
    return w, targets, logits, boxes


def test_overlapping_box_loss_regresses_every_query_on_an_object_hand_computed():
    """``matched``: no box loss (query 0 is exact). ``overlapping``: queries 0 and 1 regress, averaged."""
    w, targets, logits, boxes = _three_queries_on_one_object()
    losses = {b: SetCriterion(HungarianMatcher(**w), **w, box_queries=b).single(logits, boxes, targets, 1.0)
              for b in ("matched", "overlapping")}
    assert losses["matched"]["loss_l1"] == 0 and losses["matched"]["loss_giou"] == 0
    # query 1: |8 - 10| / 100 in one coordinate; GIoU 0.8 (enclosing box = union); mean over 2 queries
    torch.testing.assert_close(losses["overlapping"]["loss_l1"], torch.tensor(5.0 * 0.02 / 2))
    torch.testing.assert_close(losses["overlapping"]["loss_giou"], torch.tensor(2.0 * 0.2 / 2))
    torch.testing.assert_close(losses["overlapping"]["loss_cls"], losses["matched"]["loss_cls"])
    with pytest.raises(ValueError, match="MODEL.QUERY.BOX_LOSS_QUERIES"):
        SetCriterion(HungarianMatcher(**w), **w, box_queries="all")


def test_overlapping_classification_makes_every_query_on_an_object_a_positive_hand_computed():
    """With ``cls_queries`` "overlapping" query 1 (IoU 0.8) becomes a positive of class 0,
    query 2 (IoU 0.25) stays background; the box losses are unchanged."""
    w, targets, logits, boxes = _three_queries_on_one_object()
    losses = {c: SetCriterion(HungarianMatcher(**w), **w, cls_queries=c).single(logits, boxes, targets, 1.0)
              for c in ("matched", "overlapping")}
    p = 1.0 / (1.0 + math.exp(4.0))  # sigmoid(-4): query 1's score for class 0
    as_positive = 0.25 * (1 - p) ** 2 * -math.log(p)
    as_negative = 0.75 * p**2 * -math.log(1 - p)
    torch.testing.assert_close(losses["overlapping"]["loss_cls"] - losses["matched"]["loss_cls"],
                               torch.tensor(2.0 * (as_positive - as_negative)))
    for name in ("loss_l1", "loss_giou"):
        torch.testing.assert_close(losses["overlapping"][name], losses["matched"][name])
    # with IoU targets query 1's target is its IoU, 0.8 (quality focal loss, no alpha)
    iou = {c: SetCriterion(HungarianMatcher(**w), **w, cls_target="iou", cls_queries=c).single(
        logits, boxes, targets, 1.0)["loss_cls"] for c in ("matched", "overlapping")}
    qfl = lambda t: -(t * math.log(p) + (1 - t) * math.log(1 - p)) * abs(t - p) ** 2  # noqa: E731
    torch.testing.assert_close(iou["overlapping"] - iou["matched"], torch.tensor(2.0 * (qfl(0.8) - qfl(0.0))))
    with pytest.raises(ValueError, match="MODEL.QUERY.CLS_LOSS_QUERIES"):
        SetCriterion(HungarianMatcher(**w), **w, cls_queries="all")


def test_overlapping_losses_reach_the_combined_detector_and_default_to_matched():
    default = build_model(build_config(COMBINED, SMALL)).criterion
    assert (default.box_queries, default.cls_queries) == ("matched", "matched")
    model = build_model(build_config(COMBINED, SMALL + ["MODEL.QUERY.BOX_LOSS_QUERIES", "overlapping",
                                                         "MODEL.QUERY.CLS_LOSS_QUERIES", "overlapping"]))
    assert (model.criterion.box_queries, model.criterion.cls_queries) == ("overlapping", "overlapping")


def test_matches_per_gt_reaches_the_combined_detectors_matcher_and_defaults_to_one_to_one():
    default = build_model(build_config(COMBINED, SMALL))
    assert default.criterion.matcher.matches_per_gt == 1
    model = build_model(build_config(COMBINED, SMALL + ["MODEL.QUERY.MATCHES_PER_GT", "3"]))
    assert model.criterion.matcher.matches_per_gt == 3


def test_box_unit_perturbation_reaches_the_decoder_and_defaults_to_pixels():
    default = build_model(build_config(COMBINED, SMALL))
    assert default.decoder.perturbation.position_unit == "pixels"
    model = build_model(build_config(COMBINED, SMALL + ["MODEL.DEQDET.PERTURB_POSITION_UNIT", "box"]))
    assert model.decoder.perturbation.position_unit == "box"


# ------------------------------------------------------------------------- query content from features
def test_dense_feature_content_is_the_projected_feature_at_the_boxs_anchor():
    torch.manual_seed(0)
    cfg = build_config(COMBINED, SMALL + ["MODEL.DENSE_QUERY.QUERY_CONTENT", "dense_feature"])
    model = build_model(cfg).eval()
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
        proposals = model.dense_proposals(images, dense, predictions)[0]
        content, xyzr, _ = model._queries(images, dense, predictions)
    assert proposals.features[0, :3].tolist() == [1.0, 2.0, 3.0]
    # its box is that anchor (zero deltas): 64 px centred on ((3 + 0.5) x 16, (2 + 0.5) x 16)
    assert proposals.pred_boxes.tensor[0].tolist() == [24.0, 8.0, 88.0, 72.0]
    n = len(proposals)
    torch.testing.assert_close(content[0, :n], model.content_proj(proposals.features))
    learned = torch.nn.functional.layer_norm(model.queries.content.weight, (content.shape[-1],))
    torch.testing.assert_close(content[0, n:], learned[n:])


def test_dense_feature_content_trains_its_projection():
    torch.manual_seed(0)
    model = build_model(build_config(COMBINED, SMALL + ["MODEL.DENSE_QUERY.QUERY_CONTENT", "dense_feature"]))
    from detectron2.utils.events import EventStorage

    from tests.test_dense_query import _inputs  # the combined detector's two-image batch

    with EventStorage(0):
        losses = model(_inputs())
    sum(losses.values()).backward()
    assert model.content_proj[0].weight.grad.abs().sum() > 0


def test_dense_feature_content_needs_dense_topk():
    with pytest.raises(ValueError, match="QUERY_CONTENT"):
        build_model(build_config(COMBINED, SMALL + ["MODEL.DENSE_QUERY.QUERY_CONTENT", "dense_feature",
                                                    "MODEL.DENSE_QUERY.QUERY_INIT", "whole_image"]))
    with pytest.raises(ValueError, match="MODEL.DENSE_QUERY.QUERY_CONTENT"):
        build_model(build_config(COMBINED, SMALL + ["MODEL.DENSE_QUERY.QUERY_CONTENT", "pooled"]))


# ------------------------------------------------------------------------------ ATSS loss normaliser
def _atss(momentum):
    torch.manual_seed(0)
    cfg_opts = SMALL[:2] + [
        "MODEL.META_ARCHITECTURE", "ATSS", "MODEL.ATSS.LOSS_NORMALIZER_MOMENTUM", str(momentum)
    ]
    return build_model(build_config(COMBINED, cfg_opts))


def _loss_inputs(num_pos, num_anchors=12):
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(num_anchors, 1)
    labels = torch.full((1, num_anchors), 8)
    labels[0, :num_pos] = 0
    boxes = torch.tensor([[2.0, 2.0, 12.0, 14.0]]).repeat(1, num_anchors, 1)
    return (
        anchors, torch.zeros(1, num_anchors, 8), torch.zeros(1, num_anchors, 4), torch.zeros(1, num_anchors),
        labels, boxes,
    )


def test_moving_average_loss_normalizer_as_detectron2_retinanet():
    from detectron2.utils.events import EventStorage

    per_batch, averaged = _atss(0.0), _atss(0.9)
    assert "loss_normalizers" not in per_batch.state_dict() and "loss_normalizers" in averaged.state_dict()
    with EventStorage(0):
        first = [m.losses(*_loss_inputs(4))["loss_cls"] for m in (per_batch, averaged)]
        torch.testing.assert_close(first[0], first[1])  # the average starts at the first batch's value
        second = [m.losses(*_loss_inputs(2))["loss_cls"] for m in (per_batch, averaged)]
    # same summed focal loss, divided by 2 (this batch) or by 0.9 x 4 + 0.1 x 2 = 3.8
    torch.testing.assert_close(second[1], second[0] * 2 / 3.8)
    assert averaged.loss_normalizers[0].item() == pytest.approx(3.8)
    with pytest.raises(ValueError, match="LOSS_NORMALIZER_MOMENTUM"):
        _atss(1.0)


# ------------------------------------------------------------------------------ predicted-IoU branch
def test_quality_loss_is_the_bce_to_each_overlapping_querys_iou_hand_computed():
    """Queries 0 (matched, IoU 1) and 1 (IoU 0.8) train the quality branch, query 2 (IoU 0.25) does not;
    the mean over them at the box losses' scale; the other losses are unchanged."""
    w, targets, logits, boxes = _three_queries_on_one_object()
    quality = torch.tensor([[[0.5], [-1.0], [3.0]]])
    plain = SetCriterion(HungarianMatcher(**w), **w).single(logits, boxes, targets, 1.0)
    losses = SetCriterion(HungarianMatcher(**w), **w, quality_weight=0.5).single(
        logits, boxes, targets, 1.0, quality)
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    bce = lambda x, t: -(t * log_sigmoid(x) + (1 - t) * log_sigmoid(-x))  # noqa: E731
    expected = 0.5 * (bce(0.5, 1.0) + bce(-1.0, 0.8)) / 2
    torch.testing.assert_close(losses["loss_quality"], torch.tensor(expected))
    assert set(losses) == set(plain) | {"loss_quality"}
    for name, value in plain.items():
        torch.testing.assert_close(losses[name], value)
    with pytest.raises(ValueError, match="MODEL.QUERY.QUALITY_WEIGHT"):
        SetCriterion(HungarianMatcher(**w), **w, quality_weight=-1.0)
    with pytest.raises(ValueError, match="MODEL.QUERY.QUALITY_WEIGHT"):  # a branch without a weight
        SetCriterion(HungarianMatcher(**w), **w).single(logits, boxes, targets, 1.0, quality)


def test_quality_scores_are_the_geometric_mean_of_class_and_iou_hand_computed():
    logits, quality = torch.tensor([[[2.0, -3.0], [0.0, 30.0]]]), torch.tensor([[[-1.0], [40.0]]])
    got = quality_logits({"logits": logits, "boxes": torch.zeros(1, 2, 4), "quality": quality}).sigmoid()
    expected = (logits.sigmoid() * quality.sigmoid()).sqrt()
    torch.testing.assert_close(got, expected)
    assert torch.equal(quality_logits({"logits": logits}), logits)


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
