"""Numeric guards: a diverging DEQ refinement never yields NaN or infinite boxes or scores, and a
non-finite loss stops training with a one-line error naming the loss term and the iteration."""

import logging
import re

import pytest
import torch
from detectron2.modeling import build_model

import train_net
from deqdet.engine import build_config
from tests.helpers import ATSS_DYHEAD, DENSE_QUERY_CONFIG, TINY_DENSE_QUERY, synthetic_batch, tiny_model


def _scale_outputs(factor):
    def hook(module, args, output):  # a stage's output is a StageOutput (a NamedTuple): keep its type
        return output._make(None if t is None else t * factor for t in output)
    return hook


def _assert_well_formed(results, size=(96, 128)):
    h, w = size
    for r in results:
        boxes, scores = r["instances"].pred_boxes.tensor, r["instances"].scores
        assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()


@pytest.mark.parametrize("factor", [1e30, float("inf"), float("nan")])
def test_diverging_refinement_falls_back_to_the_init_prediction(factor, caplog):
    model = tiny_model("MODEL.DEQDET.MAX_ITERS", "3").eval()
    model.decoder.refine_stage.register_forward_hook(_scale_outputs(factor))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        results = model(synthetic_batch(2))
    assert "output step not finite for images [0, 1]" in caplog.text
    _assert_well_formed(results)


def test_diverging_refinement_with_a_quality_branch_falls_back_to_the_init_prediction(caplog):
    """The combined detector's predicted-IoU branch: the fallback keeps the init stage's predicted IoU
    with its class scores (prior added)."""
    torch.manual_seed(0)
    cfg = build_config(DENSE_QUERY_CONFIG, [*TINY_DENSE_QUERY, "MODEL.QUERY.QUALITY_WEIGHT", "1.0",
                                            "MODEL.DEQDET.MAX_ITERS", "3"])
    model = build_model(cfg).eval()
    model.decoder.refine_stage.register_forward_hook(_scale_outputs(float("nan")))
    batch = synthetic_batch(2)
    init_outputs = []
    model.decoder.init_stage.register_forward_hook(lambda m, a, out: init_outputs.append(out))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        results = model(batch)
        prior = model.initial_queries(batch).prior
    assert "output step not finite for images [0, 1]" in caplog.text
    _assert_well_formed(results)
    out = init_outputs[0]
    expected = ((out.logits + prior).sigmoid() * out.quality.sigmoid()).sqrt().flatten(1).max(dim=1).values
    for r, top in zip(results, expected):
        torch.testing.assert_close(r["instances"].scores.max(), top)


def test_diverging_init_and_refinement_give_whole_image_boxes_with_score_0(caplog):
    model = tiny_model("MODEL.DEQDET.MAX_ITERS", "3").eval()
    for stage in (model.decoder.init_stage, model.decoder.refine_stage):
        stage.register_forward_hook(_scale_outputs(float("inf")))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        results = model(synthetic_batch(2))
    assert "init stage's prediction not finite either for images [0, 1]" in caplog.text
    _assert_well_formed(results)
    for r in results:
        assert (r["instances"].scores == 0).all()
        assert torch.equal(r["instances"].pred_boxes.tensor[0], torch.tensor([0.0, 0.0, 128.0, 96.0]))


def test_non_finite_loss_names_the_term_and_the_iteration(tmp_path):
    """A learning rate of 1e30 without clipping: the weights overflow within a few iterations."""
    argv = [*ATSS_DYHEAD, "SOLVER.BASE_LR", "1e30", "SOLVER.WARMUP_ITERS", "0",
            "SOLVER.CLIP_GRADIENTS.ENABLED", "False", "SOLVER.CHECKPOINT_PERIOD", "100",
            "OUTPUT_DIR", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        train_net.cli(argv)
    message = str(info.value.code)
    assert "\n" not in message
    expected = r"error: loss became non-finite at iteration \d: (loss_\w+ = (nan|inf|-inf)(, )?)+; "
    assert re.match(expected, message), message
