"""The COCO configs train what the official DEQDet, AdaMixer and Dynamic Head recipes train
(docs/official_recipes.md): backbone norm and frozen stages, parameter-group multipliers, TF32."""

import os

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import ResNet

from deqdet.engine import Trainer, build_config
from deqdet.errors import UserInputError
from deqdet.modeling.norm import FrozenStatsBatchNorm2d
from deqdet.optim import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERY_R50_CONFIGS = ["deqdet_r50_1x.yaml", "deqdet_r50_2x.yaml", "adamixer_r50_1x.yaml",
                     "adamixer_r50_300q_3x.yaml"]
DYHEAD_CONFIGS = ["atss_r50_fpn_1x.yaml", "dyhead_r50_atss_fpn_1x.yaml", "dyhead_r50_retina_fpn_1x.yaml",
                  "dyhead_r50_rcnn_fpn_1x.yaml", "dyhead_r50_rcnn_fpn_1x_paper.yaml"]


def _cfg(name, *opts):
    return build_config(os.path.join(ROOT, "configs", name), ["MODEL.DEVICE", "cpu", *opts])


def _resnet(backbone: torch.nn.Module) -> ResNet:
    return next(m for m in backbone.modules() if isinstance(m, ResNet))


def _frozen_stages(resnet: ResNet) -> list:
    """Names of the stem / stages none of whose parameters train."""
    parts = {"stem": resnet.stem, **{name: stage for stage, name in zip(resnet.stages, resnet.stage_names)}}
    return [name for name, part in parts.items() if not any(p.requires_grad for p in part.parameters())]


def test_frozen_stats_norm_uses_running_statistics_and_trains_its_affine():
    norm = FrozenStatsBatchNorm2d(2).train()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([1.0, -2.0]))
        norm.running_var.copy_(torch.tensor([4.0, 0.25]))
        norm.weight.copy_(torch.tensor([2.0, 3.0]))
        norm.bias.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([3.0, -1.0]).view(1, 2, 1, 1).expand(2, 2, 3, 3).clone()
    out = norm(x)
    # (3 - 1) / sqrt(4 + 1e-5) * 2 + 0.5 = 2.5; (-1 + 2) / sqrt(0.25 + 1e-5) * 3 = 6 (to 1e-4)
    assert torch.allclose(out[:, 0], torch.full((2, 3, 3), 2.5), atol=1e-4)
    assert torch.allclose(out[:, 1], torch.full((2, 3, 3), 6.0), atol=1e-3)
    out.sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None
    assert torch.equal(norm.running_mean, torch.tensor([1.0, -2.0]))
    assert sorted(norm.state_dict()) == sorted(FrozenBatchNorm2d(2).state_dict())


@pytest.mark.parametrize("config", ["deqdet_r50_1x.yaml", "adamixer_r50_1x.yaml"])
def test_r50_backbone_trains_what_the_official_recipe_trains(config):
    """frozen_stages=1 + BN(requires_grad=True) + norm_eval: 23,282,688 trainable parameters (res2-res5
    convs minus res2, plus the BatchNorm scales / biases of res3-res5); statistics never move."""
    cfg = _cfg(config)
    assert cfg.MODEL.RESNETS.NORM == "FrozenStatsBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    backbone = build_backbone(cfg)
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == 23_282_688
    assert _frozen_stages(_resnet(backbone)) == ["stem", "res2"]
    norms = [m for m in backbone.modules() if isinstance(m, FrozenStatsBatchNorm2d)]
    assert len(norms) == 53 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert backbone.res3[0].conv1.norm.weight.requires_grad
    assert not backbone.res2[0].conv1.norm.weight.requires_grad

    # The keys are those of the FrozenBN ResNet the converters and the ImageNet weights target.
    reference = build_backbone(_cfg(config, "MODEL.BACKBONE.NAME", "build_resnet_backbone",
                                    "MODEL.RESNETS.NORM", "FrozenBN"))
    assert sorted(backbone.state_dict()) == sorted(reference.state_dict())

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in norms:
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    backbone.train()
    x = torch.randn(2, 3, 64, 64, generator=g)
    out = backbone(x)["res5"]
    out.mean().backward()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items() if "running" in k)
    assert backbone.res5[2].conv3.norm.weight.grad is not None
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(x)["res5"], out, atol=1e-5)  # training mode = eval statistics


@pytest.fixture(scope="module")
def deqdet_optimizer():
    cfg = _cfg("deqdet_r50_1x.yaml")
    model = build_model(cfg)
    return dict(model.named_parameters()), build_optimizer(cfg, model)


def _lr_and_decay(optimizer, param):
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return group["lr"], group["weight_decay"]


