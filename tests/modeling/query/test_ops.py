"""AdaMixer building blocks: xyzr boxes, IoF, position embedding, 3D sampling, adaptive mixing."""

import math

import pytest
import torch
import torch.nn.functional as F

from deqdet.modeling.query.boxes import (
    pairwise_iof,
    refine_xyzr,
    xyxy_to_xyzr,
    xyzr_position_embedding,
    xyzr_to_xyxy,
)
from deqdet.modeling.query.mixing import AdaptiveMixing
from deqdet.modeling.query.sampling import level_weights, sample_3d, sampling_points


def test_xyzr_round_trip_and_hand_values():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 8.0, 2.0]])
    xyzr = xyxy_to_xyzr(xyxy)
    # box 1: centre (30, 60), w 40, h 80 -> z = log2(sqrt(3200)), r = log2(2) = 1
    assert xyzr[0].tolist() == pytest.approx([30.0, 60.0, 0.5 * math.log2(3200.0), 1.0])
    # box 2: w 8, h 2 -> z = log2(4) = 2, r = log2(1/4) = -2
    assert xyzr[1].tolist() == pytest.approx([4.0, 1.0, 2.0, -2.0])
    torch.testing.assert_close(xyzr_to_xyxy(xyzr), xyxy)
    random = torch.rand(3, 7, 4) * 100
    random[..., 2:] += random[..., :2] + 1
    torch.testing.assert_close(xyzr_to_xyxy(xyxy_to_xyzr(random)), random, rtol=1e-5, atol=1e-4)


def test_refine_moves_the_centre_in_units_of_the_box_size():
    xyzr = torch.tensor([[100.0, 50.0, 3.0, 0.0]])  # an 8 x 8 box
    refined = refine_xyzr(xyzr, torch.tensor([[0.5, -1.0, 1.0, 2.0]]))
    assert refined[0].tolist() == pytest.approx([104.0, 42.0, 4.0, 2.0])
    assert torch.equal(refine_xyzr(xyzr, torch.zeros(1, 4)), xyzr)


def test_iof_on_hand_built_boxes():
    boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 25.0, 10.0], [2.0, 2.0, 4.0, 4.0], [50, 50, 60, 60]]]
    )
    iof = pairwise_iof(boxes)[0]
    # intersection of boxes 0 and 1: 5 x 10 = 50; areas 100 and 200
    assert iof[0, 1].item() == pytest.approx(0.5)
    assert iof[1, 0].item() == pytest.approx(0.25)
    assert iof[2, 0].item() == pytest.approx(1.0)  # box 2 lies inside box 0
    assert iof[0, 2].item() == pytest.approx(4.0 / 100.0)
    assert iof[0, 3].item() == 0.0 and iof[3, 3].item() == pytest.approx(1.0)
    assert torch.diagonal(iof).tolist() == pytest.approx([1.0] * 4)


