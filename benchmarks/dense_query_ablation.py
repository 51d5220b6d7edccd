#!/usr/bin/env python
"""Ablations of the combined detector (DenseQueryDetector) on `shapes`, one schedule for every variant.

    python benchmarks/dense_query_ablation.py train --iters 700 --eval-period 350 [--variants ...]
    python benchmarks/dense_query_ablation.py report      # dense_query_ablation.md + ap_vs_time.png

Every variant is a ``train_net.py`` process on CPU from scratch (OUTPUT_DIR ``output/ablation/<variant>``)
with the demo's batch, sizes and optimizer, ``--iters`` iterations (warm-up 100, lr x0.1 at 75% and
93%), seed ``--seed``, evaluated
on ``shapes_val`` every ``--eval-period`` iterations. Recorded per variant: AP / AP50 / AP75 of the
final evaluation (the decoder's for query detectors), the dense head's AP from the same checkpoint
(``MODEL.DENSE_QUERY.INFERENCE_SOURCE dense``), the median s/iter, the peak resident memory (``os.wait4``),
and AP against training time (evaluation time excluded) for the curve. Results go to
``benchmarks/results/dense_query_ablation.json``; ``report`` writes the table and the PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime

from deqdet_vs_adamixer import RESULTS, ROOT, _env, _load, _save

DEMO = os.path.join(ROOT, "configs", "shapes", "demo.yaml")
RETINANET = os.path.join(ROOT, "configs", "shapes", "retinanet_demo.yaml")
PAPER_DEQDET = os.path.join(ROOT, "configs", "shapes", "deqdet_r18.yaml")
# The demo decoder's sizes on the paper DEQDet detector (C2-C5 + channel mapper, whole-image queries).
DEMO_DECODER = [
    "MODEL.QUERY.NUM_QUERIES", "20", "MODEL.QUERY.CONTENT_DIM", "64", "MODEL.QUERY.FFN_DIM", "256",
    "MODEL.QUERY.FEAT_CHANNELS", "64", "MODEL.QUERY.NECK_NORM_GROUPS", "16", "MODEL.QUERY.IN_POINTS", "16",
    "MODEL.QUERY.OUT_POINTS", "32", "MODEL.DEQDET.REFINEMENT_STEPS", "2",
    "MODEL.DEQDET.SUPERVISION_POSITIONS", "(2,)", "MODEL.DEQDET.RAG", "1",
    "MODEL.DEQDET.EXTRA_INIT_SUPERVISIONS", "1", "SOLVER.IMS_PER_BATCH", "4",
    "MODEL.DEQDET.TOL", "0.1", "MODEL.DEQDET.MAX_ITERS", "8", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TEST", "288", "INPUT.MAX_SIZE_TEST", "480", "SOLVER.WEIGHT_DECAY", "0.05",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "10.0",
]
VARIANTS = {
    "paper_deqdet": (PAPER_DEQDET, DEMO_DECODER),
    "dense_aux_only": (DEMO, ["MODEL.DENSE_QUERY.QUERY_INIT", "whole_image"]),
    "dense_topk_no_prior": (DEMO, ["MODEL.DENSE_QUERY.CLASS_PRIOR", "False"]),
    "demo": (DEMO, []),
    "dyhead0": (DEMO, ["MODEL.DYHEAD.NUM_CONVS", "0"]),
    "dyhead2": (DEMO, ["MODEL.DYHEAD.NUM_CONVS", "2"]),
    "adamixer_decoder": (DEMO, ["MODEL.QUERY.DECODER", "AdaMixerDecoder", "MODEL.QUERY.NUM_STAGES", "3"]),
    "atss_only": (DEMO, ["MODEL.META_ARCHITECTURE", "ATSS"]),
    "retinanet": (RETINANET, []),
}
DENSE_QUERY = {"dense_aux_only", "dense_topk_no_prior", "demo", "dyhead0", "dyhead2", "adamixer_decoder"}
RESULT_FILE = "dense_query_ablation.json"
_STAMP = re.compile(r"^\[(\d\d/\d\d \d\d:\d\d:\d\d)")


def _stamp(line: str):
    m = _STAMP.match(line)
    return datetime.strptime(m.group(1), "%m/%d %H:%M:%S") if m else None


def _training_time_at_evals(log_path: str) -> list:
    """Seconds of training (evaluations excluded) at the end of each evaluation, from the log's stamps."""
    start, eval_start, spent_in_eval, out, last = None, None, 0.0, [], None
    for line in open(log_path):
        t = _stamp(line) or last
        last = t
        if "Starting training from iteration" in line:
            start = t
        elif "Start inference on" in line:
            eval_start = t
        elif "Evaluation results for bbox" in line and start and eval_start:
            spent_in_eval += (t - eval_start).total_seconds()
            out.append((t - start).total_seconds() - spent_in_eval)
    return out


