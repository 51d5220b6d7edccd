#!/usr/bin/env python
"""Training curves from Detectron2's ``metrics.json`` of one or several runs, as mmdetection's
``analyze_logs``: one panel per quantity (losses, learning rate, AP, DEQ refinement steps), one
line per run.

    .venv/bin/python tools/plot_curves.py output/deqdet_r18 output/adamixer_r18 --output curves.png
    .venv/bin/python tools/plot_curves.py output/demo/metrics.json --keys total_loss bbox/AP

A run is its ``OUTPUT_DIR`` or its ``metrics.json``. Without ``--keys``: ``total_loss``, every other
``loss_*``, ``lr``, ``bbox/AP`` and ``deq/mean_steps``, those that some run has. A line that is not
JSON (the last one of a killed run) is skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_KEYS = ("total_loss", "lr", "bbox/AP", "deq/mean_steps")


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


def default_keys(runs: Dict[str, List[dict]]) -> List[str]:
    """:data:`DEFAULT_KEYS` with every ``loss_*`` after ``total_loss``, those that some run has."""
    present = {k for records in runs.values() for r in records for k in r}
    losses = sorted(k for k in present if k.startswith("loss_"))
    return [k for k in (DEFAULT_KEYS[0], *losses, *DEFAULT_KEYS[1:]) if k in present]


def plot(runs: Dict[str, List[dict]], keys: Sequence[str], output: str) -> None:
    """One panel per key, one line per run; written to ``output`` (PNG)."""
    columns = min(3, len(keys))
    rows = (len(keys) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, records in runs.items():
            x, y = series(records, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 5 else None, label=name)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        positive = all(v > 0 for records in runs.values() for v in series(records, key)[1])
        if positive and (key == "lr" or "loss" in key):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
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
