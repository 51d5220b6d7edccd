"""The narrow ResNet of the shapes recipes, and channels-last training (MODEL.CHANNELS_LAST), which must
not change what is computed."""


import torch
from detectron2.modeling import build_backbone
from detectron2.utils.events import EventStorage

from deqdet.engine import Trainer, build_config
from tests.helpers import config_file

DEMO = config_file("shapes", "retinanet_demo.yaml")


def test_widths_and_strides():
    cfg = build_config(DEMO, ["MODEL.DEVICE", "cpu",
                              "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"])
    bottom_up = build_backbone(cfg).bottom_up
    out = bottom_up(torch.zeros(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 32, 16, 24), "res3": (2, 64, 8, 12), "res4": (2, 128, 4, 6), "res5": (2, 256, 2, 3)}
    assert bottom_up.stem.stride == 4 and bottom_up.stem.out_channels == 32


def test_channels_last_trains_the_same_model():
    cfg = build_config(DEMO, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    plain = Trainer.build_model(cfg)
    cfg.defrost()
    cfg.MODEL.CHANNELS_LAST = True
    fast = Trainer.build_model(cfg)
    fast.load_state_dict(plain.state_dict())
    conv = fast.backbone.bottom_up.stem.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    from detectron2.structures import Boxes, Instances

    inst = Instances((128, 160))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 30.0], [50.0, 20.0, 150.0, 100.0]]))
    inst.gt_classes = torch.tensor([1, 5])
    batch = [{"image": torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8), "instances": inst}] * 2
    with EventStorage(0):
        losses = [sum(m(batch).values()) for m in (plain, fast)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    g_plain, g_fast = plain.backbone.bottom_up.stem.conv1.weight.grad, conv.grad
    assert (g_plain - g_fast).norm() <= 1e-2 * g_plain.norm()  # float32 summation order differs (~1e-3)
