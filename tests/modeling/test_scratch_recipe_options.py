"""Options for training the combined detector from scratch: per-level tower norms, identity-initialised
DyHead blocks, query content from the dense head's features, IoU-aware decoder targets, one-to-many
matching, box and classification losses on every query on an object. Each default keeps the official
behaviour."""


import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from deqdet.engine import build_config
from deqdet.modeling.dyhead.atss import ATSSHead
from deqdet.modeling.dyhead.dyconv import DyConv
from tests.helpers import config_file

COMBINED = config_file("shapes", "dyhead_deqdet_r18.yaml")
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.DEQDET.MAX_ITERS", "3", "MODEL.QUERY.NUM_QUERIES", "8"]


def _pyramid(channels=32, sizes=(16, 8, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i + 3}": torch.randn(2, channels, s, s, generator=g) for i, s in enumerate(sizes)}


# ----------------------------------------------------------------------------------------- DyHead block
def test_identity_init_block_starts_as_the_identity_and_learns_its_scale():
    torch.manual_seed(0)
    block = DyConv(32, 32, identity_init=True)
    features = _pyramid()
    out = block(features)
    for name, x in features.items():
        torch.testing.assert_close(out[name], x, rtol=0, atol=0)
    sum(o.square().sum() for o in block(_pyramid(seed=1)).values()).backward()
    assert block.residual_scale.grad.abs().sum() > 0


def test_identity_init_block_adds_the_official_block_scaled():
    torch.manual_seed(0)
    official = DyConv(32, 32)
    torch.manual_seed(0)
    residual = DyConv(32, 32, identity_init=True)
    with torch.no_grad():
        residual.residual_scale.fill_(0.5)
    features = _pyramid()
    expected, got = official(features), residual(features)
    for name, x in features.items():
        torch.testing.assert_close(got[name], x + 0.5 * expected[name])


def test_official_block_has_no_residual_parameter():
    names = set(DyConv(32, 32).state_dict())
    assert not any("residual" in n for n in names)
    assert set(DyConv(32, 32, identity_init=True).state_dict()) == names | {"residual_scale"}


# ------------------------------------------------------------------------------------ ATSS tower norms
def _head(norm, seed=0):
    torch.manual_seed(seed)
    shapes = [ShapeSpec(channels=32, stride=s) for s in (8, 16, 32)]
    return ATSSHead(input_shape=shapes, num_classes=3, num_anchors=1, num_convs=2, norm=norm)


def test_batch_norms_are_per_level_and_keep_each_levels_statistics():
    """As Detectron2's RetinaNetHead: the tower convs are shared, each level has its own BatchNorms, whose
    running mean after one training pass is 0.1 x the batch mean of the first conv's output on that level."""
    per_level = _head("BN")
    assert per_level.cls_norms is not None and len(per_level.cls_norms) == 3
    features = list(_pyramid().values())
    per_level(features)
    for level, feature in enumerate(features):
        conv_out = per_level.cls_tower[0](feature)
        torch.testing.assert_close(
            per_level.cls_norms[level][0].running_mean, 0.1 * conv_out.mean(dim=(0, 2, 3))
        )
    means = torch.stack([per_level.cls_norms[lv][0].running_mean for lv in range(3)])
    assert not torch.allclose(means[0], means[2])


def test_group_norm_is_shared_by_the_levels_with_the_official_names():
    official = _head("GN")
    assert official.cls_norms is None
    names = set(official.state_dict())
    assert "cls_tower.1.weight" in names and not any("norms" in n for n in names)


# ------------------------------------------------------------------------------ one-to-many matching
def test_matches_per_gt_reaches_the_combined_detectors_matcher_and_defaults_to_one_to_one():
    default = build_model(build_config(COMBINED, SMALL))
    assert default.criterion.matcher.matches_per_gt == 1
    model = build_model(build_config(COMBINED, SMALL + ["MODEL.QUERY.MATCHES_PER_GT", "3"]))
    assert model.criterion.matcher.matches_per_gt == 3
