"""benchmarks/sweep.py: a variants file expands into one train_net.py command per variant and seed (the
combined detector's with both heads evaluated), a run's figures come from its metrics.json, the results
aggregate into per-variant means, and the fine-tuning config is the variant its figures were measured
with. No training."""

import importlib.util
import json
import os
import sys

import pytest

from deqdet.engine import build_config
from tests.helpers import ROOT, config_file


def _load_sweep():
    """benchmarks/sweep.py as a module (benchmarks/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "benchmarks", "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()

VARIANTS = """
base: configs/shapes/retinanet_demo.yaml
seeds: [1, 2]
common: [SOLVER.MAX_ITER, 10, INPUT.MIN_SIZE_TEST, 96]
output: {output}
groups:
  short: &short [SOLVER.STEPS, "(5, 8)"]
variants:
  - name: retinanet
  - name: deqdet
    config: configs/shapes/deqdet_r18.yaml
    overrides: [*short, MODEL.DEQDET.TOL, 0.3]
    seeds: [3]
  - name: combined
    config: configs/shapes/dyhead_deqdet_r18.yaml
  - name: combined_decoder_only
    config: configs/shapes/dyhead_deqdet_r18.yaml
    overrides: [MODEL.DENSE_QUERY.INFERENCE_SOURCE, decoder]
    seeds: [1]
"""


@pytest.fixture
def variants_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(VARIANTS.format(output=tmp_path / "runs"))
    return path


def test_dry_run_prints_one_command_per_variant_and_seed(variants_file, tmp_path, capsys):
    assert sweep.main([str(variants_file), "--dry-run", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = tmp_path / "runs"
    common = "SOLVER.MAX_ITER 10 INPUT.MIN_SIZE_TEST 96"
    prefix = "OMP_NUM_THREADS=1 python train_net.py --config-file configs/shapes/"
    assert lines == [
        f"{prefix}retinanet_demo.yaml {common} SEED 1 OUTPUT_DIR {runs}/retinanet/s1",
        f"{prefix}retinanet_demo.yaml {common} SEED 2 OUTPUT_DIR {runs}/retinanet/s2",
        f"{prefix}deqdet_r18.yaml {common} SOLVER.STEPS '(5, 8)' MODEL.DEQDET.TOL 0.3 SEED 3 "
        f"OUTPUT_DIR {runs}/deqdet/s3",
        # the combined detector evaluates its decoder and its dense head from each checkpoint ...
        f"{prefix}dyhead_deqdet_r18.yaml {common} MODEL.DENSE_QUERY.INFERENCE_SOURCE both SEED 1 "
        f"OUTPUT_DIR {runs}/combined/s1",
        f"{prefix}dyhead_deqdet_r18.yaml {common} MODEL.DENSE_QUERY.INFERENCE_SOURCE both SEED 2 "
        f"OUTPUT_DIR {runs}/combined/s2",
        # ... unless the variant says otherwise
        f"{prefix}dyhead_deqdet_r18.yaml {common} MODEL.DENSE_QUERY.INFERENCE_SOURCE decoder SEED 1 "
        f"OUTPUT_DIR {runs}/combined_decoder_only/s1",
    ]


def test_only_and_seeds_select_the_runs(variants_file):
    study = sweep.load_sweep(str(variants_file))
    runs = sweep.plan(study, only=["deqdet", "retinanet"], seeds=[7])
    assert [(r.variant.name, r.seed) for r in runs] == [("retinanet", 7), ("deqdet", 7)]
    assert runs[1].args[-4:] == ["SEED", "7", "OUTPUT_DIR", os.path.join(study.output, "deqdet", "s7")]
    with pytest.raises(sweep.VariantsFileError, match="no variants"):
        sweep.plan(study, only=["nonexistent"])
    with pytest.raises(SystemExit, match="error: .*no variants"):  # one line, no traceback
        sweep.main([str(variants_file), "--only", "nonexistent", "--dry-run"])


@pytest.mark.parametrize("text, message", [
    ("base: a.yaml\nseeds: [1]\nvariants:\n  - name: odd\n    overrides: [SOLVER.MAX_ITER]\n", "variant odd"),
    ("base: a.yaml\nseeds: [1]\nvariant:\n  - name: typo\n", "unknown keys"),
    ("seeds: [1]\nvariants:\n  - name: no_config\n", "no config"),
    ("base: a.yaml\nvariants:\n  - name: no_seeds\n", "seeds"),
    ("base: a.yaml\nseeds: [1]\nvariants:\n  - name: twice\n  - name: twice\n", "unique"),
])
def test_a_bad_variants_file_names_its_entry(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(sweep.VariantsFileError, match=message):
        sweep.load_sweep(str(path))


def _evaluation(iteration, ap, dense=None):
    record = {"iteration": iteration, "bbox/AP": ap, "bbox/AP50": ap + 20, "bbox/AP75": ap + 10}
    if dense is not None:
        record.update({"dense_bbox/AP": dense, "dense_bbox/AP50": dense + 20, "dense_bbox/AP75": dense + 10})
    return record


def test_a_run_s_figures_come_from_its_metrics_json(tmp_path):
    records = [{"iteration": 19, "time": 9.0}, {"iteration": 39, "time": 0.7}, {"iteration": 59, "time": 0.6},
               _evaluation(499, 40.0, 41.5), _evaluation(999, 47.0, 49.0), _evaluation(999, 47.5, 49.5)]
    (tmp_path / "metrics.json").write_text("\n".join(map(json.dumps, records)) + '\n{"iteration": 10')
    assert sweep.finished(str(tmp_path)) is None  # no final model: not finished
    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 1000\n")
    figures = sweep.finished(str(tmp_path))
    # the last of two records of one evaluation; s/iter from iteration 20 on; the cut-off line skipped
    assert figures == {
        "iteration": 1000, "ap": 47.5, "ap50": 67.5, "ap75": 57.5, "dense_ap": 49.5, "dense_ap50": 69.5,
        "dense_ap75": 59.5, "s_per_iter": 0.65,
        "curve": [{"iteration": 500, "ap": 40.0, "ap50": 60.0, "ap75": 50.0, "dense_ap": 41.5,
                   "dense_ap50": 61.5, "dense_ap75": 51.5},
                  {"iteration": 1000, "ap": 47.5, "ap50": 67.5, "ap75": 57.5, "dense_ap": 49.5,
                   "dense_ap50": 69.5, "dense_ap75": 59.5}],
    }
    # an evaluation after training logged at MAX_ITER itself counts as MAX_ITER
    assert sweep.summarise_metrics([_evaluation(1000, 50.0)], 1000)["iteration"] == 1000
    assert sweep.summarise_metrics([{"iteration": 5, "time": 1.0}], 1000) is None


def test_results_aggregate_into_per_variant_means(variants_file, tmp_path):
    study = sweep.load_sweep(str(variants_file))
    runs = {(r.variant.name, r.seed): r for r in sweep.plan(study, only=["retinanet", "combined"])}
    results = sweep.load_results(str(tmp_path / "none.json"))

    def figures(ap, dense=None):
        """A run's figures: AP ``ap`` (dense head ``dense``) after 40 iterations, 20 less after 20."""
        records = [{"iteration": 29, "time": 0.5}, _evaluation(39, ap, dense),
                   _evaluation(19, ap - 20, None if dense is None else dense - 20)]
        return sweep.summarise_metrics(records, 40)

    sweep.record(results, study, runs["combined", 1], figures(60.0, 59.0), threads=1)
    sweep.record(results, study, runs["combined", 2], figures(62.0, 61.0), threads=1)
    sweep.record(results, study, runs["retinanet", 1], figures(50.0), threads=1)
    rows = {row["variant"]: row for row in sweep.summary_rows(results)}
    assert rows["combined"]["seeds"] == [1, 2]
    assert rows["combined"]["ap"] == 61.0 and rows["combined"]["ap_per_seed"] == [60.0, 62.0]
    assert rows["combined"]["dense_ap"] == 60.0 and rows["combined"]["ap75"] == 71.0
    assert "dense_ap" not in rows["retinanet"]
    assert sweep.mean_curves(results)["combined"] == {20: {"ap": 41.0, "dense_ap": 40.0},
                                                      40: {"ap": 61.0, "dense_ap": 60.0}}

    stem = str(tmp_path / "results" / "study")
    written = sweep.write_results(results, stem)
    assert written == [stem + ".json", stem + ".md", stem + ".png"]
    assert json.loads(open(stem + ".json").read()) == results
    text = open(stem + ".md").read()
    assert "| combined | 1, 2 | 40 | 61.0 (60.0 / 62.0) | 81.0 | 71.0 | 60.0 (59.0 / 61.0) | 0.500 |" in text
    assert "| retinanet | 1 | 40 | 50.0 | 70.0 | 60.0 | - | 0.500 |" in text
    assert "| combined, dense head | 40.0 | 60.0 |" in text
    assert f"- combined: `{sweep.command(runs['combined', 1], 1)}`" in text


