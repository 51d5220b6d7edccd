#!/usr/bin/env python
"""Training curves from Detectron2's ``metrics.json`` of one or several runs, as mmdetection's
``analyze_logs``: one panel per quantity (losses, learning rate, AP, DEQ refinement steps), one
line per run.

    .venv/bin/python tools/plot_curves.py output/deqdet_r18 output/adamixer_r18 --output curves.png
    .venv/bin/python tools/plot_curves.py output/demo/metrics.json --keys total_loss bbox/AP

A run is its ``OUTPUT_DIR`` or its ``metrics.json``. Without ``--keys``: ``total_loss``, every other
loss (``loss_*``, and those of the decoders and the combined detector: ``dense_loss_*``,
``init_loss_*``, ``iter{i}_loss_*``, ...), ``lr``, ``bbox/AP`` and ``deq/mean_steps``, those that
some run has. Each run keeps its colour in every panel; one legend names them all. A line that is
not JSON (the last one of a killed run) is skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

DEFAULT_KEYS = ("total_loss", "lr", "bbox/AP", "deq/mean_steps")
# a loss of any model: ``loss_*`` and ``<prefix>_loss_*`` (dense_, init_, init^{j}_, iter{i}_, s{i}_)
LOSS_KEY = re.compile(r"(^|_)loss_")


class BadRun(ValueError):
    """A run that cannot be read; the message names the file."""


def read_metrics(run: str) -> Tuple[str, List[dict], int]:
    """``(path of metrics.json, its records, lines skipped)`` of a run folder or file."""
    path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise BadRun(f"{path}: no such file (give a training's OUTPUT_DIR or its metrics.json)")
    records, skipped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict) and "iteration" in record:
                records.append(record)
    return path, records, skipped


def series(records: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    """(iterations, values) of ``key`` over the records that have it."""
    points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _natural(key: str) -> list:
    """Sort key that orders ``iter2_...`` before ``iter10_...``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def default_keys(runs: Dict[str, List[dict]]) -> List[str]:
    """:data:`DEFAULT_KEYS` with every other loss after ``total_loss`` (:data:`LOSS_KEY`: ATSS's
    ``loss_*``, the combined detector's ``dense_loss_*``, the decoders' ``init_loss_*``,
    ``init^{j}_loss_*``, ``iter{i}_loss_*`` and ``s{i}_loss_*``), those that some run has."""
    present = {k for records in runs.values() for r in records for k in r}
    losses = sorted((k for k in present if LOSS_KEY.search(k) and k not in DEFAULT_KEYS), key=_natural)
    return [k for k in (DEFAULT_KEYS[0], *losses, *DEFAULT_KEYS[1:]) if k in present]


def draw(runs: Dict[str, List[dict]], keys: Sequence[str]) -> Figure:
    """One panel per key, one line per run; a run has the same colour in every panel (the colour
    cycle's entry of its index, whichever panels it is missing from) and one legend above the panels
    names every run."""
    columns = min(3, len(keys))
    rows = (len(keys) + columns - 1) // columns
    height = 3.4 * rows + 0.3 * ((len(runs) + 2) // 3)  # the panels, then the legend's rows
    fig, axes = plt.subplots(
        rows, columns, figsize=(5 * columns, height), squeeze=False, layout="constrained"
    )
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(runs)}
    for ax, key in zip(axes.flat, keys):
        for name, records in runs.items():
            x, y = series(records, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 5 else None, color=colors[name], label=name)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        positive = all(v > 0 for records in runs.values() for v in series(records, key)[1])
        if positive and (key == "lr" or "loss" in key):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[name], label=name) for name in runs]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(3, len(runs)), fontsize=8)
    return fig


def plot(runs: Dict[str, List[dict]], keys: Sequence[str], output: str) -> None:
    """:func:`draw` written to ``output`` (PNG)."""
    fig = draw(runs, keys)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="OUTPUT_DIR folders or metrics.json files")
    parser.add_argument("--output", default="curves.png", help="the PNG to write (default curves.png)")
    parser.add_argument("--keys", nargs="+", help="quantities to plot (metrics.json keys)")
    args = parser.parse_args(argv)
    runs = {}
    try:
        for run in args.runs:
            path, records, skipped = read_metrics(run)
            if skipped:
                print(f"{path}: {skipped} lines that are not JSON skipped", file=sys.stderr)
            if not records:
                raise BadRun(f"{path}: no metrics (a training writes them every 20 iterations)")
            runs[os.path.dirname(path) or "."] = records  # labelled by the run's folder as given
    except BadRun as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = args.keys or default_keys(runs)
    absent = [k for k in keys if not any(series(r, k)[0] for r in runs.values())]
    if absent:
        print(
            f"error: no run has {', '.join(absent)}; keys present: "
            f"{', '.join(sorted({k for r in runs.values() for rec in r for k in rec}))}",
            file=sys.stderr,
        )
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    plot(runs, keys, args.output)
    print(f"{args.output}: {', '.join(keys)} of {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
