"""DEQDet's training step as the official code computes it (docs/official_recipes.md): RAP's box jitter
reaches the IoF attention bias as raw (possibly crossed) corners, and the set criterion normalises by
the number of matched queries, averaged over processes."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deqdet.modeling.deq.perturb import RefinementPerturbation, encode_jittered_xyxy
from deqdet.modeling.query.boxes import xyxy_to_xyzr, xyzr_to_xyxy
from deqdet.modeling.query.criterion import SetCriterion
from deqdet.modeling.query.matcher import HungarianMatcher
from deqdet.modeling.query.stage import AdaMixerStage
from tests.helpers import synthetic_batch, tiny_model

LOG_EPS = math.log(1e-7)  # log(IoF + 1e-7) of boxes that do not overlap: -16.118
# A contains B's corner region, B is far from C; C's x corners crossed by the jitter (x0 = 50 > x1 = 30).
BOXES = torch.tensor([[[0.0, 0.0, 100.0, 100.0], [70.0, 70.0, 100.0, 100.0], [50.0, 40.0, 30.0, 60.0]]])


def _attention_bias_over_tau(stage, content, xyzr, iof_boxes=None):
    """The stage's (B * heads, N, N) attention mask divided by each head's tau: log(IoF + 1e-7)."""
    seen = {}
    hook = stage.attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(mask=kwargs["attn_mask"]), with_kwargs=True)
    try:
        with torch.no_grad():
            stage.self_attention(content, xyzr, iof_boxes)
    finally:
        hook.remove()
    return seen["mask"] / stage.iof_tau[:, None, None]


def test_crossed_box_iof_row():
    torch.manual_seed(0)
    stage = AdaMixerStage(num_classes=2, strides=(4,), content_dim=16, feat_channels=8, num_heads=2,
                          ffn_dim=16, in_points=4, out_points=4, num_groups=2)
    content = torch.randn(1, 3, 16)
    # xyzr from |w| = 20, |h| = 20, the bias from the raw corners. C overlaps nothing, so its row is
    # uniform (-16.12 everywhere) and its column is -16.12 in A's and B's rows.
    bias = _attention_bias_over_tau(stage, content, encode_jittered_xyxy(BOXES), iof_boxes=BOXES)
    expected = torch.tensor([[0.0, math.log(900 / 10000 + 1e-7), LOG_EPS],
                             [0.0, 0.0, LOG_EPS],
                             [LOG_EPS, LOG_EPS, LOG_EPS]])
    for head in range(2):
        torch.testing.assert_close(bias[head], expected, atol=1e-4, rtol=0)


def test_jitter_hands_the_raw_corners_on():
    xyzr = xyxy_to_xyzr(torch.tensor([[[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 64.0, 32.0]]]))
    content = torch.randn(1, 2, 8)
    torch.manual_seed(3)
    out_content, out_xyzr, iof_boxes = RefinementPerturbation(0.0, 0.0, 1.0, 25.0)(content, xyzr)
    torch.manual_seed(3)
    torch.rand(())  # the position draw
    corners = xyzr_to_xyxy(xyzr) + 25.0 * torch.randn(1, 2, 4)
    assert torch.equal(out_content, content)
    torch.testing.assert_close(iof_boxes, corners)
    w, h = ((corners[..., 2:] - corners[..., :2]).abs() + 1e-7).unbind(-1)
    torch.testing.assert_close(out_xyzr[..., 2], 0.5 * torch.log2(w * h))
    torch.testing.assert_close(out_xyzr[..., 3], torch.log2(h / w))


def test_decoder_passes_the_corners_to_the_no_grad_steps_only():
    """Every one of the 6 no-grad steps is jittered (probability 1); the RAG steps never are."""
    model = tiny_model("MODEL.DEQDET.PERTURB_CONTENT_PROB", "0.0",
                       "MODEL.DEQDET.PERTURB_POSITION_PROB", "1.0")
    calls = []
    model.decoder.refine_stage.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((torch.is_grad_enabled(), kwargs.get("iof_boxes"))),
        with_kwargs=True)
    losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    with_corners = [grad for grad, boxes in calls if boxes is not None]
    assert len(with_corners) == 6 and not any(with_corners)
    assert sum(grad for grad, _ in calls) == 2 + 3 * 2  # init^1, init^2 + RAG 2 at positions (1, 3, 6)


def _target(n, size=100.0):
    xy = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 2) * 5
    return {"labels": torch.zeros(n, dtype=torch.int64), "boxes": torch.cat([xy, xy + 20], 1),
            "whwh": torch.tensor([size] * 4)}


def test_normaliser_counts_matched_queries():
    # 3 queries: an image with 5 objects matches 3 of them, one with 1 object matches 1 -> 4 (not 6).
    assert SetCriterion.num_matched([_target(5), _target(1)], 3, "cpu") == 4.0
    assert SetCriterion.num_matched([_target(2), _target(1)], 3, "cpu") == 3.0
    assert SetCriterion.num_matched([_target(0), _target(0)], 3, "cpu") == 1.0  # floor of the all-empty batch
    weights = dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)
    criterion = SetCriterion(HungarianMatcher(**weights), **weights)
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 3, 1), torch.rand(2, 3, 4) * 40 + torch.tensor([0.0, 0.0, 50.0, 50.0])
    targets = [_target(5), _target(1)]
    losses = criterion([{"logits": logits, "boxes": boxes}], targets)
    for name, value in criterion.single({"logits": logits, "boxes": boxes}, targets, num_matched=4.0).items():
        assert losses[f"s0_{name}"].item() == pytest.approx(value.item(), rel=1e-6)


def _worker(rank: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Rank 0: 5 objects and 3 queries -> 3 matched; rank 1: 1 object -> 1. Mean 2. Then all empty.
        values = [SetCriterion.num_matched([_target(5 if rank == 0 else 1)], 3, "cpu"),
                  SetCriterion.num_matched([_target(0)], 3, "cpu")]
        torch.save(values, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_normaliser_is_averaged_over_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "normaliser")
    mp.start_processes(_worker, args=(port, out), nprocs=2, start_method="spawn")
    assert [torch.load(f"{out}.{rank}") for rank in range(2)] == [[2.0, 1.0], [2.0, 1.0]]
