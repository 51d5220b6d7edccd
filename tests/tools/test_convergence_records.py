"""benchmarks/convergence.py reads a combined detector's dense-head AP from the run's own evaluations:
Detectron2 logs an evaluation at iteration k * period - 1 and the last one at MAX_ITER - 1 (after
training), which the curve names k * period and MAX_ITER; each run's key names its seed, trunk file and
lr; a variant recorded there and the config a user runs compute the same."""

import json
import os
import sys

from detectron2.modeling import build_model

from deqdet.engine import build_config
from deqdet.optim import build_optimizer
from tests.helpers import ROOT, config_file

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from convergence import DETECTORS, _logged_dense, run_key  # noqa: E402


def test_dense_figures_keyed_by_evaluation_iteration(tmp_path):
    def evaluation(iteration, ap, dense):
        return {"iteration": iteration, "bbox/AP": ap, "dense_bbox/AP": dense[0], "dense_bbox/AP50": dense[1],
                "dense_bbox/AP75": dense[2]}

    lines = [{"iteration": 19, "time": 0.5, "total_loss": 3.0}, evaluation(499, 40.0, (41.5, 63.0, 47.0)),
             evaluation(999, 47.0, (49.0, 76.0, 58.0)), evaluation(999, 47.5, (49.5, 76.5, 58.5))]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    assert _logged_dense(str(tmp_path), iters=1000) == {500: (41.5, 63.0, 47.0), 1000: (49.5, 76.5, 58.5)}


def test_no_dense_figures_without_both_heads_evaluated(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 999, "bbox/AP": 47.0}) + "\n")
    assert _logged_dense(str(tmp_path), iters=1000) == {}


def test_run_key_names_seed_trunk_file_and_lr():
    assert run_key("flagship", 2000, 1) == "flagship@2000"
    assert run_key("flagship", 2000, 2, "output/convergence/shapes_trunk.pth") == "flagship@2000_s2_trunk"
    assert run_key("deqdet", 2000, 1, "output/convergence/shapes_trunk2.pth", 2.5e-4) == \
        "deqdet@2000_trunk2_lr0.00025"
    assert run_key("deqdet", 4000, 3, "/elsewhere/my_resnet.pth") == "deqdet@4000_s3_my_resnet"


def test_finetune_config_is_the_recorded_decoder_variant():
    config, opts, _ = DETECTORS["flagship_deqdet_decoder_lr0.25_o2m2"]
    # trained as recorded; answers after 2 + 1 refinement steps where the variant was evaluated after 6 + 1
    variant = build_config(config, opts + ["MODEL.DEQDET.MAX_ITERS", "2", "MODEL.DEVICE", "cpu"])
    finetune = build_config(config_file("shapes", "retinanet_dyhead_deqdet_r18_finetune.yaml"),
                            ["MODEL.DEVICE", "cpu"])
    assert finetune.dump().replace(finetune.OUTPUT_DIR, variant.OUTPUT_DIR) == variant.dump()
    # its decoder is deqdet_r18.yaml's: width and refinement schedule
    deqdet = build_config(config_file("shapes", "deqdet_r18.yaml"), ["MODEL.DEVICE", "cpu"])
    for node, keys in (("QUERY", ("NUM_QUERIES", "CONTENT_DIM", "FFN_DIM")),
                       ("DEQDET", ("REFINEMENT_STEPS", "SUPERVISION_POSITIONS", "RAG",
                                   "EXTRA_INIT_SUPERVISIONS"))):
        for key in keys:
            assert finetune.MODEL[node][key] == deqdet.MODEL[node][key], f"MODEL.{node}.{key}"
    # trained one-to-two where DEQDet and the from-scratch flagship match one-to-one
    assert finetune.MODEL.QUERY.MATCHES_PER_GT == 2 and deqdet.MODEL.QUERY.MATCHES_PER_GT == 1
    assert (finetune.MODEL.DEQDET.MAX_ITERS, deqdet.MODEL.DEQDET.MAX_ITERS) == (2, 6)
    assert build_config(config, ["MODEL.DEVICE", "cpu"]).MODEL.QUERY.MATCHES_PER_GT == 1
    # the decoder's parameters, and only they, learn at a quarter of the lr
    model = build_model(finetune)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(finetune, model).param_groups
    quarter = {names[id(p)] for g in groups if g["lr"] == finetune.SOLVER.BASE_LR * 0.25 for p in g["params"]}
    assert quarter == {n for n in names.values() if n.split(".")[0] in ("decoder", "content_proj", "queries")}
    assert any(n.startswith("decoder.") for n in quarter) and all(not n.startswith("dense.") for n in quarter)
