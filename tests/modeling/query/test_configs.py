"""Every AdaMixer config builds its model; the DETR-style mapper crops and resizes as documented;
the optimizer applies the backbone / head multipliers."""

import os

import numpy as np
import pytest
import torch
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model
from PIL import Image

from deqdet.data import mapper
from deqdet.data.mapper import build_train_mapper, detr_augmentations
from deqdet.engine import build_config
from deqdet.optim import build_optimizer
from tests.helpers import ROOT, config_file


@pytest.mark.parametrize(
    "config,queries,stages,extra",
    [
        ("configs/shapes/adamixer_r18.yaml", 50, 6, []),
        ("configs/adamixer_r50_1x.yaml", 100, 6, ["MODEL.QUERY.NUM_STAGES", "1"]),
        ("configs/adamixer_r50_300q_3x.yaml", 300, 6, ["MODEL.QUERY.NUM_STAGES", "1"]),
    ],
)
def test_config_builds(config, queries, stages, extra):
    cfg = build_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu", *extra])
    assert cfg.MODEL.QUERY.NUM_QUERIES == queries and cfg.TEST.DETECTIONS_PER_IMAGE == queries
    assert build_config(os.path.join(ROOT, config)).MODEL.QUERY.NUM_STAGES == stages
    model = build_model(cfg)
    assert model.queries.content.weight.shape == (queries, cfg.MODEL.QUERY.CONTENT_DIM)
    assert model.neck.strides == [4, 8, 16, 32]


def test_detr_mapper_crops_then_resizes(tmp_path, monkeypatch):
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    path = tmp_path / "im.png"
    Image.fromarray(image).save(path)
    record = {"file_name": str(path), "height": 300, "width": 400, "image_id": 0,
              "annotations": [{"bbox": [100.0, 100.0, 250.0, 200.0], "bbox_mode": 0, "category_id": 1}]}
    cfg = build_config(config_file("shapes", "adamixer_r18.yaml"), [
        "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(160, 192)", "INPUT.MAX_SIZE_TRAIN", "1000",
        "INPUT.DETR_CROP.ENABLED", "True"])
    _, crop, _ = detr_augmentations(cfg)  # DETR's recipe: p 0.5, shortest edge 400-600, crop sides 384-600
    resize, random_crop = crop.aug.augs
    assert (crop.prob, resize.short_edge_length, resize.max_size) == (0.5, (400, 500, 600), 1000)
    assert (random_crop.crop_type, random_crop.crop_size) == ("absolute_range", (384, 600))
    monkeypatch.setattr(mapper, "DETR_CROP_PROB", 1.0)
    always = build_train_mapper(cfg)
    monkeypatch.setattr(mapper, "DETR_CROP_PROB", 0.0)
    never = build_train_mapper(cfg)
    utils.check_image_size(record, image)
    aspects = set()
    for seed in range(6):
        np.random.seed(seed)
        out = always(dict(record))
        h, w = out["image"].shape[1:]
        assert min(h, w) in (160, 192)
        aspects.add(round(w / h, 2))
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        out = never(dict(record))
        assert round(out["image"].shape[2] / out["image"].shape[1], 2) == round(400 / 300, 2)
        # without the crop the box is only scaled (and maybe flipped)
        out_h, out_w = out["image"].shape[1:]
        box = torch.tensor([100.0, 100, 250, 200]) * torch.tensor([out_w / 400, out_h / 300] * 2)
        mirrored = torch.stack([out_w - box[2], box[1], out_w - box[0], box[3]])
        got = out["instances"].gt_boxes.tensor[0]
        assert torch.allclose(got, box, atol=1e-3) or torch.allclose(got, mirrored, atol=1e-3), got
    assert len(aspects) > 1  # crops of 384-600 px per side change the aspect ratio


def test_param_group_rules_first_match_wins():
    """A backbone rule, then a catch-all rule ("" matches every name) for the rest."""
    cfg = build_config(
        config_file("shapes", "adamixer_r18.yaml"),
        ["MODEL.DEVICE", "cpu", "MODEL.QUERY.NUM_STAGES", "1", "SOLVER.BASE_LR", "0.01",
         "SOLVER.WEIGHT_DECAY", "0.1", "SOLVER.WEIGHT_DECAY_NORM", "0.1",
         "SOLVER.PARAM_GROUP_RULES", "[('^backbone[.]', 0.5, 1.0), ('', 4.0, 10.0)]"],
    )
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    backbone = {id(p) for p in model.backbone.parameters()}
    seen = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen += 1
            if id(p) in backbone:
                assert (group["lr"], group["weight_decay"]) == pytest.approx((0.005, 0.1))
            else:
                assert (group["lr"], group["weight_decay"]) == pytest.approx((0.04, 1.0))
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)
