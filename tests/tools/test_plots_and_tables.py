"""tools/plot_curves.py and tools/analyze_errors.py on hand-written inputs whose right answer is known:
the curves' colours and legend, the error table against its confusion matrix, the best and worst
images."""

import json

import matplotlib.colors
import matplotlib.figure
import numpy as np
import pytest

from deqdet.analysis import ErrorBreakdown, classify_detections


def _write_metrics(folder, records):
    folder.mkdir()
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


@pytest.fixture()
def two_runs(tmp_path):
    """An ATSS run and a combined-detector run: only the second has the dense head's and the DEQ
    decoder's losses and an AP."""
    atss = _write_metrics(tmp_path / "atss", [
        {"iteration": i, "total_loss": 2.0 / i, "loss_cls": 1.0 / i, "lr": 0.01} for i in (19, 39, 59)
    ])
    combined = _write_metrics(tmp_path / "combined", [
        {"iteration": i, "total_loss": 3.0 / i, "dense_loss_cls": 1.0 / i, "init_loss_giou": 0.5 / i,
         "iter2_loss_cls": 0.4 / i, "iter10_loss_cls": 0.3 / i, "lr": 0.01} for i in (19, 39, 59)
    ] + [{"iteration": 59, "bbox/AP": 12.5}])
    return atss, combined


@pytest.fixture()
def figures(monkeypatch):
    """The figures tools/plot_curves.py saves, kept open to read their artists."""
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: saved.append(fig))
    return saved


def _legend_names(fig) -> list:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return [[text.get_text() for text in legend.get_texts()] for legend in legends]


def _colours(fig) -> dict:
    """{run label: the colours of its lines across the panels}."""
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
    return colours


def test_plot_curves_one_colour_per_run_and_the_combined_detector_losses(two_runs, figures, tmp_path, capsys):
    from tools.plot_curves import main

    atss, combined = two_runs
    assert main([atss, combined, "--output", str(tmp_path / "curves.png")]) == 0
    assert ("total_loss, dense_loss_cls, init_loss_giou, iter2_loss_cls, iter10_loss_cls, loss_cls, lr, "
            "bbox/AP of 2 run(s)") in capsys.readouterr().out
    (fig,) = figures
    colours = _colours(fig)
    assert set(colours) == {atss, combined}
    assert all(len(c) == 1 for c in colours.values()), colours  # e.g. bbox/AP: only the second run
    assert colours[atss] != colours[combined]
    assert [atss, combined] in _legend_names(fig)


def test_plot_curves_legend_names_runs_missing_from_the_first_panel(two_runs, figures, tmp_path):
    from tools.plot_curves import main

    atss, combined = two_runs
    assert main([atss, combined, "--keys", "bbox/AP", "total_loss", "--output", str(tmp_path / "c.png")]) == 0
    (fig,) = figures
    assert [atss, combined] in _legend_names(fig)
    colours = _colours(fig)
    assert all(len(c) == 1 for c in colours.values()) and colours[atss] != colours[combined], colours


def _xywh(x0, y0, x1, y1):
    return [x0, y0, x1 - x0, y1 - y0]


@pytest.fixture()
def hand_built(tmp_path):
    """Three classes a, b, c on four 100 x 100 images, each detection's kind known:

    - one.png: a on its a box (correct), a on the b box (class confusion; the b box missed);
    - two.png: c on the c box at IoU 1/3 (localisation; the c box missed), b on nothing (background);
    - three.png: a on its a box (correct); four.png: nothing to find, nothing found.

    Returns the tool's arguments with the given ones added.
    """
    images = [{"id": i, "file_name": name, "width": 100, "height": 100}
              for i, name in enumerate(["one.png", "two.png", "three.png", "four.png"], 1)]
    boxes = [(1, 1, (10, 10, 30, 30)), (1, 2, (50, 50, 80, 80)), (2, 3, (10, 10, 40, 40)),
             (3, 1, (20, 20, 60, 60))]
    annotations = [{"id": i, "image_id": image, "category_id": cat, "bbox": _xywh(*box), "area": 1.0,
                    "iscrowd": 0} for i, (image, cat, box) in enumerate(boxes, 1)]
    categories = [{"id": i, "name": name} for i, name in enumerate("abc", 1)]
    (tmp_path / "images").mkdir()
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    detections = [(1, 1, (10, 10, 30, 30), 0.9), (1, 1, (50, 50, 80, 80), 0.8),
                  (2, 3, (10, 10, 40, 100), 0.7), (2, 2, (60, 5, 90, 35), 0.6),
                  (3, 1, (20, 20, 60, 60), 0.95)]
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": i, "category_id": cat, "bbox": _xywh(*box), "score": score}
                                   for i, cat, box, score in detections]))
    name = f"hand_built_{tmp_path.name}"  # one registration per test
    opts = ["--opts", "DATASETS.COCO_FILES", f"('{name}={gt}:{tmp_path / 'images'}',)"]
    return lambda *args: ["--results", str(results), "--dataset", name, *args, *opts]


