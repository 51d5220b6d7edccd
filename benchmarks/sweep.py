#!/usr/bin/env python
"""Train the variants of a variants file, each with several seeds, and tabulate their AP.

    python benchmarks/sweep.py benchmarks/variants/convergence.yaml --dry-run     # the commands
    python benchmarks/sweep.py benchmarks/variants/convergence.yaml --jobs 2 --threads 1
    python benchmarks/sweep.py benchmarks/variants/convergence.yaml --only flagship deqdet --seeds 3
    python benchmarks/sweep.py benchmarks/variants/convergence.yaml --report      # tables from the JSON

A variants file (YAML) names one question and the runs that answer it:

    title: The flagship against its parts        # optional: the heading of the Markdown
    question: Which detector learns fastest?      # optional: printed under it
    base: configs/shapes/retinanet_dyhead_deqdet_r18.yaml   # the config of variants that name none
    seeds: [1, 2]
    common: [SOLVER.MAX_ITER, 4000, TEST.EVAL_PERIOD, 1000]  # optional: overrides of every run
    output: output/sweep/convergence              # optional: the runs' folders (default output/sweep/<file>)
    results: benchmarks/results/convergence       # optional: <results>.json / .md / .png (default: in output)
    groups:                                       # optional: lists for YAML anchors, read by nothing else
      lr_quarter: &lr_quarter [SOLVER.PARAM_GROUP_RULES, '[["^decoder[.]", 0.25, 1.0]]']
    variants:
      - name: flagship                            # the base config as it is
      - name: flagship_decoder_lr0.25
        overrides: [*lr_quarter]                  # a list inside the list is spliced in
        note: the decoder at a quarter of the lr  # optional: a line in the Markdown
      - name: deqdet
        config: configs/shapes/deqdet_r18.yaml
        overrides: [SOLVER.BASE_LR, 2.5e-4]
        seeds: [1, 2, 3]                          # optional: this variant's own seeds

Each run is ``train_net.py --config-file <config> <common> <overrides> SEED <s> OUTPUT_DIR
<output>/<name>/s<s>`` in its own process (``--jobs`` side by side, ``--threads`` torch threads each);
write values that are lists or tuples as quoted strings. A run of the combined detector
(``DenseQueryDetector``) also gets ``MODEL.DENSE_QUERY.INFERENCE_SOURCE both`` unless its config or
overrides set it, so that every evaluation reports its decoder's AP (``bbox``) and its dense head's
(``dense_bbox``) from the same checkpoint. A run's results come from its ``metrics.json``: the AP of
each evaluation (Detectron2 evaluates every ``TEST.EVAL_PERIOD`` iterations and after the last one)
and the median seconds per training iteration. A run whose ``model_final.pth`` and evaluation exist
is collected, not trained again; one with a ``last_checkpoint`` but no final model resumes
(``--resume``).

The results JSON keeps every run's command and figures and is updated as runs end (runs of other
variants or seeds stay); the Markdown gives per variant the mean AP over its seeds and each seed's, the
mean AP at each evaluation, and the commands; the PNG draws the mean AP against the iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "train_net.py")
BOTH = ["MODEL.DENSE_QUERY.INFERENCE_SOURCE", "both"]
FILE_KEYS = {"title", "question", "base", "seeds", "common", "output", "results", "groups", "variants"}
VARIANT_KEYS = {"name", "config", "overrides", "seeds", "note"}
# (key in a run's record, metrics.json key) of the figures read from each evaluation
FIGURES = (("ap", "bbox/AP"), ("ap50", "bbox/AP50"), ("ap75", "bbox/AP75"), ("dense_ap", "dense_bbox/AP"),
           ("dense_ap50", "dense_bbox/AP50"), ("dense_ap75", "dense_bbox/AP75"))
POLL_S = 5.0


class VariantsFileError(ValueError):
    """A variants file that cannot be used; the message names the file and the entry."""


@dataclass
class Variant:
    """One named setting: a config file and its overrides, trained with each of ``seeds``."""

    name: str
    config: str
    overrides: List[str]
    seeds: List[int]
    note: str = ""


@dataclass
class Sweep:
    """A variants file, read: its variants, the overrides of every run, where runs and results go."""

    path: str
    variants: List[Variant]
    common: List[str] = field(default_factory=list)
    output: str = ""
    results: str = ""
    title: str = ""
    question: str = ""


@dataclass
class Run:
    """One (variant, seed) training: its output folder and its ``train_net.py`` arguments."""

    variant: Variant
    seed: int
    out: str
    args: List[str]


def _repo_path(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def _relative(text: str) -> str:
    """``text`` relative to the repository root where it is a path inside it."""
    return os.path.relpath(text, ROOT) if os.path.isabs(text) and text.startswith(ROOT + os.sep) else text


def _overrides(items, where: str) -> List[str]:
    """A list of ``KEY VALUE ...`` (lists inside it spliced in) as the strings train_net.py reads."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise VariantsFileError(f"{where}: expected a list KEY VALUE ..., got {items!r}")
    flat = [x for item in items for x in (item if isinstance(item, list) else [item])]
    if len(flat) % 2:
        raise VariantsFileError(f"{where}: an odd number of items, expected KEY VALUE pairs: {flat}")
    return [str(x) for x in flat]


