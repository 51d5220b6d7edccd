"""Hungarian matcher against brute force, and the set criterion on hand-checked cases."""

import itertools

import pytest
import torch

from deqdet.modeling.query.criterion import SetCriterion
from deqdet.modeling.query.matcher import HungarianMatcher, focal_cost

WEIGHTS = dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)


def _random_boxes(n, size=100.0):
    xy = torch.rand(n, 2) * size * 0.7
    wh = torch.rand(n, 2) * size * 0.3 + 2.0
    return torch.cat([xy, xy + wh], dim=1)


def test_focal_cost_by_hand():
    logits = torch.tensor([[0.0, 2.0]])
    cost = focal_cost(logits, torch.tensor([1, 0]), alpha=0.25, gamma=2.0)
    p = torch.sigmoid(torch.tensor(2.0)).item()
    pos = -0.25 * (1 - p) ** 2 * torch.log(torch.tensor(p)).item()
    neg = -0.75 * p**2 * torch.log(torch.tensor(1 - p)).item()
    assert cost[0, 0].item() == pytest.approx(pos - neg, rel=1e-5)
    # p = 0.5 for class 0
    assert cost[0, 1].item() == pytest.approx(-0.25 * 0.25 * torch.log(torch.tensor(0.5)).item()
                                              + 0.75 * 0.25 * torch.log(torch.tensor(0.5)).item(), rel=1e-5)


@pytest.mark.parametrize("num_queries,num_gt", [(4, 1), (5, 3), (6, 6), (3, 0)])
def test_matcher_agrees_with_brute_force(num_queries, num_gt):
    torch.manual_seed(num_queries * 10 + num_gt)
    matcher = HungarianMatcher(**WEIGHTS)
    whwh = torch.tensor([100.0, 100.0, 100.0, 100.0])
    for _ in range(5):
        logits = torch.randn(num_queries, 3) * 2
        boxes = _random_boxes(num_queries)
        labels = torch.randint(0, 3, (num_gt,))
        gt = _random_boxes(num_gt)
        rows, cols = matcher(logits, boxes, labels, gt, whwh)
        assert len(rows) == len(cols) == num_gt
        if num_gt == 0:
            continue
        assert sorted(cols.tolist()) == list(range(num_gt)) and len(set(rows.tolist())) == num_gt
        cost = matcher.cost(logits, boxes, labels, gt, whwh)
        best = min(sum(cost[q, g].item() for g, q in enumerate(perm))
                   for perm in itertools.permutations(range(num_queries), num_gt))
        assert cost[rows, cols].sum().item() == pytest.approx(best, rel=1e-5, abs=1e-5)


def _criterion():
    return SetCriterion(HungarianMatcher(**WEIGHTS), **WEIGHTS)


def _target(labels, boxes, w=100.0, h=50.0):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes).view(-1, 4),
            "whwh": torch.tensor([w, h, w, h])}