def _table_rows(printed: str, first_header: str) -> dict:
    """{first cell: the other cells} of the pipe table whose header starts with ``first_header``."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_analyze_errors_confusion_matrix_agrees_with_the_table(hand_built, tmp_path, capsys):
    from tools.analyze_errors import main

    out = tmp_path / "errors"
    assert main(hand_built("--output", str(out))) == 0
    rows = _table_rows(capsys.readouterr().out, "class")
    # columns after AP, AP50, AP75: correct, duplicate, class confusion, localisation, background, missed
    assert {name: [int(v) for v in cells[3:]] for name, cells in rows.items()} == {
        "a": [2, 0, 1, 0, 0, 0], "b": [0, 0, 0, 0, 1, 1], "c": [0, 0, 0, 1, 0, 1], "all": [2, 0, 1, 1, 1, 2]}
    errors = json.loads((out / "errors.json").read_text())
    assert errors["confusion_rows"] == ["a", "b", "c", "localisation", "background"]
    assert errors["confusion"] == [  # columns a, b, c, (missed)
        [2, 0, 0, 0],  # the a boxes: found as a twice
        [1, 0, 0, 1],  # the b box: detected as a (class confusion), and missed
        [0, 0, 0, 1],  # the c box: missed
        [0, 0, 1, 0],  # poorly localised detections: one of class c
        [0, 1, 0, 0],  # detections of nothing: one of class b
    ]
    matrix = np.array(errors["confusion"])
    for k, name in enumerate("abc"):  # each table cell is a part of the matrix
        correct, _, confusion, localisation, background, missed = (int(v) for v in rows[name][3:])
        assert matrix[k, k] == correct and matrix[:3, k].sum() - matrix[k, k] == confusion
        assert (matrix[3, k], matrix[4, k], matrix[k, 3]) == (localisation, background, missed)


def test_analyze_errors_lists_the_best_and_worst_images(hand_built, tmp_path, capsys):
    from tools.analyze_errors import main

    out = tmp_path / "errors"
    assert main(hand_built("--output", str(out), "--topk", "2")) == 0
    printed = capsys.readouterr().out
    best, worst = printed.split("best 2 images")[1].split("worst 2 images")
    assert list(_table_rows(best, "image")) == ["three.png", "one.png"]  # F1 1 and 0.5
    assert list(_table_rows(worst, "image")) == ["two.png", "one.png"]  # F1 0 and 0.5
    assert _table_rows(best, "image")["one.png"] == ["0.50", "1", "1", "1"]  # F1, correct, false pos., missed
    errors = json.loads((out / "errors.json").read_text())
    assert [(i["file_name"], i["f1"]) for i in errors["worst_images"]] == [("two.png", 0.0), ("one.png", 0.5)]


def test_best_and_worst_ties_and_images_without_anything():
    from deqdet.analysis import ImageScore, best_and_worst

    scores = [ImageScore(1, "empty", 0, 0, 0), ImageScore(2, "small", 1, 0, 0), ImageScore(3, "big", 3, 0, 0),
              ImageScore(4, "one miss", 0, 0, 1), ImageScore(5, "all wrong", 0, 2, 3)]
    best, worst = best_and_worst(scores, 2)
    assert [s.file_name for s in best] == ["big", "small"]  # F1 1 both: more correct first
    assert [s.file_name for s in worst] == ["all wrong", "one miss"]  # F1 0 both: more errors first
    assert "empty" not in {s.file_name for s in best + worst}


def test_classify_detections_localisation_and_background_rows():
    breakdown = ErrorBreakdown(num_classes=2)
    gt = np.array([[0, 0, 10, 10]], np.float32)
    kinds = classify_detections(breakdown, gt, [0], np.array([[0, 0, 10, 30], [50, 50, 60, 60]], np.float32),
                                [0, 1], [0.9, 0.8])
    assert kinds == ["localisation", "background"]
    assert breakdown.confusion.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]]
