"""Every DyHead / ATSS config builds, trains one step (forward + backward) and infers on CPU."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from deqdet.engine import build_config
from tests.helpers import ROOT, config_file

CONFIGS = [
    "configs/dyhead_r50_atss_fpn_1x.yaml",
    "configs/atss_r50_fpn_1x.yaml",
    "configs/dyhead_r50_retina_fpn_1x.yaml",
    "configs/dyhead_r50_rcnn_fpn_1x.yaml",
    "configs/dyhead_r50_rcnn_fpn_1x_paper.yaml",
    "configs/shapes/atss_r18.yaml",
    "configs/shapes/atss_dyhead_r18.yaml",
    "configs/shapes/retinanet_dyhead_r18.yaml",
    "configs/shapes/rcnn_dyhead_r18.yaml",
    "configs/shapes/rcnn_dyhead_paper_r18.yaml",
]


def _inputs(num_classes):
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in [(96, 128), (112, 90)]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 85.0, 88.0]]))
        inst.gt_classes = torch.tensor([0, num_classes - 1])
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds_trains_a_step_and_infers(config):
    torch.manual_seed(0)
    cfg = build_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu"])
    num_classes = {"ATSS": cfg.MODEL.ATSS.NUM_CLASSES, "RetinaNet": cfg.MODEL.RETINANET.NUM_CLASSES}.get(
        cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.ROI_HEADS.NUM_CLASSES
    )
    model = build_model(cfg)
    if cfg.MODEL.DYHEAD.NUM_CONVS:
        assert len(model.backbone.dyhead_tower) == cfg.MODEL.DYHEAD.NUM_CONVS
    batch = _inputs(num_classes)
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0, losses
    total.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, no_grad[:5]  # every trainable parameter takes part in the loss

    model.eval()
    with torch.no_grad():
        results = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    for x, r in zip(batch, results):
        inst = r["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
        assert inst.pred_classes.numel() == 0 or int(inst.pred_classes.max()) < num_classes


def test_configs_load_without_python_tags():
    """Anchor sizes are written out: no ``!!python/...`` tag (yaml.unsafe_load warns on every start)."""
    import glob

    for path in glob.glob(config_file("**", "*.yaml"), recursive=True):
        assert "!!python" not in open(path).read(), path
    ratios = build_config(config_file("dyhead_r50_retina_fpn_1x.yaml")).MODEL.ANCHOR_GENERATOR.SIZES
    for octave in ratios:
        assert octave[1] / octave[0] == pytest.approx(2 ** (1 / 3), rel=1e-12)
        assert octave[2] / octave[0] == pytest.approx(2 ** (2 / 3), rel=1e-12)
