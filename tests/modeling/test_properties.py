"""Property-based tests (hypothesis): box encodings round-trip, the Hungarian matcher finds the
minimum-cost assignment (against brute force), ATSS assignments obey their definition, and the 3D
sampling points stay inside their boxes with level weights summing to 1; NMS read over a prefix of the
candidates keeps what NMS over all of them keeps first."""

import itertools
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import nms

from deqdet.modeling.dense_query import first_kept
from deqdet.modeling.dyhead.atss import atss_assign
from deqdet.modeling.query.boxes import xyxy_to_xyzr, xyzr_to_xyxy
from deqdet.modeling.query.matcher import HungarianMatcher
from deqdet.modeling.query.sampling import level_weights, sampling_points

EXAMPLES = settings(max_examples=25, deadline=None)
coord = st.floats(-500.0, 500.0)
size = st.floats(0.5, 1000.0)
one_to_six = st.integers(1, 6)


@st.composite
def xyxy_boxes(draw, n=one_to_six, lo=0.0, hi=400.0, min_size=1.0, max_size=300.0):
    """(n, 4) float64 boxes with corners in [lo, hi + max_size]."""
    rows = []
    for _ in range(draw(n)):
        x, y = draw(st.floats(lo, hi)), draw(st.floats(lo, hi))
        w, h = draw(st.floats(min_size, max_size)), draw(st.floats(min_size, max_size))
        rows.append([x, y, x + w, y + h])
    return torch.tensor(rows, dtype=torch.float64)


@EXAMPLES
@given(x=coord, y=coord, w=size, h=size)
def test_xyxy_xyzr_round_trip(x, y, w, h):
    box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64)
    xyzr = xyxy_to_xyzr(box)
    torch.testing.assert_close(xyzr_to_xyxy(xyzr), box, rtol=1e-9, atol=1e-9)
    # z is the log2 of the geometric mean size, r the log2 aspect ratio.
    assert math.isclose(float(xyzr[0, 2]), 0.5 * math.log2(w * h), abs_tol=1e-9)
    assert math.isclose(float(xyzr[0, 3]), math.log2(h / w), abs_tol=1e-9)


@EXAMPLES
@given(x=coord, y=coord, z=st.floats(-2.0, 12.0), r=st.floats(-6.0, 6.0))
def test_xyzr_xyxy_round_trip(x, y, z, r):
    xyzr = torch.tensor([[x, y, z, r]], dtype=torch.float64)
    torch.testing.assert_close(xyxy_to_xyzr(xyzr_to_xyxy(xyzr)), xyzr, rtol=1e-9, atol=1e-9)


@EXAMPLES
@given(data=st.data(), num_queries=st.integers(1, 5), num_gt=st.integers(0, 5))
def test_hungarian_matcher_finds_the_minimum_cost(data, num_queries, num_gt):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_queries, 3, generator=g)
    boxes = xyzr_to_xyxy(torch.cat([torch.rand(num_queries, 2, generator=g) * 100,
                                    4 + torch.rand(num_queries, 2, generator=g) * 2], dim=1))
    gt_boxes = xyzr_to_xyxy(torch.cat([torch.rand(num_gt, 2, generator=g) * 100,
                                       4 + torch.rand(num_gt, 2, generator=g) * 2], dim=1))
    gt_labels = torch.randint(0, 3, (num_gt,), generator=g)
    whwh = torch.tensor([128.0, 96.0, 128.0, 96.0])
    matcher = HungarianMatcher(2.0, 5.0, 2.0, alpha=0.25, gamma=2.0)
    rows, cols = matcher(logits, boxes, gt_labels, gt_boxes, whwh)
    k = min(num_queries, num_gt)
    assert len(rows) == len(cols) == k and len(set(rows.tolist())) == len(set(cols.tolist())) == k
    if k == 0:
        return
    cost = matcher.cost(logits, boxes, gt_labels, gt_boxes, whwh).double()
    best = math.inf
    if num_queries >= num_gt:  # each gt to a distinct query
        for queries in itertools.permutations(range(num_queries), num_gt):
            best = min(best, float(cost[list(queries), list(range(num_gt))].sum()))
    else:  # each query to a distinct gt
        for gts in itertools.permutations(range(num_gt), num_queries):
            best = min(best, float(cost[list(range(num_queries)), list(gts)].sum()))
    assert float(cost[rows, cols].sum()) <= best + 1e-6


def _iou(a, b):
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    area = lambda x: np.prod(x[2:] - x[:2])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@EXAMPLES
@given(gt=xyxy_boxes(n=st.integers(1, 4), lo=0.0, hi=100.0, min_size=4.0, max_size=60.0),
       topk=st.integers(1, 9))