@pytest.mark.parametrize(
    "name,expected",
    [("neck.convs.0.weight", (2.5e-5, 0.01)),  # official: base lr and decay outside bbox_head
     ("queries.content.weight", (2.5e-5, 0.01)),
     ("backbone.res3.0.conv1.norm.weight", (2.5e-5, 0.01)),
     ("decoder.init_stage.sampling_offsets.weight", (1e-4, 0.1)),  # bbox_head: lr x4, decay x10
     ("decoder.refine_stage.attention.in_proj_weight", (1e-4, 0.1)),
     ("decoder.refine_stage.ffn_norm.bias", (1e-4, 0.1))],
)
def test_deqdet_multipliers_select_the_decoder_stages(deqdet_optimizer, name, expected):
    params, optimizer = deqdet_optimizer
    assert type(optimizer).__name__ == "AdamWWithFullModelGradientClipping"
    assert _lr_and_decay(optimizer, params[name]) == pytest.approx(expected)


def test_deqdet_optimizer_holds_every_trainable_parameter_once(deqdet_optimizer):
    params, optimizer = deqdet_optimizer
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == sum(p.requires_grad for p in params.values())


def test_param_group_rules_errors_and_norm_decay():
    cfg = _cfg("shapes/adamixer_r18.yaml", "MODEL.QUERY.NUM_STAGES", "1",
               "MODEL.RESNETS.NORM", "FrozenStatsBN", "SOLVER.WEIGHT_DECAY_NORM", "0.0")
    model = build_model(cfg)
    # WEIGHT_DECAY_NORM reaches the project's norm as Detectron2's groups give it to BatchNorm.
    optimizer = build_optimizer(cfg, model)
    norm = model.backbone.res3[0].conv1.norm
    assert isinstance(norm, FrozenStatsBatchNorm2d)
    assert _lr_and_decay(optimizer, norm.weight) == pytest.approx((1e-3, 0.0))
    assert _lr_and_decay(optimizer, model.backbone.res3[0].conv1.weight) == pytest.approx((1e-3, 1e-4))
    for rules, message in [("[('^decodr[.]', 4.0, 10.0)]", "match no parameter"),
                           ("[('(', 1.0, 1.0)]", "bad regex"), ("[('^decoder', 4.0)]", "each rule")]:
        bad = cfg.clone()
        bad.defrost()
        bad.merge_from_list(["SOLVER.PARAM_GROUP_RULES", rules])
        with pytest.raises(UserInputError, match=message):
            build_optimizer(bad, model)


def test_adamixer_has_no_multipliers():
    cfg = _cfg("adamixer_r50_1x.yaml")
    assert list(cfg.SOLVER.PARAM_GROUP_RULES) == []


@pytest.mark.parametrize("config,precision", [("deqdet_r50_1x.yaml", "high"), ("deqdet_r50_2x.yaml", "high"),
                                              ("adamixer_r50_1x.yaml", "highest"),
                                              ("dyhead_r50_atss_fpn_1x.yaml", "highest"),
                                              ("shapes/deqdet_r18.yaml", "highest")])
def test_float32_matmul_precision_of_the_configs(config, precision):
    assert _cfg(config).MODEL.FLOAT32_MATMUL_PRECISION == precision


def test_float32_matmul_precision_reaches_torch():
    saved = torch.get_float32_matmul_precision()
    try:
        for precision in ("high", "highest"):
            Trainer.build_model(_cfg("shapes/adamixer_r18.yaml", "MODEL.QUERY.NUM_STAGES", "1",
                                     "MODEL.FLOAT32_MATMUL_PRECISION", precision))
            assert torch.get_float32_matmul_precision() == precision
        with pytest.raises(UserInputError, match="MODEL.FLOAT32_MATMUL_PRECISION"):
            Trainer.build_model(_cfg("shapes/adamixer_r18.yaml", "MODEL.FLOAT32_MATMUL_PRECISION", "tf32"))
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("config", DYHEAD_CONFIGS)
def test_dyhead_configs_train_stem_and_res2(config):
    """microsoft/DynamicHead sets MODEL.BACKBONE.FREEZE_AT = -1 for every config: Detectron2's ResNet
    then freezes nothing (freeze_at >= 1 freezes the stem); BatchNorm stays FrozenBN."""
    cfg = _cfg(config)
    assert cfg.MODEL.BACKBONE.FREEZE_AT == -1
    resnet = _resnet(build_backbone(cfg))
    assert _frozen_stages(resnet) == []
    assert resnet.stem.conv1.weight.requires_grad and resnet.res2[0].conv1.weight.requires_grad
    norms = [m for m in resnet.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d,
                                                            FrozenStatsBatchNorm2d))]
    assert norms and all(type(m) is FrozenBatchNorm2d for m in norms)


def test_query_r50_configs_use_the_official_backbone_norm():
    for config in QUERY_R50_CONFIGS:
        cfg = _cfg(config)
        assert (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT) == (
            "build_resnet_backbone_project_norm", "FrozenStatsBN", 2), config
    assert isinstance(build_backbone(_cfg("deqdet_r50_1x.yaml", "MODEL.RESNETS.DEPTH", "18",
                                          "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"),
                                     ShapeSpec(channels=3)).res3[0].conv1.norm, FrozenStatsBatchNorm2d)