def _seeds(value, where: str) -> List[int]:
    if not (isinstance(value, list) and value and all(isinstance(s, int) for s in value)):
        raise VariantsFileError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    return value


def load_sweep(path: str) -> Sweep:
    """Read and check a variants file (format: this module's docstring)."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    unknown = set(spec) - FILE_KEYS
    if unknown:
        raise VariantsFileError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(FILE_KEYS)})")
    if not spec.get("variants"):
        raise VariantsFileError(f"{path}: no variants")
    stem = os.path.splitext(os.path.basename(path))[0]
    output = _repo_path(spec.get("output") or os.path.join("output", "sweep", stem))
    sweep = Sweep(path=path, variants=[], common=_overrides(spec.get("common"), f"{path}: common"),
                  output=output, results=_repo_path(spec.get("results") or os.path.join(output, stem)),
                  title=spec.get("title", stem), question=str(spec.get("question", "")).strip())
    for i, entry in enumerate(spec["variants"]):
        where = f"{path}: variant {entry.get('name', i) if isinstance(entry, dict) else i}"
        if not isinstance(entry, dict) or not entry.get("name"):
            raise VariantsFileError(f"{where}: expected a mapping with a name")
        if set(entry) - VARIANT_KEYS:
            raise VariantsFileError(f"{where}: unknown keys {sorted(set(entry) - VARIANT_KEYS)}")
        config = entry.get("config") or spec.get("base")
        if not config:
            raise VariantsFileError(f"{where}: no config and no base config")
        name = str(entry["name"])
        if "/" in name or name in {v.name for v in sweep.variants}:
            raise VariantsFileError(f"{where}: names must be unique and hold no '/'")
        sweep.variants.append(Variant(
            name=name, config=_repo_path(config), overrides=_overrides(entry.get("overrides"), where),
            seeds=_seeds(entry.get("seeds", spec.get("seeds")), where),
            note=str(entry.get("note", "")).strip()))
    return sweep


def evaluates_one_head(config: str, opts: Sequence[str]) -> bool:
    """Whether ``config`` with ``opts`` builds the combined detector (a decoder and a dense head) without
    evaluating both heads.

    Raises:
        deqdet.errors.UserInputError: the config or an override is invalid.
    """
    from deqdet.engine import build_config

    cfg = build_config(config, list(opts))
    return (cfg.MODEL.META_ARCHITECTURE == "DenseQueryDetector"
            and cfg.MODEL.DENSE_QUERY.INFERENCE_SOURCE != BOTH[1])


def plan(sweep: Sweep, only: Optional[Sequence[str]] = None,
         seeds: Optional[Sequence[int]] = None) -> List[Run]:
    """The runs of ``sweep``: variants (``only`` those, in the file's order) x their seeds (or ``seeds``)."""
    names = [v.name for v in sweep.variants]
    missing = sorted(set(only or ()) - set(names))
    if missing:
        raise VariantsFileError(f"{sweep.path}: no variants {missing} (it has {names})")
    runs = []
    for variant in sweep.variants:
        if only and variant.name not in only:
            continue
        opts = [*sweep.common, *variant.overrides]
        if BOTH[0] not in opts[::2] and evaluates_one_head(variant.config, opts):
            opts += BOTH
        for seed in seeds or variant.seeds:
            out = os.path.join(sweep.output, variant.name, f"s{seed}")
            runs.append(Run(variant, seed, out, ["--config-file", variant.config, *opts, "SEED", str(seed),
                                                 "OUTPUT_DIR", out]))
    return runs


def _quote(word: str) -> str:
    """``word`` for a POSIX shell, in double quotes where that reads better than shlex's single quotes."""
    quoted = shlex.quote(word)
    if quoted != word and "'" in word and not set(word) & set('"$`\\!'):
        return f'"{word}"'
    return quoted


def command(run: Run, threads: Optional[int]) -> str:
    """The shell command of ``run``, from the repository root."""
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    return env + " ".join(_quote(w) for w in ["python", "train_net.py", *map(_relative, run.args)])


# ------------------------------------------------------------------------------------------ results
def read_metrics(out: str) -> List[dict]:
    """The records of ``<out>/metrics.json`` (none if absent; a line cut off by a killed run is skipped)."""
    path = os.path.join(out, "metrics.json")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if isinstance(r, dict) and "iteration" in r]