def test_atss_assignment_invariants(gt, topk):
    """Every positive anchor: among the ``topk`` nearest anchors (by centre) of its box on its level,
    its centre inside the box, its IoU at least the mean + std of those candidates' IoUs, and the
    box of highest IoU among the boxes for which it qualifies."""
    levels = []
    for stride in (8, 16, 32):  # one square anchor of 4 strides per location, 128 x 128 image
        c = (torch.arange(128 // stride, dtype=torch.float64) + 0.5) * stride
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        centre = torch.stack([cx.flatten(), cy.flatten()], dim=1)
        levels.append(torch.cat([centre - 2 * stride, centre + 2 * stride], dim=1))
    index = atss_assign(levels, gt, topk)
    anchors = torch.cat(levels).numpy()
    boxes = gt.numpy()
    offsets = np.cumsum([0] + [len(x) for x in levels])
    qualifies = np.zeros((len(anchors), len(boxes)), dtype=bool)
    for j, box in enumerate(boxes):
        centre = (box[:2] + box[2:]) / 2
        candidates = []
        for start, end in zip(offsets[:-1], offsets[1:]):
            distance = np.linalg.norm((anchors[start:end, :2] + anchors[start:end, 2:]) / 2 - centre, axis=1)
            candidates += (start + np.argsort(distance, kind="stable")[: min(topk, end - start)]).tolist()
        ious = np.array([_iou(anchors[i], box) for i in candidates])
        threshold = ious.mean() + ious.std(ddof=1)
        for i, iou in zip(candidates, ious):
            anchor_centre = (anchors[i, :2] + anchors[i, 2:]) / 2
            inside = min(*(anchor_centre - box[:2]), *(box[2:] - anchor_centre)) > 0.01
            qualifies[i, j] = iou >= threshold - 1e-9 and inside
    assigned = index.numpy()
    for i in range(len(anchors)):
        if assigned[i] < 0:
            # Ties in the nearest-anchor order may pick another candidate set; allow only those.
            continue
        j = assigned[i]
        anchor_centre = (anchors[i, :2] + anchors[i, 2:]) / 2
        assert (anchor_centre > boxes[j, :2]).all() and (anchor_centre < boxes[j, 2:]).all()
        assert qualifies[i, j] or _tied(anchors, boxes[j], i, offsets, topk)
        best = max(_iou(anchors[i], boxes[k]) for k in range(len(boxes)) if qualifies[i, k] or k == j)
        assert _iou(anchors[i], boxes[j]) >= best - 1e-9


def _tied(anchors, box, i, offsets, topk):
    """Whether anchor ``i`` sits exactly at the ``topk``-th nearest distance of its level (a tie)."""
    level = np.searchsorted(offsets, i, side="right") - 1
    start, end = offsets[level], offsets[level + 1]
    centres = (anchors[start:end, :2] + anchors[start:end, 2:]) / 2
    distance = np.linalg.norm(centres - (box[:2] + box[2:]) / 2, axis=1)
    kth = np.sort(distance)[min(topk, end - start) - 1]
    return math.isclose(distance[i - start], kth, rel_tol=1e-9)


@EXAMPLES
@given(boxes=xyxy_boxes(n=st.just(3)), seed=st.integers(0, 2**31 - 1))
def test_sampling_points_stay_in_the_box_and_level_weights_sum_to_1(boxes, seed):
    g = torch.Generator().manual_seed(seed)
    xyzr = xyxy_to_xyzr(boxes)[None]  # (1, 3, 4)
    offsets = torch.rand(1, 3, 16, 3, generator=g, dtype=torch.float64) - 0.5  # in [-0.5, 0.5)
    points = sampling_points(offsets, xyzr)
    lo, hi = boxes[None, :, None, :2], boxes[None, :, None, 2:]
    assert (points[..., :2] >= lo - 1e-9).all() and (points[..., :2] <= hi + 1e-9).all()
    torch.testing.assert_close(points[..., 2], xyzr[:, :, None, 2] + offsets[..., 2])
    weights = level_weights(points[..., 2], (4, 8, 16, 32))
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))


@EXAMPLES
@given(n=st.integers(0, 400), k=st.integers(1, 30), thresh=st.sampled_from([0.3, 0.5, 0.7, 0.9]),
       seed=st.integers(0, 2**16), spread=st.sampled_from([20.0, 400.0]))
def test_first_kept_is_the_full_nms_first_k(n, k, thresh, seed, spread):
    """Clustered boxes (spread 20: most suppressed, so the prefix must grow) and spread ones; distinct
    scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * spread
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 40], dim=1)
    scores = torch.randperm(n, generator=g).float() / max(n, 1)
    assert torch.equal(first_kept(boxes, scores, thresh, k), nms(boxes, scores, thresh)[:k])
