"""DyHead block pieces: the deformable conv, the scale gate, DyReLU and the coarse-level offsets."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_backbone
from detectron2.structures import ImageList
from torchvision.ops import deform_conv2d

from deqdet.engine import build_config
from deqdet.modeling.dyhead.deform import coarse_level_offsets, modulated_deform_conv3x3, resolve_dcn_impl
from deqdet.modeling.dyhead.dyconv import DyConv, DyReLU
from tests.helpers import config_file


def test_auto_dcn_impl_is_the_sampling_form_on_cpu_and_torchvision_on_cuda():
    x = torch.zeros(1)
    assert resolve_dcn_impl("auto", x) == "sampling" and resolve_dcn_impl("torchvision", x) == "torchvision"
    if torch.cuda.is_available():
        assert resolve_dcn_impl("auto", x.cuda()) == "torchvision"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_dcn_impl("cuda", x)
    block = DyConv(16, 16).eval()  # the default, "auto": the CPU block reads and returns channels-last maps
    feats = {f"p{i}": torch.randn(1, 16, 8 >> i, 8 >> i) for i in range(3)}
    with torch.no_grad():
        assert all(v.is_contiguous(memory_format=torch.channels_last) for v in block(feats).values())


def _inputs(stride, n=2, c=6, h=9, w=11, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    offset = torch.randn(n, 18, ho, wo, generator=g) * scale  # many taps land between pixels / outside
    mask = torch.rand(n, 9, ho, wo, generator=g)
    weight = torch.randn(5, c, 3, 3, generator=g)
    bias = torch.randn(5, generator=g)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("impl", ["sampling", "torchvision"])
@pytest.mark.parametrize("stride", [1, 2])
def test_dcn_with_zero_offsets_and_unit_masks_is_a_plain_conv(impl, stride):
    x, offset, mask, weight, bias = _inputs(stride)
    zero_offset, unit_mask = torch.zeros_like(offset), torch.ones_like(mask)
    out = modulated_deform_conv3x3(x, zero_offset, unit_mask, weight, bias, stride, impl)
    assert torch.allclose(out, F.conv2d(x, weight, bias, stride=stride, padding=1), atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_sampling_dcn_matches_torchvision_values_and_gradients(stride):
    tensors = [t.requires_grad_() for t in _inputs(stride)]
    x, offset, mask, weight, bias = tensors
    ref = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), tensors)
    out = modulated_deform_conv3x3(*tensors, stride, "sampling")
    grads = torch.autograd.grad(out.square().sum(), tensors)
    assert torch.allclose(out, ref, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-3, rtol=1e-4)


def test_dcn_integer_offset_shifts_the_input():
    # One channel, kernel with only the centre tap: output = mask * input at (y + dy, x + dx).
    x = torch.arange(20.0).view(1, 1, 4, 5)
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0
    offset = torch.zeros(1, 18, 4, 5)
    offset[:, 8] = 1.0  # tap 4 (centre): dy = +1
    offset[:, 9] = -1.0  # dx = -1
    mask = torch.full((1, 9, 4, 5), 0.5)
    out = modulated_deform_conv3x3(x, offset, mask, weight, torch.zeros(1), 1, "sampling")[0, 0]
    expected = torch.zeros(4, 5)
    expected[:3, 1:] = 0.5 * x[0, 0, 1:, :4]  # rows past the bottom / columns left of 0 read zeros
    assert torch.equal(out, expected)


def test_scale_gate_stays_in_unit_interval():
    block = DyConv(16, 16)
    with torch.no_grad():
        block.AttnConv[1].weight.normal_(std=5.0)
        block.AttnConv[1].bias.fill_(-1.0)
    gates = block.scale_gate(torch.randn(64, 16, 5, 5) * 10)
    assert gates.shape == (64, 1, 1, 1)
    assert gates.min() >= 0.0 and gates.max() <= 1.0
    assert gates.min() == 0.5 and gates.max() == 1.0  # ReLU then hard sigmoid: saturates at both ends


def test_dyrelu_coefficients_hand_computed():
    relu = DyReLU(8)
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        relu.fc[2].weight.zero_()
        relu.fc[2].bias.zero_()  # hard sigmoid 0.5 -> a1 = 1, a2 = b1 = b2 = 0: a plain ReLU
    assert torch.equal(relu(x), x.clamp(min=0))
    with torch.no_grad():
        relu.fc[2].bias.fill_(3.0)  # hard sigmoid 1 -> a1 = 2, b1 = 0.5, a2 = 1, b2 = 0.5
    assert torch.allclose(relu(x), torch.maximum(2 * x + 0.5, x + 0.5))


def _hand_reinterpretation(t, h, w):
    """What a kernel reading an (C, h, w) array from the start of each image's memory sees."""
    flat = [float(v) for v in t.detach().contiguous().view(-1)]
    n, c = t.shape[:2]
    per_image = t[0].numel()
    out = torch.empty(n, c, h, w)
    for b in range(n):
        for i in range(c * h * w):
            out[b].view(-1)[i] = flat[b * per_image + i]
    return out


