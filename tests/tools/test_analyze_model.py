"""tools/analyze_model.py on the small ATSS + DyHead shapes config: the parameter count is the model's,
the FLOPs (deformable convolutions included) and activations are counted, bad arguments are one line."""

import re

from detectron2.modeling import build_model

from deqdet.engine import build_config
from tests.helpers import config_file

CONFIG = config_file("shapes", "atss_dyhead_r18.yaml")
OPTS = ["MODEL.DEVICE", "cpu"]


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, text
    return float(match.group(1).replace(",", ""))


def test_parameters_flops_and_activations(capsys):
    from tools.analyze_model import count_flops, main, random_inputs

    assert main(["--config-file", CONFIG, "--size", "64x96", "--opts", *OPTS]) == 0
    out = capsys.readouterr().out
    model = build_model(build_config(CONFIG, OPTS))
    assert _number(r"parameters: ([\d,]+) \(", out) == sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert _number(r"\(([\d,]+) trainable\)", out) == trainable
    rows = re.findall(r"^\| (\w+) +\| +([\d,]+) \|", out, re.M)
    assert {"backbone", "head"} <= {name for name, _ in rows}
    assert _number(r"GFLOPs of one 64x96 image: ([\d.]+)", out) > 0
    assert _number(r"activations of one 64x96 image: ([\d.]+) M", out) > 0
    total, per_module, operators, unsupported = count_flops(model.eval(), random_inputs((64, 96), "cpu"))
    assert total > 0 and 0 < sum(per_module.values()) <= total
    # DyHead's deformable convolutions: counted, not left out as an operator fvcore cannot count
    assert sum(n for op, n in operators.items() if "deform_conv2d" in op) > 0
    assert not any("deform" in op for op in unsupported)


def test_tasks_and_bad_size(capsys):
    from tools.analyze_model import main

    assert main(["--config-file", CONFIG, "--tasks", "parameter", "--opts", *OPTS]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "GFLOPs" not in out and "activations" not in out
    assert main(["--config-file", CONFIG, "--size", "64by96", "--opts", *OPTS]) == 2
    assert capsys.readouterr().err.strip() == "error: --size '64by96': expected HxW, e.g. 800x1333"