def _run(cmd: list, log_path: str):
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"train_net failed, see {log_path}")
    return usage


def train(args) -> None:
    for variant in args.variants:
        config, opts = VARIANTS[variant]
        name = variant + args.tag
        out = os.path.join(ROOT, "output", "ablation", name)
        os.makedirs(out, exist_ok=True)
        steps = f"({int(args.iters * 0.75)}, {int(args.iters * 0.93)})"
        cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", config, *opts,
               "SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", "100",
               "TEST.EVAL_PERIOD", str(args.eval_period),
               "MODEL.DEVICE", "cpu", "SEED", str(args.seed), "OUTPUT_DIR", out]
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        usage = _run(cmd, out + ".log")
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
        evals = [m for m in metrics if "bbox/AP" in m]
        times = [m["time"] for m in metrics if "time" in m and m["iteration"] >= 20]
        entry = {
            "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]),
            "ap": evals[-1]["bbox/AP"], "ap50": evals[-1]["bbox/AP50"], "ap75": evals[-1]["bbox/AP75"],
            "ap_vs_iter": [[min(m["iteration"] + 1, args.iters), m["bbox/AP"]] for m in evals],
            "ap_vs_train_s": list(zip(_training_time_at_evals(out + ".log"), [m["bbox/AP"] for m in evals])),
            "s_per_iter": statistics.median(times),
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "wall_s": time.perf_counter() - start,
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "load_avg_1min_end": os.getloadavg()[0],
        }
        if variant in DENSE_QUERY:
            dense_cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--eval-only",
                         "--config-file", config, *opts,
                         "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "MODEL.DEVICE", "cpu",
                         "MODEL.DENSE_QUERY.INFERENCE_SOURCE", "dense", "OUTPUT_DIR", out + "_dense"]
            _run(dense_cmd, out + "_dense.log")
            text = open(out + "_dense.log").read()
            entry["dense_ap"] = float(re.findall(r"copypaste: ([\d.]+),", text)[-1])
        print(name, json.dumps(entry), flush=True)
        _save(RESULT_FILE, {**(_load(RESULT_FILE) or {}), name: entry})


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = _load(RESULT_FILE) or {}
    lines = ["| variant | AP | AP50 | AP75 | dense head AP | s/iter | peak RSS MiB | command |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        dense = f"{r['dense_ap']:.1f}" if "dense_ap" in r else "-"
        lines.append(f"| {name} | {r['ap']:.1f} | {r['ap50']:.1f} | {r['ap75']:.1f} | {dense} "
                     f"| {r['s_per_iter']:.3f} | {r['peak_rss_mib']:.0f} | `{r['command']}` |")
    with open(os.path.join(RESULTS, "dense_query_ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in args.curves:
        if name in results and results[name]["ap_vs_train_s"]:
            t, ap = zip(*results[name]["ap_vs_train_s"])
            ax.plot([x / 60 for x in t], ap, marker="o", label=name)
    ax.set_xlabel("training time (min, evaluation excluded)")
    ax.set_ylabel("shapes_val AP")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "ap_vs_time.png"), dpi=120)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--iters", type=int, default=700)
    p.add_argument("--eval-period", type=int, default=350)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the variant's name in the results (e.g. @1000)")
    p.set_defaults(func=train)
    p = sub.add_parser("report")
    p.add_argument("--curves", nargs="+", default=["demo", "retinanet"],
                   help="result names drawn in ap_vs_time.png")
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
