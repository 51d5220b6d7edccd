"""ATSS: adaptive training sample selection on hand-built anchors, centerness targets, head shapes."""

import torch

from deqdet.modeling.dyhead.atss import atss_assign, centerness_targets


def _grid_anchors(stride, n):
    """n x n square anchors of side ``stride`` centred on the cells of a stride-``stride`` grid."""
    anchors = []
    for i in range(n):
        for j in range(n):
            cx, cy = stride * j + stride / 2, stride * i + stride / 2
            anchors.append([cx - stride / 2, cy - stride / 2, cx + stride / 2, cy + stride / 2])
    return torch.tensor(anchors)


def test_atss_assignment_hand_computed():
    # A 32 x 32 image; level 0: 4 x 4 anchors of side 8 (indices 0-15), level 1: 2 x 2 of side 16 (16-19).
    anchors = [_grid_anchors(8, 4), _grid_anchors(16, 2)]
    gt = torch.tensor([[16.0, 15.0, 27.0, 28.0], [12.0, 15.0, 23.0, 20.0]])
    # Box 0, centre (21.5, 21.5). 3 nearest centres per level: level 0 anchors 10 (20, 20), 11 (28, 20),
    # 14 (20, 28); level 1 anchors 19 (24, 24), 17 (8, 24), 18 (24, 8).
    # IoUs: 10: 8 * 8 / 143 = 0.4476, 11: 0.1311, 14: 0.1829, 19: 0.4944, 17: 0.0284, 18: 0. Mean
    # 0.2141, std 0.2089 -> threshold 0.4230: anchors 10 and 19, both centres inside box 0.
    # Box 1, centre (17.5, 17.5): candidates 10, 6, 9 / 19, 17, 18 with IoUs 0.3077, 0.0625, 0.1553 /
    # 0.0989, 0.0230, 0.0542: threshold 0.2425 passes anchor 10 only, whose centre (20, 20) lies on the
    # box's bottom edge y = 20: not inside, so box 1 gets no positive.
    expected = torch.full((20,), -1)
    expected[[10, 19]] = 0
    assert torch.equal(atss_assign(anchors, gt, topk=3), expected)


def test_atss_anchor_claimed_by_two_boxes_goes_to_the_higher_iou():
    # One level, 3 anchors, topk 3: every anchor is a candidate of every box.
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [40.0, 40.0, 50.0, 50.0]])]
    gt = torch.tensor([[2.0, 0.0, 14.0, 10.0], [0.0, 0.0, 12.0, 10.0]])
    # Box 0: IoUs 80/140 = 0.5714, 40/180 = 0.2222, 0: mean 0.2646 + std 0.2881 = 0.5527 -> anchor 0.
    # Box 1: IoUs 100/120 = 0.8333, 20/200 = 0.1, 0: mean 0.3111 + std 0.4550 = 0.7661 -> anchor 0.
    # Anchor 0 (centre (5, 5), inside both) goes to box 1, its higher IoU.
    assert torch.equal(atss_assign(anchors, gt, topk=3), torch.tensor([1, -1, -1]))


def test_atss_no_boxes_means_all_background():
    anchors = [_grid_anchors(8, 2)]
    assert torch.equal(atss_assign(anchors, torch.zeros(0, 4), topk=9), torch.full((4,), -1))


def test_centerness_targets_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 4.0, 4.0], [8.0, 8.0, 12.0, 12.0]])  # centres (2, 2), (10, 10)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 20.0, 20.0]])
    # (2, 2) in [0, 10] x [0, 4]: left 2, right 8, top 2, bottom 2 -> sqrt(2/8 * 2/2) = 0.5.
    # (10, 10) at the centre of [0, 20]^2 -> 1.
    assert torch.allclose(centerness_targets(anchors, boxes), torch.tensor([0.5, 1.0]))
