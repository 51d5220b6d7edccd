"""tools/plot_curves.py on hand-written inputs whose right answer is known: the curves' colours and
legend."""

import json

import matplotlib.colors
import matplotlib.figure
import pytest


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