def summarise_metrics(records: Sequence[dict], max_iter: int) -> Optional[dict]:
    """A run's figures from its metrics.json records: those of its last evaluation, the AP of every
    evaluation (``curve``, by the number of iterations trained before it: Detectron2 logs the one after
    iteration k as k - 1, the last one as ``max_iter`` - 1 or ``max_iter``) and the median s/iter (after
    the first 20 iterations); None before its first evaluation."""
    # an evaluation logged twice: the last record
    evaluations = {min(r["iteration"] + 1, max_iter): r for r in records if "bbox/AP" in r}
    if not evaluations:
        return None
    curve = [{"iteration": it, **{k: round(r[m], 2) for k, m in FIGURES if m in r}}
             for it, r in sorted(evaluations.items())]
    times = [r["time"] for r in records if "time" in r and r["iteration"] >= 20]
    return {**curve[-1], "s_per_iter": round(statistics.median(times), 4) if times else None, "curve": curve}


def finished(out: str) -> Optional[dict]:
    """The figures of a run that has its final model and an evaluation, else None."""
    if not os.path.isfile(os.path.join(out, "model_final.pth")):
        return None
    with open(os.path.join(out, "config.yaml")) as f:
        max_iter = yaml.safe_load(f)["SOLVER"]["MAX_ITER"]
    return summarise_metrics(read_metrics(out), max_iter)


def load_results(path: str) -> dict:
    if not os.path.isfile(path):
        return {"variants": {}}
    with open(path) as f:
        return json.load(f)


def record(results: dict, sweep: Sweep, run: Run, figures: dict, threads: Optional[int]) -> None:
    """Put a finished run's figures and command into ``results`` (the results JSON's content)."""
    variant = run.variant
    entry = results["variants"].setdefault(variant.name, {"runs": {}})
    entry.update(config=_relative(variant.config), overrides=variant.overrides, note=variant.note)
    entry["runs"][str(run.seed)] = {"command": command(run, threads), **figures}
    results.update(variants_file=_relative(os.path.abspath(sweep.path)), title=sweep.title,
                   question=sweep.question)


