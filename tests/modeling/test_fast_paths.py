"""Each speed-up against the straightforward computation it replaces: same values, same gradients."""

import torch

from deqdet.modeling.query.sampling import (
    _sample_levels_gather,
    _sample_levels_grid,
    level_weights,
    sample_3d,
    sampling_points,
)


def _pyramid(batch=2, channels=8, sizes=((13, 17), (7, 9), (4, 5)), dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, h, w, generator=g, dtype=dtype).requires_grad_() for h, w in sizes]


def _points(batch=2, queries=5, groups=2, per_group=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    # centres over the 68 x 52 px image and beyond it (zero padding), sizes from 2 to 64 px
    xyzr = torch.cat(
        [
            torch.rand(batch, queries, 2, generator=g, dtype=dtype) * 90 - 10,
            torch.rand(batch, queries, 1, generator=g, dtype=dtype) * 5 + 1,
            torch.randn(batch, queries, 1, generator=g, dtype=dtype) * 0.5,
        ],
        dim=-1,
    )
    offsets = torch.randn(batch, queries, groups * per_group, 3, generator=g, dtype=dtype)
    return sampling_points(offsets, xyzr).requires_grad_()


def test_sample_3d_gather_equals_grid_sample_values_and_gradients():
    strides, groups = (4, 8, 16), 2
    features, points = _pyramid(), _points(groups=groups)
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in channels_last)
    reference = _sample_levels_grid(points, features, strides, groups, level_weights(points[..., 2], strides))
    fast = _sample_levels_gather(
        points, channels_last, strides, groups, level_weights(points[..., 2], strides)
    )
    with torch.no_grad():
        torch.testing.assert_close(sample_3d(points, channels_last, strides, groups), reference)
    assert fast.shape == reference.shape == (2, 5, groups, 6, 4)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    assert (
        reference.abs().sum() > 0 and (reference == 0).any()
    )  # some points read the maps, some fall outside
    upstream = torch.randn_like(reference)
    grads_ref = torch.autograd.grad((reference * upstream).sum(), [points, *features])
    grads_fast = torch.autograd.grad((fast * upstream).sum(), [points, *features])
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_sample_3d_gathers_from_channels_last_maps_without_grad_only():
    strides, groups = (4, 8, 16), 2
    features, points = _pyramid(), _points(groups=groups)
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    calls = []
    original = torch.nn.functional.embedding_bag
    try:
        torch.nn.functional.embedding_bag = lambda *a, **k: calls.append(1) or original(*a, **k)
        with torch.no_grad():
            sample_3d(points, features, strides, groups)
            assert not calls
            sample_3d(points, channels_last, strides, groups)
            assert len(calls) == len(features)
        sample_3d(points, channels_last, strides, groups)  # gradient needed: grid_sample
        assert len(calls) == len(features)
    finally:
        torch.nn.functional.embedding_bag = original


def test_dyhead_block_channels_last_gather_path_equals_torchvision_block():
    """The sampling DCN block (channels-last in and out) against the same block with torchvision's
    kernel on NCHW maps: same values and gradients, in both coarse-offset modes."""
    from deqdet.modeling.dyhead.dyconv import DyConv

    torch.manual_seed(0)
    block = DyConv(16, 16, dcn_impl="sampling").double()
    with torch.no_grad():
        block.offset.weight.normal_(std=0.3)  # offsets of a few pixels: taps between pixels and outside
        for m in block.DyConv:  # GroupNorm biases off zero: the scale gates' ReLU away from its kink
            m.bn.bias.normal_()
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 9), (4, 5), (2, 3)]
    feats = {
        f"p{i}": torch.randn(2, 16, h, w, generator=g, dtype=torch.float64).requires_grad_()
        for i, (h, w) in enumerate(shapes)
    }
    for mode in ("aligned", "official"):
        block.coarse_offsets = mode
        outs = {}
        for impl in ("torchvision", "sampling"):
            block.dcn_impl = impl
            for m in block.DyConv:
                m.conv.impl = impl
            out = block(feats)
            loss = sum(
                (v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in out.values()
            )
            outs[impl] = (out, torch.autograd.grad(loss, [*feats.values(), *block.parameters()]))
        assert all(v.is_contiguous(memory_format=torch.channels_last) for v in outs["sampling"][0].values())
        for k in feats:
            torch.testing.assert_close(
                outs["sampling"][0][k], outs["torchvision"][0][k], rtol=1e-9, atol=1e-9
            )
        for a, b in zip(outs["sampling"][1], outs["torchvision"][1]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
