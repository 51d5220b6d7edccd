"""The installed stack works: torchvision's compiled ops, detectron2, the environment report."""

import torch
import torchvision
from torchvision.ops import deform_conv2d, nms, roi_align


def test_torchvision_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]


def test_torchvision_roi_align_averages_a_constant_region():
    feature = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    # a box covering the whole 4x4 map, pooled to 1x1 with aligned=True: the mean of all values
    out = roi_align(feature, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=1, aligned=True, sampling_ratio=2)
    assert torch.allclose(out.flatten(), torch.tensor([7.5]))


def test_torchvision_deform_conv2d_with_zero_offsets_is_a_convolution():
    x = torch.randn(2, 4, 9, 9)
    weight = torch.randn(6, 4, 3, 3)
    offset = torch.zeros(2, 18, 9, 9)
    out = deform_conv2d(x, offset, weight, padding=1)
    assert torch.allclose(out, torch.nn.functional.conv2d(x, weight, padding=1), atol=1e-4)


def test_detectron2_imports_and_builds_a_model():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_environment_report_names_versions_and_backends():
    import detectron2

    from deqdet.env import collect_env

    report = collect_env()
    assert torch.__version__ in report
    assert torchvision.__version__ in report
    assert detectron2.__version__ in report
    assert "detectron2 origin:" in report
    assert "COCO evaluation backend: faster-coco-eval" in report  # installed by make setup