def summary_rows(results: dict) -> List[dict]:
    """Per variant: its seeds, the mean of each figure over them and each seed's AP and dense-head AP."""
    rows = []
    for name, entry in results["variants"].items():
        runs = [entry["runs"][s] for s in sorted(entry["runs"], key=int)]
        row = {"variant": name, "note": entry.get("note", ""), "seeds": sorted(map(int, entry["runs"]))}
        for key, _ in FIGURES:
            values = [r[key] for r in runs if key in r]
            if len(values) == len(runs):
                row[key] = statistics.mean(values)
                row[f"{key}_per_seed"] = values
        times = [r["s_per_iter"] for r in runs if r.get("s_per_iter")]
        row["s_per_iter"] = statistics.mean(times) if times else None
        row["iterations"] = sorted({r["iteration"] for r in runs})
        rows.append(row)
    return rows


def mean_curves(results: dict) -> Dict[str, Dict[int, dict]]:
    """Per variant: {iteration: mean AP (and dense-head AP) over the seeds evaluated there}."""
    curves = {}
    for name, entry in results["variants"].items():
        points: Dict[int, Dict[str, list]] = {}
        for run in entry["runs"].values():
            for p in run["curve"]:
                for key in ("ap", "dense_ap"):
                    if key in p:
                        points.setdefault(p["iteration"], {}).setdefault(key, []).append(p[key])
        curves[name] = {it: {k: statistics.mean(v) for k, v in p.items()} for it, p in sorted(points.items())}
    return curves


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    per_seed = row[f"{key}_per_seed"]
    seeds = f" ({' / '.join(f'{v:.1f}' for v in per_seed)})" if len(per_seed) > 1 else ""
    return f"{row[key]:.1f}{seeds}"