def test_official_coarse_offsets_reinterpret_memory_not_crop():
    offset, mask = torch.randn(2, 18, 6, 8), torch.rand(2, 9, 6, 8)
    got_offset, got_mask = coarse_level_offsets(offset, mask, (3, 4), "official")
    assert torch.equal(got_offset, _hand_reinterpretation(offset, 3, 4))
    assert torch.equal(got_mask, _hand_reinterpretation(mask, 3, 4))
    assert not torch.equal(got_offset, offset[:, :, :3, :4])  # not mmdetection's crop


def test_aligned_coarse_offsets_take_the_fine_positions_the_coarse_ones_sit_on():
    offset, mask = torch.randn(1, 18, 7, 8), torch.rand(1, 9, 7, 8)
    got_offset, got_mask = coarse_level_offsets(offset, mask, (4, 4), "aligned")
    for i in range(4):
        for j in range(4):
            assert torch.equal(got_offset[0, :, i, j], offset[0, :, 2 * i, 2 * j])
            assert torch.equal(got_mask[0, :, i, j], mask[0, :, 2 * i, 2 * j])
    with pytest.raises(ValueError, match="stride-2 successor"):
        coarse_level_offsets(offset, mask, (3, 4), "aligned")


def _pyramid(c=16, sizes=((8, 12), (4, 6), (2, 3))):
    g = torch.Generator().manual_seed(1)
    return {f"p{i}": torch.randn(2, c, h, w, generator=g) for i, (h, w) in enumerate(sizes)}


@pytest.mark.parametrize("impl", ["sampling", "torchvision"])
def test_official_mode_block_equals_hand_built_reinterpretation(impl):
    torch.manual_seed(0)
    block = DyConv(16, 16, coarse_offsets="official", dcn_impl=impl).eval()
    with torch.no_grad():
        block.offset.weight.normal_(std=0.2)  # non-trivial offsets and masks
    feats = _pyramid()
    out = block(feats)

    # Level p0 by hand: own term, no finer level, coarser term with reinterpreted offsets.
    f0, f1 = feats["p0"], feats["p1"]
    om = block.offset(f0)
    off, mask = om[:, :18], om[:, 18:].sigmoid()

    def dcn(idx, x, o, m, stride):
        conv = block.DyConv[idx]
        y = deform_conv2d(x, o, conv.conv.weight, conv.conv.bias, stride=stride, padding=1, mask=m)
        return conv.bn(y)

    own = dcn(1, f0, off, mask, 1)
    coarse = dcn(0, f1, _hand_reinterpretation(off, 4, 6), _hand_reinterpretation(mask, 4, 6), 1)
    coarse = F.interpolate(coarse, size=(8, 12), mode="bilinear", align_corners=True)
    terms = [own, coarse]
    gate = [F.relu6(F.relu(block.AttnConv[1](t.mean((2, 3), keepdim=True))) + 3) / 6 for t in terms]
    expected = block.relu((terms[0] * gate[0] + terms[1] * gate[1]) / 2)
    assert torch.allclose(out["p0"], expected, atol=1e-4)


