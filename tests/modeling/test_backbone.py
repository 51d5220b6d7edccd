"""CPU speed options of the shapes recipes: the narrow ResNet's stems (MODEL.RESNETS.STEM_TYPE) and
channels-last training (MODEL.CHANNELS_LAST), which must not change what is computed."""


import pytest
import torch
from detectron2.modeling import build_backbone
from detectron2.utils.events import EventStorage

from deqdet.engine import Trainer, build_config
from tests.helpers import config_file

DEMO = config_file("shapes", "retinanet_demo.yaml")


@pytest.mark.parametrize("stem", ["basic", "patch"])
def test_widths_and_strides(stem):
    cfg = build_config(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_TYPE", stem,
                              "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"])
    bottom_up = build_backbone(cfg).bottom_up
    out = bottom_up(torch.zeros(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 32, 16, 24), "res3": (2, 64, 8, 12), "res4": (2, 128, 4, 6), "res5": (2, 256, 2, 3)}
    assert bottom_up.stem.stride == 4 and bottom_up.stem.out_channels == 32


def test_patch_stem_sees_only_its_own_patch():
    """Each stride-4 output position depends on exactly its 4x4 input patch (no overlap, no pooling)."""
    cfg = build_config(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_TYPE", "patch"])
    stem = build_backbone(cfg).bottom_up.stem.eval()
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    stem.conv1.norm.bias.data.fill_(1.0)  # keep the ReLU open so that gradients flow
    stem(x)[0, :, 1, 2].sum().backward()
    touched = x.grad.abs().sum(0).sum(0) > 0
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(touched, expected)


def test_unknown_stem_is_named():
    cfg = build_config(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_TYPE", "hexagon"])
    with pytest.raises(ValueError, match="MODEL.RESNETS.STEM_TYPE.*hexagon"):
        build_backbone(cfg)


def test_channels_last_trains_the_same_model():
    cfg = build_config(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_TYPE", "patch"])
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