def test_criterion_by_hand_with_an_empty_image():
    # Image 0: two queries, one object; query 1 is clearly the match. Image 1: no object.
    logits = torch.tensor([[[-5.0, -5.0], [3.0, -5.0]], [[-5.0, -5.0], [0.0, -1.0]]], requires_grad=True)
    boxes = torch.tensor([[[0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 30.0, 20.0]],
                          [[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]]], requires_grad=True)
    targets = [_target([0], [12.0, 10.0, 30.0, 30.0]), _target([], [])]
    losses = _criterion().single({"logits": logits, "boxes": boxes}, targets, num_matched=1.0)
    # L1 on normalised xyxy: |10-12|/100 + 0 + 0 + |20-30|/50 = 0.02 + 0.2
    assert losses["loss_l1"].item() == pytest.approx(5.0 * 0.22, rel=1e-5)
    # GIoU: intersection 18 x 10 = 180, union 200 + 360 - 180 = 380, enclosing 20 x 20 = 400
    giou = 180 / 380 - (400 - 380) / 400
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - giou), rel=1e-5)
    target = torch.zeros(2, 2, 2)
    target[0, 1, 0] = 1
    p = logits.sigmoid()
    focal = -(target * 0.25 * (1 - p) ** 2 * p.log() + (1 - target) * 0.75 * p**2 * (1 - p).log()).sum()
    assert losses["loss_cls"].item() == pytest.approx(2.0 * focal.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert logits.grad[1].abs().sum() > 0  # the empty image still trains its negatives
    assert boxes.grad[1].abs().sum() == 0


def test_criterion_on_a_batch_without_objects_and_per_stage_keys():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    boxes = _random_boxes(6).view(2, 3, 4).requires_grad_()
    targets = [_target([], []), _target([], [])]
    losses = _criterion()([{"logits": logits, "boxes": boxes}] * 2, targets)
    assert sorted(losses) == sorted(f"s{i}_loss_{n}" for i in range(2) for n in ("cls", "l1", "giou"))
    assert losses["s0_loss_l1"].item() == 0.0 and losses["s1_loss_giou"].item() == 0.0
    assert torch.isfinite(losses["s0_loss_cls"]) and losses["s0_loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all()


def test_losses_are_normalised_by_the_number_of_matched_queries():
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 4, 3), _random_boxes(8).view(2, 4, 4)
    targets = [_target([0, 2], _random_boxes(2).tolist()), _target([1], _random_boxes(1).tolist())]
    criterion = _criterion()
    assert criterion.num_matched(targets, 4, "cpu") == 3.0
    one = criterion.single({"logits": logits, "boxes": boxes}, targets, num_matched=1.0)
    three = criterion.single({"logits": logits, "boxes": boxes}, targets, num_matched=3.0)
    for key in one:
        assert three[key].item() == pytest.approx(one[key].item() / 3.0, rel=1e-6)


@pytest.mark.parametrize("num_queries,num_gt,k", [(5, 2, 2), (5, 2, 3), (4, 3, 2), (6, 1, 3)])
def test_one_to_many_matcher_agrees_with_brute_force(num_queries, num_gt, k):
    """Each ground truth takes at most k queries, each query at most one ground truth, min(N, k * M)
    queries match, and the assignment's total cost is the minimum over all such assignments."""
    torch.manual_seed(num_queries * 100 + num_gt * 10 + k)
    matcher = HungarianMatcher(**WEIGHTS, matches_per_gt=k)
    whwh = torch.tensor([100.0, 100.0, 100.0, 100.0])
    for _ in range(3):
        logits, boxes = torch.randn(num_queries, 3) * 2, _random_boxes(num_queries)
        labels, gt = torch.randint(0, 3, (num_gt,)), _random_boxes(num_gt)
        rows, cols = matcher(logits, boxes, labels, gt, whwh)
        num_matches = min(num_queries, k * num_gt)
        assert len(rows) == len(cols) == num_matches and len(set(rows.tolist())) == num_matches
        assert max(torch.bincount(cols, minlength=num_gt).tolist()) <= k
        cost = matcher.cost(logits, boxes, labels, gt, whwh)
        slots = [g for g in range(num_gt) for _ in range(k)]  # gt g repeated k times
        best = min(sum(cost[q, g].item() for q, g in zip(queries, gts))
                   for gts in set(itertools.permutations(slots, num_matches))
                   for queries in itertools.permutations(range(num_queries), num_matches))
        assert cost[rows, cols].sum().item() == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_one_to_one_is_one_match_per_gt_and_one_to_many_normalises_by_its_matches():
    torch.manual_seed(1)
    logits, boxes = torch.randn(2, 4, 3), _random_boxes(8).view(2, 4, 4)
    targets = [_target([0, 2], _random_boxes(2).tolist()), _target([1], _random_boxes(1).tolist())]
    default = _criterion()([{"logits": logits, "boxes": boxes}], targets)
    explicit = SetCriterion(HungarianMatcher(**WEIGHTS, matches_per_gt=1), **WEIGHTS)(
        [{"logits": logits, "boxes": boxes}], targets)
    assert all(torch.equal(default[key], explicit[key]) for key in default)
    # k = 2: image 1 has 2 objects -> min(4, 4) = 4 matches, image 2 has 1 -> 2; 6 in all
    assert SetCriterion.num_matched(targets, 4, "cpu", matches_per_gt=2) == 6.0
    assert SetCriterion.num_matched(targets, 4, "cpu", matches_per_gt=3) == 4.0 + 3.0
    two = SetCriterion(HungarianMatcher(**WEIGHTS, matches_per_gt=2), **WEIGHTS)
    losses = two([{"logits": logits, "boxes": boxes}], targets)
    for name, value in two.single({"logits": logits, "boxes": boxes}, targets, num_matched=6.0).items():
        torch.testing.assert_close(losses[f"s0_{name}"], value)


def test_matches_per_gt_below_one_is_refused():
    with pytest.raises(ValueError, match="MODEL.QUERY.MATCHES_PER_GT"):
        HungarianMatcher(**WEIGHTS, matches_per_gt=0)