def test_finetune_config_is_the_measured_decoder_variant():
    """retinanet_dyhead_deqdet_r18_finetune.yaml is the flagship with DEQDet's decoder at a quarter of the
    lr (finetune_ablations.yaml) matched one-to-two, answering after 2 + 1 refinement steps where the
    variant answers after 6 + 1."""
    study = sweep.load_sweep(os.path.join(ROOT, "benchmarks", "variants", "finetune_ablations.yaml"))
    variant = next(v for v in study.variants if v.name == "flagship_deqdet_decoder_lr0.25")
    measured = build_config(variant.config, [*variant.overrides, "MODEL.QUERY.MATCHES_PER_GT", "2",
                                             "MODEL.DEQDET.MAX_ITERS", "2", "MODEL.DEVICE", "cpu"])
    finetune = build_config(config_file("shapes", "retinanet_dyhead_deqdet_r18_finetune.yaml"),
                            ["MODEL.DEVICE", "cpu"])
    assert finetune.dump().replace(finetune.OUTPUT_DIR, measured.OUTPUT_DIR) == measured.dump()
    deqdet = build_config(config_file("shapes", "deqdet_r18.yaml"), ["MODEL.DEVICE", "cpu"])
    for node, keys in (("QUERY", ("NUM_QUERIES", "CONTENT_DIM", "FFN_DIM")),
                       ("DEQDET", ("REFINEMENT_STEPS", "SUPERVISION_POSITIONS", "RAG",
                                   "EXTRA_INIT_SUPERVISIONS"))):
        for key in keys:
            assert finetune.MODEL[node][key] == deqdet.MODEL[node][key], f"MODEL.{node}.{key}"
    assert (finetune.MODEL.QUERY.MATCHES_PER_GT, deqdet.MODEL.QUERY.MATCHES_PER_GT) == (2, 1)
    assert (finetune.MODEL.DEQDET.MAX_ITERS, deqdet.MODEL.DEQDET.MAX_ITERS) == (2, 6)
