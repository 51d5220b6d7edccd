"""The inspection tools: browse a dataset's ground truth with the checks shown, draw an evaluation's
results next to the ground truth, plot training curves, per-class AP and the error breakdown, and
latency on given images. Each on a short real run (training + evaluation on shapes_mini_*)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import train_net
from deqdet.analysis import ErrorBreakdown, classify_detections
from tests.data.hostile_data import ATSS_CONFIG, TINY_ATSS, write_coco

EVAL = [
    "DATASETS.TRAIN",
    "('shapes_mini_train',)",
    "DATASETS.TEST",
    "('shapes_mini_val',)",
    "MODEL.ATSS.NUM_CLASSES",
    "8",
    "SOLVER.MAX_ITER",
    "2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-iteration ATSS training evaluated on shapes_mini_val (every candidate kept): its OUTPUT_DIR."""
    out = tmp_path_factory.mktemp("run")
    train_net.main(
        train_net.default_argument_parser().parse_args(
            ["--config-file", ATSS_CONFIG, *TINY_ATSS, *EVAL, "OUTPUT_DIR", str(out)]
        )
    )
    return out


def _results(run):
    return str(run / "inference" / "shapes_mini_val" / "coco_instances_results.json")


def test_browse_dataset_marks_clipped_and_dropped_boxes(tmp_path, capsys):
    from tools.browse_dataset import main

    json_path = write_coco(
        tmp_path / "data", ["boxes", "good", "missing"]
    )  # hostile boxes on the first image
    out = tmp_path / "browse"
    assert (
        main(
            [
                "--dataset",
                "browse_me",
                "--output",
                str(out),
                "--opts",
                "DATASETS.COCO_FILES",
                f"('browse_me={json_path}',)",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert f"{out / 'boxes.png'}: 7 boxes, 2 clipped, 4 dropped" in captured.out
    assert f"{out / 'good.png'}: 1 box, 0 clipped, 0 dropped" in captured.out
    assert "skipped" in captured.err and "missing.png: image not found" in captured.err
    assert sorted(os.listdir(out)) == ["boxes.png", "good.png"]
    drawn, plain = np.asarray(Image.open(out / "boxes.png")), np.asarray(
        Image.open(json_path.parent / "boxes.png")
    )
    assert drawn.shape == plain.shape and (drawn != plain).any()


def test_visualize_results_next_to_ground_truth(run, tmp_path, capsys):
    from tools.visualize_results import main

    out = tmp_path / "vis"
    assert (
        main(
            [
                "--results",
                _results(run),
                "--dataset",
                "shapes_mini_val",
                "--output",
                str(out),
                "--num",
                "3",
                "--confidence-threshold",
                "0.0",
            ]
        )
        == 0
    )
    assert len(os.listdir(out)) == 3
    drawn = np.asarray(Image.open(next(out.iterdir())))
    assert drawn.shape[1] % 2 == 0  # detections | ground truth, side by side
    assert (
        main(["--results", str(tmp_path / "nope.json"), "--dataset", "shapes_mini_val", "--output", str(out)])
        == 2
    )
    assert "nope.json" in capsys.readouterr().err


def test_plot_curves_of_several_runs(run, tmp_path, capsys):
    from tools.plot_curves import main

    other = tmp_path / run.name  # a second run in a folder of the same name (seeds s1, s2, ... alike)
    other.mkdir()
    (other / "metrics.json").write_text(
        open(run / "metrics.json").read() + '{"iteration": 3, "total_l'
    )  # killed
    target = tmp_path / "curves.png"
    assert main([str(run), str(other / "metrics.json"), "--output", str(target)]) == 0
    captured = capsys.readouterr()
    assert "total_loss, loss_box_reg, loss_cls, loss_ctr, lr, bbox/AP of 2 run(s)" in captured.out
    assert "1 lines that are not JSON skipped" in captured.err
    assert Image.open(target).size[0] > 500
    assert main([str(run), "--keys", "nonsense"]) == 2
    assert "no run has nonsense" in capsys.readouterr().err


def test_error_kinds_by_hand():
    breakdown = ErrorBreakdown(num_classes=2)
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    dets = np.array(
        [
            [0, 0, 10, 10],  # class 0 on box 0: correct
            [0, 0, 10, 11],  # class 0 on box 0 again: duplicate
            [20, 20, 30, 30],  # class 0 on a class-1 box: class confusion
            [40, 40, 48, 62],  # class 0, IoU 0.33 with box 2 (class 0): localisation
            [80, 80, 90, 90],
        ],  # background
        np.float32,
    )
    kinds = classify_detections(breakdown, gt, [0, 1, 0], dets, [0, 0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5])
    assert kinds == ["correct", "duplicate", "class confusion", "localisation", "background"]
    assert breakdown.counts["missed"] == 2  # boxes 1 and 2
    # rows: the two classes, then localisation, background; columns: the two classes, then missed
    assert breakdown.confusion.tolist() == [[1, 0, 1], [1, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_analyze_errors_table_and_confusion_matrix(run, tmp_path, capsys):
    from tools.analyze_errors import main

    out = tmp_path / "errors"
    assert (
        main(
            [
                "--results",
                _results(run),
                "--dataset",
                "shapes_mini_val",
                "--output",
                str(out),
                "--score-threshold",
                "0.0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| class" in printed and "| circle" in printed and "| all" in printed
    errors = json.loads((out / "errors.json").read_text())
    ap = np.array(errors["ap"], dtype=float)
    final = [json.loads(line) for line in open(run / "metrics.json")][-1]
    assert np.nanmean(ap[:, 0]) == pytest.approx(final["bbox/AP"], abs=1e-6)  # the evaluation's AP
    detections = sum(1 for r in json.load(open(_results(run))))
    assert sum(v for k, v in errors["counts"].items() if k != "missed") == detections
    assert Image.open(out / "confusion_matrix.png").size[0] > 300


def test_measure_latency(tmp_path, capsys):
    from tools.measure_latency import main, measure

    calls = []
    stats = measure(calls.append, ["a", "b"], warmup=2, repeat=3, synchronize=lambda: None)
    assert calls == ["a", "a"] + ["a", "b"] * 3 and stats["images"] == 6
    assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]

    for name in ("x", "y"):
        Image.fromarray(np.full((48, 64, 3), 80, np.uint8)).save(tmp_path / f"{name}.png")
    report = tmp_path / "latency.json"
    assert (
        main(
            [
                "--config-file",
                ATSS_CONFIG,
                "--input",
                str(tmp_path),
                str(tmp_path / "gone.png"),
                "--warmup",
                "1",
                "--json",
                str(report),
                "--opts",
                *TINY_ATSS,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "latency ms: mean" in captured.out and "throughput:" in captured.out
    assert f"skipped {tmp_path / 'gone.png'}: no such file" in captured.err
    assert json.loads(report.read_text())["images"] == 2