def markdown(results: dict, json_name: str) -> str:
    """The results as Markdown: the summary table, AP at each evaluation, the commands."""
    rows = summary_rows(results)
    lines = [f"# {results.get('title', 'Sweep')}", ""]
    if results.get("question"):
        lines += [results["question"].strip(), ""]
    lines += [
        f"Written by `python benchmarks/sweep.py {results.get('variants_file', '<variants file>')}` from "
        f"`{json_name}` (every run's command and figures). AP: the COCO box AP of each run's last evaluation "
        "(`bbox`); dense head: the combined detector's dense head evaluated on the same checkpoint "
        "(`dense_bbox`). Mean over the seeds, each seed's in brackets; s/iter: median training seconds per "
        "iteration (`metrics.json`), mean over the seeds.", "",
        "| variant | seeds | iterations | AP | AP50 | AP75 | dense head AP | s/iter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s_per_iter = f"{row['s_per_iter']:.3f}" if row["s_per_iter"] else "-"
        lines.append(
            f"| {row['variant']} | {', '.join(map(str, row['seeds']))} | "
            f"{', '.join(map(str, row['iterations']))} | {_cell(row, 'ap')} | "
            f"{row.get('ap50', float('nan')):.1f} | {row.get('ap75', float('nan')):.1f} | "
            f"{_cell(row, 'dense_ap')} | {s_per_iter} |")
    notes = [f"- `{row['variant']}`: {row['note']}" for row in rows if row["note"]]
    if notes:
        lines += ["", *notes]
    curves = mean_curves(results)
    iterations = sorted({it for curve in curves.values() for it in curve})
    if len(iterations) > 1:
        lines += ["", "AP at each evaluation, mean over the seeds:", "",
                  "| variant | " + " | ".join(f"@{it}" for it in iterations) + " |",
                  "|---|" + "---|" * len(iterations)]
        for name, curve in curves.items():
            for key, label in (("ap", name), ("dense_ap", f"{name}, dense head")):
                if any(key in p for p in curve.values()):
                    cells = [f"{curve[it][key]:.1f}" if key in curve.get(it, {}) else "" for it in iterations]
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (first seed; the others differ in `SEED` and `OUTPUT_DIR`):", ""]
    for name, entry in results["variants"].items():
        first = entry["runs"][min(entry["runs"], key=int)]
        lines.append(f"- {name}: `{first['command']}`")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> bool:
    """Mean AP against the iteration per variant (dashed: its dense head) into ``path``; False if no
    variant was evaluated more than once."""
    curves = {name: curve for name, curve in mean_curves(results).items() if len(curve) > 1}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        iterations = list(curve)
        (line,) = ax.plot(iterations, [p.get("ap") for p in curve.values()], marker="o", label=name)
        if any("dense_ap" in p for p in curve.values()):
            ax.plot(iterations, [p.get("dense_ap") for p in curve.values()], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{name}, dense head")
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP (mean over seeds)")
    ax.set_title(results.get("title", "").replace("`", ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_results(results: dict, stem: str) -> List[str]:
    """``<stem>.json``, ``<stem>.md`` and (with curves) ``<stem>.png``; returns the paths written."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown(results, os.path.basename(stem) + ".json"))
    written = [stem + ".json", stem + ".md"]
    if plot(results, stem + ".png"):
        written.append(stem + ".png")
    return written


# -------------------------------------------------------------------------------------------- runs
def launch(run: Run, threads: Optional[int]) -> subprocess.Popen:
    """Start ``run``'s training (resuming it where a checkpoint exists), its output into ``<out>/log.txt``."""
    os.makedirs(run.out, exist_ok=True)
    resume = ["--resume"] if os.path.isfile(os.path.join(run.out, "last_checkpoint")) else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (os.path.join(ROOT, "projects", "DEQDet"), ROOT, os.environ.get("PYTHONPATH")) if p)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = open(os.path.join(run.out, "log.txt"), "a" if resume else "w")
    return subprocess.Popen([sys.executable, TRAIN_NET, *resume, *run.args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def execute(sweep: Sweep, runs: List[Run], jobs: int, threads: Optional[int]) -> List[Run]:
    """Train ``runs``, ``jobs`` at a time, recording each as it ends; returns the runs that failed."""
    results, failed = load_results(sweep.results + ".json"), []

    def done(run: Run, figures: Optional[dict]) -> None:
        if figures is None:
            print(f"{run.variant.name} seed {run.seed}: no evaluation in {run.out}/metrics.json", flush=True)
            failed.append(run)
            return
        record(results, sweep, run, figures, threads)
        write_results(results, sweep.results)
        print(f"{run.variant.name} seed {run.seed}: AP {figures['ap']:.1f}"
              + (f", dense head {figures['dense_ap']:.1f}" if "dense_ap" in figures else ""), flush=True)

    pending, running = list(runs), []
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            figures = finished(run.out)
            if figures is not None:
                done(run, figures)
                continue
            print(f"started: {command(run, threads)}", flush=True)
            running.append((run, launch(run, threads)))
        if running:
            time.sleep(POLL_S)
        for run, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((run, proc))
            if proc.returncode:
                print(f"{run.variant.name} seed {run.seed}: train_net.py failed, see {run.out}/log.txt",
                      flush=True)
                failed.append(run)
            else:
                done(run, finished(run.out))
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants_file")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these variants only")
    parser.add_argument("--seeds", nargs="+", type=int, help="these seeds for every variant")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--results", default=None, help="stem of the result files (default: the file's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    group.add_argument("--report", action="store_true", help="rewrite the Markdown and PNG from the JSON")
    args = parser.parse_args(argv)
    from deqdet.errors import UserInputError, one_line

    try:
        sweep = load_sweep(args.variants_file)
        runs = [] if args.report else plan(sweep, args.only, args.seeds)
    except (OSError, VariantsFileError, UserInputError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    if args.results:
        sweep.results = os.path.abspath(args.results)
    if args.report:
        if not os.path.isfile(sweep.results + ".json"):
            raise SystemExit(f"error: {_relative(sweep.results)}.json: no results yet")
        print("\n".join(write_results(load_results(sweep.results + ".json"), sweep.results)))
        return 0
    if args.dry_run:
        print("\n".join(command(run, args.threads) for run in runs))
        return 0
    failed = execute(sweep, runs, args.jobs, args.threads)
    print(f"results: {_relative(sweep.results)}.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
