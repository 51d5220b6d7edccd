#!/usr/bin/env python
"""Rank training recipes on `shapes` with fixed seeds: N seeds per variant, one schedule for all.

    python benchmarks/recipe_protocol.py train --variants retinanet atss --seeds 1 2 --iters 1000
    python benchmarks/recipe_protocol.py report            # recipe_protocol.md from the JSON
    python benchmarks/recipe_protocol.py list              # the variants and their overrides

Every run is a ``train_net.py`` process on the CPU from scratch (``OUTPUT_DIR output/protocol/<name><tag>@<iters>/s<seed>``)
with ``OMP_NUM_THREADS=1``, ``--jobs`` processes side by side (2 on 2 cores), batch 4, ``--iters``
iterations (warm-up 100, lr x0.1 at 75 % and 93 %), ``SEED <seed>``, evaluated once on ``shapes_val``
at the end. Recorded per run: AP / AP50 / AP75 (the decoder's for the combined detector, with the dense
head's AP / AP75 from the same checkpoint, ``MODEL.DENSE_QUERY.INFERENCE_SOURCE dense``), the median
s/iter and the 1-minute load average at the end. Per variant the report gives the mean and the
spread (min-max) over seeds; two variants differ only where their seed ranges do not overlap.
Results: ``benchmarks/results/recipe_protocol.json`` (keyed ``<variant>@<iters>``, one entry per seed)
and ``recipe_protocol.md``.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
RESULT_FILE = os.path.join(RESULTS, "recipe_protocol.json")
SHAPES = os.path.join(ROOT, "configs", "shapes")

RETINANET = os.path.join(SHAPES, "retinanet_demo.yaml")
FLAGSHIP = os.path.join(SHAPES, "dyhead_deqdet_r18.yaml")
# Every variant on FLAGSHIP starts from these values (the combined detector's settings before this protocol
# chose its recipe), so that a variant means the same whatever the config file says today.
PINNED = ["MODEL.CHANNELS_LAST", "True", "MODEL.DENSE_QUERY.DENSE_DETECTOR", "ATSS", "MODEL.ATSS.NORM", "BN",
          "MODEL.ATSS.NORM_PER_LEVEL", "False", "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256], [512]]",
          "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]", "MODEL.ANCHOR_GENERATOR.OFFSET", "0.5",
          "MODEL.DYHEAD.NUM_CONVS", "1", "MODEL.DYHEAD.ZERO_INIT_OFFSET", "True", "MODEL.DYHEAD.IDENTITY_INIT", "False",
          "MODEL.DENSE_QUERY.QUERY_CONTENT", "embedding", "MODEL.QUERY.CLS_TARGET", "one_hot",
          "MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD", "1.0", "MODEL.DENSE_QUERY.DENSE_LOSS_WEIGHT", "1.0",
          "MODEL.DENSE_QUERY.PROPOSAL_TOPK_PER_LEVEL", "1000", "SEED", "-1"]
# The flagship's dense head alone: ATSS on the flagship's pyramid, without DyHead blocks.
ATSS = ["MODEL.META_ARCHITECTURE", "ATSS", "MODEL.DYHEAD.NUM_CONVS", "0"]
RETINANET_SIZES = ("[[24, 30.238105, 38.097625], [48, 60.47621, 76.19525], [96, 120.952421, 152.390501], "
                   "[192, 241.904842, 304.781002], [384, 483.809683, 609.562004]]")
# The anchors and head of retinanet_demo.yaml, on the flagship's pyramid.
RETINANET_HEAD = ["MODEL.RETINANET.NUM_CLASSES", "8", "MODEL.RETINANET.NUM_CONVS", "2", "MODEL.RETINANET.NORM", "BN",
                  "MODEL.ANCHOR_GENERATOR.SIZES", RETINANET_SIZES, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
                  "[[0.5, 1.0, 2.0]]", "MODEL.ANCHOR_GENERATOR.OFFSET", "0.0"]
LEVEL_BN = ["MODEL.ATSS.NORM", "BN", "MODEL.ATSS.NORM_PER_LEVEL", "True"]
# ATSS with per-level BN and one DyHead block, by initialisation of the block.
BLOCK = ["MODEL.META_ARCHITECTURE", "ATSS", "MODEL.DYHEAD.NUM_CONVS", "1", *LEVEL_BN]
OFFICIAL_INIT = ["MODEL.DYHEAD.ZERO_INIT_OFFSET", "False", "MODEL.DYHEAD.IDENTITY_INIT", "False"]
ZERO_OFFSET = ["MODEL.DYHEAD.ZERO_INIT_OFFSET", "True", "MODEL.DYHEAD.IDENTITY_INIT", "False"]
IDENTITY = ["MODEL.DYHEAD.ZERO_INIT_OFFSET", "True", "MODEL.DYHEAD.IDENTITY_INIT", "True"]
# The combined detector's decoder options.
DDQ_CONTENT = ["MODEL.DENSE_QUERY.QUERY_CONTENT", "dense_feature"]
IOU_TARGET = ["MODEL.QUERY.CLS_TARGET", "iou"]

VARIANTS_RETINANET_COMBINED = ["MODEL.DENSE_QUERY.DENSE_DETECTOR", "RetinaNet", *RETINANET_HEAD, *IDENTITY, *DDQ_CONTENT,
                               *IOU_TARGET]

# ATSS + 2 DyHead blocks in place of the towers (atss_dyhead_r18.yaml, pinned to the published block
# initialisation), by initialisation, pyramid norm and offset input: why it does not learn from scratch.
ATSS_DYHEAD = os.path.join(SHAPES, "atss_dyhead_r18.yaml")
# the blocks' offset convs at 0.1x the learning rate (as Deformable DETR's sampling offsets)
OFFSET_LR_01 = ["SOLVER.PARAM_GROUP_RULES", '[["dyhead_tower[.][0-9]+[.]offset[.]", 0.1, 1.0]]']

# name -> (config, overrides). One difference at a time from the reference where the name says so.
VARIANTS = {
    "retinanet": (RETINANET, []),
    "atss_dyhead": (ATSS_DYHEAD, []),
    "atss_dyhead_identity": (ATSS_DYHEAD, IDENTITY),
    "atss_dyhead_fpn_gn": (ATSS_DYHEAD, ["MODEL.FPN.NORM", "GN"]),
    "atss_dyhead_offset_lr_0.1": (ATSS_DYHEAD, OFFSET_LR_01),
    "atss_dyhead_normalized_offset_input": (ATSS_DYHEAD, ["MODEL.DYHEAD.NORMALIZED_OFFSET_INPUT", "True"]),
    "atss_dyhead_identity_normalized_offset_input": (ATSS_DYHEAD, [*IDENTITY, "MODEL.DYHEAD.NORMALIZED_OFFSET_INPUT",
                                                                   "True"]),
    "atss_shared_bn": (FLAGSHIP, [*ATSS, "MODEL.ATSS.NORM", "BN", "MODEL.ATSS.NORM_PER_LEVEL", "False"]),
    "atss_level_bn": (FLAGSHIP, [*ATSS, "MODEL.ATSS.NORM", "BN", "MODEL.ATSS.NORM_PER_LEVEL", "True"]),
    "atss_gn": (FLAGSHIP, [*ATSS, "MODEL.ATSS.NORM", "GN", "MODEL.ATSS.NORM_PER_LEVEL", "False"]),
    "atss_no_norm": (FLAGSHIP, [*ATSS, "MODEL.ATSS.NORM", "", "MODEL.ATSS.NORM_PER_LEVEL", "False"]),
    "atss_topk18": (FLAGSHIP, [*ATSS, *LEVEL_BN, "MODEL.ATSS.TOPK", "18"]),
    "atss_9_anchors": (FLAGSHIP, [*ATSS, *LEVEL_BN, "MODEL.ANCHOR_GENERATOR.SIZES", RETINANET_SIZES,
                                  "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[0.5, 1.0, 2.0]]"]),
    "atss_ema_normalizer": (FLAGSHIP, [*ATSS, *LEVEL_BN, "MODEL.ATSS.LOSS_NORMALIZER_MOMENTUM", "0.9"]),
    "atss_block_official_init": (FLAGSHIP, [*BLOCK, *OFFICIAL_INIT]),
    "atss_block_zero_offset": (FLAGSHIP, [*BLOCK, *ZERO_OFFSET]),
    "atss_block_identity": (FLAGSHIP, [*BLOCK, *IDENTITY]),
    "combined_shared_bn": (FLAGSHIP, ["MODEL.ATSS.NORM_PER_LEVEL", "False", *ZERO_OFFSET, "MODEL.DENSE_QUERY.QUERY_CONTENT",
                                      "embedding", "MODEL.QUERY.CLS_TARGET", "one_hot"]),
    "combined_all": (FLAGSHIP, [*LEVEL_BN, *IDENTITY, *DDQ_CONTENT, *IOU_TARGET]),
    "retinanet_block_identity": (FLAGSHIP, ["MODEL.META_ARCHITECTURE", "RetinaNet", *RETINANET_HEAD, *IDENTITY]),
    "combined_retinanet": (FLAGSHIP, VARIANTS_RETINANET_COMBINED),
    "combined_retinanet_feature_grad_0": (FLAGSHIP, [*VARIANTS_RETINANET_COMBINED, "MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD", "0.0"]),
    "combined_retinanet_feature_grad_0.1": (FLAGSHIP, [*VARIANTS_RETINANET_COMBINED, "MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD", "0.1"]),
    "flagship": (FLAGSHIP, []),
}
COMBINED = {name for name, (config, opts) in VARIANTS.items()
            if config == FLAGSHIP and "MODEL.META_ARCHITECTURE" not in opts}
_COPYPASTE = re.compile(r"copypaste: AP,AP50,AP75,.*\n.*copypaste: ([\d.nan]+),([\d.nan]+),([\d.nan]+),")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.path.join(ROOT, "projects", "DEQDet") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _schedule(iters: int) -> list:
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)}, {int(iters * 0.93)})",
            "SOLVER.WARMUP_ITERS", "100", "SOLVER.IMS_PER_BATCH", "4", "TEST.EVAL_PERIOD", "0",
            "MODEL.DEVICE", "cpu", "SOLVER.CHECKPOINT_PERIOD", "100000"]


def _last_ap(log_path: str) -> tuple:
    """(AP, AP50, AP75) of the last bbox evaluation in a train_net log."""
    found = _COPYPASTE.findall(open(log_path).read())
    if not found:
        raise SystemExit(f"no evaluation result in {log_path}")
    return tuple(float(x) for x in found[-1])


class Run:
    """One (variant, seed) training process, then (for the combined detector) its dense-head evaluation."""

    def __init__(self, variant: str, seed: int, iters: int, extra: list, tag: str = ""):
        self.variant, self.seed, self.iters = variant, seed, iters
        config, opts = VARIANTS[variant]
        if config == FLAGSHIP:
            opts = [*PINNED, *opts]
        elif config == ATSS_DYHEAD:  # the config's initialisation when these variants were recorded
            opts = [*OFFICIAL_INIT, *opts]
        self.out = os.path.join(ROOT, "output", "protocol", f"{variant}{tag}@{iters}", f"s{seed}")
        os.makedirs(self.out, exist_ok=True)
        self.config, self.opts = config, [*opts, *extra]
        self.train_cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", config, *self.opts,
                          *_schedule(iters), "SEED", str(seed), "OUTPUT_DIR", self.out]
        self.proc, self.phase, self.start = None, None, None

    def launch(self) -> None:
        self.start = time.perf_counter()
        self._spawn(self.train_cmd, "train")

    def _spawn(self, cmd: list, phase: str) -> None:
        self.phase = phase
        log = open(os.path.join(self.out, f"{phase}.log"), "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())

    def poll(self):
        """None while running; the result dict when done. Raises SystemExit when a process failed."""
        if self.proc.poll() is None:
            return None
        if self.proc.returncode != 0:
            raise SystemExit(f"{self.variant} seed {self.seed}: {self.phase} failed, see {self.out}/{self.phase}.log")
        if self.phase == "train" and self.variant in COMBINED:
            self._spawn([sys.executable, os.path.join(ROOT, "train_net.py"), "--eval-only", "--config-file", self.config,
                         *self.opts, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", os.path.join(self.out, "model_final.pth"),
                         "MODEL.DENSE_QUERY.INFERENCE_SOURCE", "dense", "OUTPUT_DIR", os.path.join(self.out, "dense")],
                        "dense")
            return None
        return self._result()

    def _result(self) -> dict:
        ap, ap50, ap75 = _last_ap(os.path.join(self.out, "train.log"))
        metrics = [json.loads(line) for line in open(os.path.join(self.out, "metrics.json"))]
        times = [m["time"] for m in metrics if "time" in m and m["iteration"] >= 20]
        result = {"seed": self.seed, "ap": ap, "ap50": ap50, "ap75": ap75, "s_per_iter": statistics.median(times),
                  "wall_s": round(time.perf_counter() - self.start, 1), "load_avg_end": os.getloadavg()[0],
                  "command": "OMP_NUM_THREADS=1 python " + " ".join(
                      os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in self.train_cmd[1:])}
        if self.variant in COMBINED:
            result["dense_ap"], _, result["dense_ap75"] = _last_ap(os.path.join(self.out, "dense.log"))
        return result


def _load() -> dict:
    return json.load(open(RESULT_FILE)) if os.path.isfile(RESULT_FILE) else {}


def _record(key: str, result: dict) -> None:
    data = _load()
    entries = [r for r in data.get(key, []) if r["seed"] != result["seed"]] + [result]
    data[key] = sorted(entries, key=lambda r: r["seed"])
    os.makedirs(RESULTS, exist_ok=True)
    with open(RESULT_FILE, "w") as f:
        json.dump(data, f, indent=1)


def train(args) -> None:
    pending = [(v, s) for v in args.variants for s in args.seeds]
    running = []
    while pending or running:
        while pending and len(running) < args.jobs:
            variant, seed = pending.pop(0)
            run = Run(variant, seed, args.iters, args.opts, args.tag)
            run.launch()
            print(f"started {variant} seed {seed}: {' '.join(run.train_cmd[2:])}", flush=True)
            running.append(run)
        time.sleep(5)
        for run in list(running):
            result = run.poll()
            if result is not None:
                running.remove(run)
                key = f"{run.variant}{args.tag}@{run.iters}"
                _record(key, result)
                print(key, json.dumps({k: v for k, v in result.items() if k != "command"}), flush=True)
    report(args)


def _summary(values: list) -> str:
    mean = statistics.mean(values)
    return f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{mean:.1f}"


def report(args) -> None:
    data = _load()
    lines = ["| variant | seeds | AP mean (min-max) | AP50 | AP75 | dense head AP | dense head AP75 | s/iter | command (seed 1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, runs in data.items():
        dense = [r["dense_ap"] for r in runs if "dense_ap" in r]
        dense75 = [r["dense_ap75"] for r in runs if "dense_ap75" in r]
        lines.append(
            f"| {key} | {len(runs)} | {_summary([r['ap'] for r in runs])} | {_summary([r['ap50'] for r in runs])} "
            f"| {_summary([r['ap75'] for r in runs])} | {_summary(dense) if dense else '-'} "
            f"| {_summary(dense75) if dense75 else '-'} | {statistics.mean(r['s_per_iter'] for r in runs):.3f} "
            f"| `{runs[0]['command']}` |")
    with open(os.path.join(RESULTS, "recipe_protocol.md"), "w") as f:
        f.write("# Recipe protocol: mean and spread over seeds\n\n"
                "Written by `python benchmarks/recipe_protocol.py report` from `recipe_protocol.json`; protocol in "
                "`benchmarks/recipe_protocol.py`. s/iter: 1 thread per run, two runs side by side on 2 cores.\n\n"
                + "\n".join(lines) + "\n")
    print("\n".join(lines))


def list_variants(args) -> None:
    for name, (config, opts) in VARIANTS.items():
        print(f"{name}: {os.path.relpath(config, ROOT)} {' '.join(opts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--variants", nargs="+", required=True, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (1 thread each)")
    p.add_argument("--tag", default="", help="suffix of the variant's key in the results")
    p.add_argument("--opts", nargs="*", default=[], help="extra overrides for every run (KEY VALUE ...)")
    p.set_defaults(func=train)
    sub.add_parser("report").set_defaults(func=report)
    sub.add_parser("list").set_defaults(func=list_variants)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
