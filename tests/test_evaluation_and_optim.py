"""The fast COCOeval plug agrees with pycocotools; full-model gradient clipping clips the total norm; the
combined detector's two heads are evaluated in one pass."""

import contextlib
import io

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deqdet.data import ensure_shapes
from deqdet.engine import Trainer, build_config
from deqdet.errors import UserInputError
from deqdet.evaluation import _faster_coco_eval, install_fast_coco_eval
from deqdet.optim import build_optimizer
from tests.data.hostile_data import perfect_instances, register, write_coco
from tests.helpers import config_file


def _stats(cocoeval_fn, gt, dt):
    with contextlib.redirect_stdout(io.StringIO()):
        e = cocoeval_fn(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return np.array(e.stats)


def test_faster_coco_eval_matches_pycocotools_on_noisy_detections():
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ensure_shapes("shapes_mini_val")))
    rng = np.random.default_rng(0)
    results = []
    for ann in gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        category = ann["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 9))
        box = [x + rng.normal(0, 2), y + rng.normal(0, 2),
               w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)]
        results.append({"image_id": ann["image_id"], "category_id": category, "bbox": box,
                        "score": float(rng.random())})
    for _ in range(50):  # false positives
        results.append({"image_id": int(rng.integers(1, 17)), "category_id": int(rng.integers(1, 9)),
                        "bbox": [float(rng.uniform(0, 150)), float(rng.uniform(0, 150)), 20.0, 30.0],
                        "score": float(rng.random() * 0.5)})
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
    reference = _stats(COCOeval, gt, dt)
    assert 0.1 < reference[0] < 0.9  # a non-trivial AP, so the comparison means something
    np.testing.assert_allclose(_stats(_faster_coco_eval, gt, dt), reference, atol=1e-9)
    assert install_fast_coco_eval().startswith("faster-coco-eval")


def test_full_model_clipping_bounds_the_total_gradient_norm():
    cfg = build_config("", ["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0",
                            "SOLVER.BASE_LR", "1.0", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5"])
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(cfg, model)
    (model(torch.ones(4, 3)).sum() * 100).backward()
    optimizer.step()
    # plain SGD with lr 1: the update is the (clipped) gradient, whose total norm must be 0.5
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert abs(update.norm().item() - 0.5) < 1e-5


def _updates(name: str, impl: str, clip_type: str, steps: int = 3) -> list:
    """Parameters after ``steps`` clipped steps of optimizer ``name`` under ``SOLVER.OPTIMIZER_IMPL impl``,
    from one seed."""
    cfg = build_config("", ["SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", "0.01",
                            "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
                            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5", "SOLVER.OPTIMIZER_IMPL", impl])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = build_optimizer(cfg, model)
    assert optimizer.defaults.get("fused") == (impl == "fused" or None)
    assert optimizer.defaults.get("foreach") == (impl == "foreach" or None)
    for step in range(steps):
        optimizer.zero_grad()
        (model(torch.full((4, 3), step + 1.0)) ** 2).sum().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("clip_type", ["full_model", "norm"])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_optimizer_impl_computes_the_default_update(name, impl, clip_type):
    reference = _updates(name, "", clip_type)
    start = [p.detach() for p in _updates(name, "", clip_type, steps=0)]
    assert all((r - s).abs().max() > 1e-4 for r, s in zip(reference, start))  # the steps moved every tensor
    for got, want in zip(_updates(name, impl, clip_type), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [
    ["SOLVER.OPTIMIZER_IMPL", "fast"],
    # a fused step under AMP reads scaled gradients, which the clipping would see
    ["SOLVER.OPTIMIZER_IMPL", "fused", "SOLVER.AMP.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.ENABLED", "True"],
])
def test_optimizer_impl_rejects_a_bad_setting(opts):
    with pytest.raises(UserInputError, match="SOLVER.OPTIMIZER_IMPL"):
        build_optimizer(build_config("", opts), torch.nn.Linear(3, 2))


def test_combined_detector_with_both_sources_is_evaluated_for_each_head_in_one_pass(tmp_path):
    """``INFERENCE_SOURCE both``: the trainer's evaluators score ``instances`` as ``bbox`` and
    ``dense_instances`` as ``dense_bbox``; a perfect dense head and a decoder whose boxes miss every object
    give 100 and 0. Other sources get no dense evaluation."""
    json_path = write_coco(tmp_path, ["good", "good2"], category_ids=(1,), extra_boxes=False)
    records = register("two_heads", json_path)
    combined = config_file("shapes", "dyhead_deqdet_r18.yaml")
    for source, expected in (("decoder", {"bbox"}), ("both", {"bbox", "dense_bbox"})):
        cfg = build_config(combined, ["MODEL.DENSE_QUERY.INFERENCE_SOURCE", source])
        evaluator = Trainer.build_evaluator(cfg, "two_heads", output_folder=str(tmp_path / source))
        evaluator.reset()
        for record in records:
            perfect = perfect_instances(record)
            missed = Instances(perfect.image_size, pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 4.0, 4.0]])),
                               scores=torch.ones(1), pred_classes=perfect.pred_classes[:1])
            evaluator.process([{"image_id": record["image_id"]}],
                              [{"instances": missed, "dense_instances": perfect}])
        results = evaluator.evaluate()
        assert set(results) == expected
        assert results["bbox"]["AP"] == 0.0
        if source == "both":
            assert results["dense_bbox"]["AP"] == 100.0