def test_position_embedding_layout():
    xyzr = torch.tensor([[[500.0, 1000.0, 3.0, -1.0]]])
    pe = xyzr_position_embedding(xyzr, 32)  # 8 features per coordinate
    assert pe.shape == (1, 1, 32)
    for coord, value in enumerate([0.5, 1.0, 3.0, -1.0]):
        for k in range(4):
            angle = value / 10000 ** (2 * k / 8)
            assert pe[0, 0, coord * 8 + 2 * k].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[0, 0, coord * 8 + 2 * k + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sampling_points_follow_the_box():
    xyzr = xyxy_to_xyzr(torch.tensor([[[20.0, 40.0, 60.0, 60.0]]]))  # centre (40, 50), 40 x 20
    offsets = torch.tensor([[[[0.0, 0.0, 0.0], [0.5, -0.5, -1.0], [-0.25, 0.25, 2.0]]]])
    points = sampling_points(offsets, xyzr)
    z = xyzr[0, 0, 2].item()
    expected = [[40.0, 50.0, z], [60.0, 40.0, z - 1.0], [30.0, 55.0, z + 2.0]]
    torch.testing.assert_close(points[0, 0], torch.tensor(expected))


def _coordinate_maps(strides, size, num_groups):
    """Per level (1, 4 * G, H, W): channels of every group hold (x, y, level, 1 on this level only)."""
    maps = []
    for level, stride in enumerate(strides):
        h, w = size[0] // stride, size[1] // stride
        centres_y, centres_x = (torch.arange(h) + 0.5) * stride, (torch.arange(w) + 0.5) * stride
        ys, xs = torch.meshgrid(centres_y, centres_x, indexing="ij")
        one_group = [xs, ys, torch.full_like(xs, float(level)), torch.full_like(xs, float(level == 2))]
        maps.append(torch.stack(one_group * num_groups)[None].float())
    return maps


def test_sampling_reads_the_right_pixel_with_the_right_level_weights():
    strides, size = (4, 8, 16, 32), (128, 160)
    features = _coordinate_maps(strides, size, num_groups=2)
    # Two groups of two points inside the image, at various scales z.
    points = torch.tensor([[[[37.0, 61.0, 2.0], [80.0, 64.0, 4.5], [50.0, 70.0, 3.3], [64.0, 64.0, 6.0]]]])
    out = sample_3d(points, features, strides, num_groups=2)
    assert out.shape == (1, 1, 2, 2, 4)
    weights = level_weights(points[..., 2], strides)[0, 0]  # (4 points, 4 levels)
    log_strides = torch.tensor([2.0, 3.0, 4.0, 5.0])
    expected_w = torch.softmax(-((points[0, 0, :, 2:3] - log_strides) ** 2) / 2.0, dim=-1)
    torch.testing.assert_close(weights, expected_w)
    for k in range(4):
        group, point = divmod(k, 2)
        x, y = points[0, 0, k, :2]
        value = out[0, 0, group, point]
        # Coordinates are linear in the pixel grid, so every level returns the exact position and
        # the weights sum to one (all points lie at least half a coarsest pixel inside the image).
        assert value[0].item() == pytest.approx(x.item(), abs=1e-3)
        assert value[1].item() == pytest.approx(y.item(), abs=1e-3)
        assert value[2].item() == pytest.approx((weights[k] * torch.arange(4.0)).sum().item(), abs=1e-5)
        assert value[3].item() == pytest.approx(weights[k, 2].item(), abs=1e-6)


def test_sampling_outside_the_image_reads_zeros_and_groups_read_their_own_channels():
    strides, size = (4, 8), (32, 32)
    features = [torch.cat([torch.ones(1, 3, size[0] // s, size[1] // s),
                           2 * torch.ones(1, 3, size[0] // s, size[1] // s)], 1) for s in strides]
    points = torch.tensor([[[[16.0, 16.0, 2.0], [-100.0, 16.0, 2.0]]]])  # group 0: inside, group 1: outside
    out = sample_3d(points, features, strides, num_groups=2)
    assert out[0, 0, 0, 0].tolist() == pytest.approx([1.0] * 3)
    assert out[0, 0, 1, 0].tolist() == [0.0] * 3


def test_mixing_with_zeroed_generator_is_a_static_mlp_mixer():
    torch.manual_seed(0)
    mixing = AdaptiveMixing(content_dim=16, feat_channels=8, in_points=3, out_points=5, num_groups=2)
    with torch.no_grad():
        mixing.parameter_generator.weight.zero_()
        mixing.parameter_generator.bias.normal_()
    sampled = torch.randn(2, 4, 2, 3, 4)  # (B, N, G, P_in, C / G)
    content = torch.randn(2, 4, 16)
    out = mixing(sampled, content)
    bias = mixing.parameter_generator.bias.view(2, 4 * 4 + 5 * 3)
    expected_groups = []
    for g in range(2):
        m = bias[g, :16].view(4, 4)
        s = bias[g, 16:].view(5, 3)
        h = F.relu(F.layer_norm(sampled[:, :, g] @ m, (3, 4)))
        h = F.relu(F.layer_norm(s @ h, (5, 4)))
        expected_groups.append(h)
    expected = content + mixing.out_proj(torch.stack(expected_groups, 2).flatten(2))
    torch.testing.assert_close(out, expected)
    # The generated matrices do depend on the query once the generator has weights.
    with torch.no_grad():
        mixing.parameter_generator.weight.normal_()
    m1, _ = mixing.mixing_matrices(content)
    assert not torch.allclose(m1[0, 0], m1[0, 1])