def test_block_keeps_shapes_and_every_parameter_gets_a_gradient():
    block = DyConv(16, 16)
    feats = _pyramid()
    out = block(feats)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in feats.items()}
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_block_modes_agree_where_offsets_are_zero():
    # With zero offsets and equal masks the two coarse-offset modes give the same block output.
    block = DyConv(16, 16).eval()
    with torch.no_grad():
        block.offset.weight.zero_()
        block.offset.bias.zero_()
    feats = _pyramid()
    aligned = block(feats)
    block.coarse_offsets = "official"
    official = block(feats)
    for k in feats:
        assert torch.allclose(aligned[k], official[k], atol=1e-6)


def test_zero_init_offset_starts_each_dcn_as_a_half_masked_plain_conv():
    torch.manual_seed(0)
    block = DyConv(16, 16, zero_init_offset=True)
    assert block.offset.weight.abs().sum() == 0 and block.offset.bias.abs().sum() == 0
    assert DyConv(16, 16).offset.weight.abs().sum() > 0  # the official port's (PyTorch default) init
    x = _pyramid()["p0"]
    offset_mask = block.offset(x)
    term = block.DyConv[1].conv(x, offset_mask[:, :18], offset_mask[:, 18:].sigmoid())
    conv = block.DyConv[1].conv
    half_masked = F.conv2d(x, conv.weight * 0.5, conv.bias, padding=1)
    torch.testing.assert_close(term, half_masked, atol=1e-5, rtol=1e-4)


def test_dyhead_box_head_applies_task_attention_to_pooled_features():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec

    from deqdet.config import add_deqdet_config
    from deqdet.modeling.dyhead.roi_head import DyHeadBoxHead

    cfg = add_deqdet_config(get_cfg())
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 0
    cfg.MODEL.DYHEAD.ROI_NUM_ATTENTION = 2
    head = DyHeadBoxHead(cfg, ShapeSpec(channels=16, height=7, width=7))
    assert head.output_shape.channels == 16 * 7 * 7
    pooled = torch.randn(5, 16, 7, 7)
    with torch.no_grad():
        for relu in head.attention:
            relu.fc[2].weight.zero_()
            relu.fc[2].bias.zero_()  # each attention starts as a plain ReLU (see the DyReLU test)
    assert torch.equal(head(pooled), pooled.clamp(min=0).flatten(1))
    with torch.no_grad():
        head.attention[1].fc[2].bias.fill_(3.0)  # second: max(2x + 0.5, x + 0.5) per RoI and channel
    expected = torch.maximum(2 * pooled.clamp(min=0) + 0.5, pooled.clamp(min=0) + 0.5)
    assert torch.allclose(head(pooled), expected.flatten(1))


@pytest.mark.parametrize("divisibility, padded", [(0, (256, 384)), (32, (224, 320)), (64, (256, 320))])
def test_size_divisibility_pads_less_and_keeps_levels_stride_two_successors(divisibility, padded):
    """0 pads to the coarsest stride (128, official); 32 is enough for the block: every level is still the
    stride-2 successor of the one below, and the block runs on the unequal halvings (P6 7x10 -> P7 4x5)."""
    cfg = build_config(config_file("shapes", "dyhead_deqdet_r18.yaml"),
                       ["MODEL.DEVICE", "cpu", "MODEL.DYHEAD.SIZE_DIVISIBILITY", str(divisibility)])
    backbone = build_backbone(cfg)
    assert backbone.size_divisibility == (divisibility or 128)
    images = ImageList.from_tensors([torch.zeros(3, 200, 300)], backbone.size_divisibility)
    assert tuple(images.tensor.shape[-2:]) == padded
    out = backbone(images.tensor)
    sizes = [tuple(out[f"p{level}"].shape[-2:]) for level in range(3, 8)]
    for fine, coarse in zip(sizes, sizes[1:]):
        assert coarse == ((fine[0] + 1) // 2, (fine[1] + 1) // 2)


def test_size_divisibility_not_a_multiple_of_the_backbones_is_named():
    cfg = build_config(config_file("shapes", "dyhead_deqdet_r18.yaml"),
                       ["MODEL.DEVICE", "cpu", "MODEL.DYHEAD.SIZE_DIVISIBILITY", "48"])
    with pytest.raises(ValueError, match="MODEL.DYHEAD.SIZE_DIVISIBILITY"):
        build_backbone(cfg)
