#!/usr/bin/env python
"""`shapes` AP of ATSS (2-conv towers) vs ATSS + 2 DyHead blocks, trained for the same iterations.

    python benchmarks/dyhead_shapes_ap.py --iters 600      # the configs' full schedule
    python benchmarks/dyhead_shapes_ap.py --iters 100      # a short run (what the README reports)

Each run is ``train_net.py --config-file configs/shapes/<config>`` with ``SOLVER.MAX_ITER`` = iters
(LR steps at 75% and 92%), ``SEED`` 0, evaluated on ``shapes_val``; results (AP, AP50, training
time) go to ``benchmarks/results/dyhead_shapes_ap.json``.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet")]

import train_net  # noqa: E402

CONFIGS = {"ATSS": "configs/shapes/atss_r18.yaml", "ATSS + DyHead x2": "configs/shapes/atss_dyhead_r18.yaml"}


def run(config: str, iters: int, out: str, extra) -> dict:
    start = time.perf_counter()
    args = train_net.default_argument_parser().parse_args([
        "--config-file", os.path.join(ROOT, config),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)}, {int(iters * 0.92)})",
        "SOLVER.WARMUP_ITERS", str(min(100, iters // 5)), "SEED", "0", "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", out,
        *extra,
    ])
    train_net.main(args)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    final = [m for m in metrics if "bbox/AP" in m][-1]  # the evaluation after the last iteration
    return {"config": config, "iters": iters, "AP": round(final["bbox/AP"], 2),
            "AP50": round(final["bbox/AP50"], 2), "wall_s": round(time.perf_counter() - start)}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "output", "dyhead_shapes_ap"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "dyhead_shapes_ap.json"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for both runs")
    args = parser.parse_args(argv)
    rows = {}
    for name, config in CONFIGS.items():
        output_dir = os.path.join(args.output_dir, os.path.basename(config)[:-5])
        rows[name] = run(config, args.iters, output_dir, args.opts)
        print(name, json.dumps(rows[name]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"cpu_cores": os.cpu_count(), "results": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
