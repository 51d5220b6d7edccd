#!/usr/bin/env python
"""DEQDet vs AdaMixer side by side on `shapes` (same backbone, queries, dims, batch, iterations),
DEQDet ablations, activation memory, and DEQDet's adaptive inference.

    python benchmarks/deqdet_vs_adamixer.py train --iters 150 --eval-period 75    # AP vs iteration, s/iter
    python benchmarks/deqdet_vs_adamixer.py train --mini --iters 300 --eval-period 50 \
        --variants adamixer deqdet
    python benchmarks/deqdet_vs_adamixer.py train --backbone output/shapes_backbone.pth --lr 2.5e-4 \
        --iters 450 --eval-period 150
    python benchmarks/deqdet_vs_adamixer.py memory                               # training memory
    python benchmarks/deqdet_vs_adamixer.py inference --tols 0 0.001 0.003 0.01  # AP / latency / steps
    python benchmarks/deqdet_vs_adamixer.py report                               # the tables

Each phase writes JSON under ``benchmarks/results/``; ``report`` turns them into the tables at the end
of ``benchmarks/results/query_detectors.md``, below its written summary, which it keeps.
Training runs are separate ``train_net.py`` processes (OUTPUT_DIR ``output/bench/<variant>``); their
peak resident memory is read with ``os.wait4``. Activation memory is measured in-process, device
independently, as the peak number of bytes of tensors saved for backward (autograd's
``saved_tensors_hooks``; parameters excluded, shared storages counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
REPORT = os.path.join(RESULTS, "query_detectors.md")
# The line in REPORT after which ``report`` rewrites the tables.
TABLES = "<!-- The tables below are written by `python benchmarks/deqdet_vs_adamixer.py report`. -->"
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "projects", "DEQDet"))

ADAMIXER = os.path.join(ROOT, "configs", "shapes", "adamixer_r18.yaml")
DEQDET = os.path.join(ROOT, "configs", "shapes", "deqdet_r18.yaml")
VARIANTS = {
    "adamixer": (ADAMIXER, []),
    "deqdet": (DEQDET, []),
    "deqdet_no_rap": (
        DEQDET, ["MODEL.DEQDET.PERTURB_CONTENT_PROB", "0.0", "MODEL.DEQDET.PERTURB_POSITION_PROB", "0.0"]
    ),
    "deqdet_rag0": (DEQDET, ["MODEL.DEQDET.RAG", "0"]),
    "deqdet_no_init_sup": (DEQDET, ["MODEL.DEQDET.INIT_SUPERVISION", "False"]),
}


def _save(name: str, data) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def _load(name: str):
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.isfile(path) else None


# --------------------------------------------------------------------------------------------- train
# --mini: fit speed on the 32 shapes_mini_train images (trained and evaluated on them) with a narrow
# decoder and backbone, the same for every variant: a convergence probe whose AP moves within minutes.
MINI = [
    "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_train',)",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.QUERY.NUM_QUERIES", "20", "MODEL.QUERY.CONTENT_DIM", "64", "MODEL.QUERY.FFN_DIM", "128",
    "MODEL.QUERY.FEAT_CHANNELS", "32", "MODEL.QUERY.NECK_NORM_GROUPS", "8", "MODEL.QUERY.IN_POINTS", "8",
    "MODEL.QUERY.OUT_POINTS", "16", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "4", "TEST.DETECTIONS_PER_IMAGE", "20",
]


def _env() -> dict:
    """This checkout's package first (as the tests' pythonpath in pyproject.toml), also for the train_net
    subprocesses."""
    paths = [os.path.join(ROOT, "projects", "DEQDet"), ROOT, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def train(args) -> None:
    for variant in args.variants:
        config, opts = VARIANTS[variant]
        if args.mini:
            variant, opts = f"{variant}@mini", [*opts, *MINI]
        # a trained ResNet (tools/extract_backbone.py): the CPU analogue of ImageNet weights
        if args.backbone:
            variant, opts = f"{variant}@pretrained", [*opts, "MODEL.WEIGHTS", args.backbone]
        if args.lr:
            opts = [*opts, "SOLVER.BASE_LR", str(args.lr)]
        out = os.path.join(ROOT, "output", "bench", variant)
        os.makedirs(out, exist_ok=True)
        key = f"{variant} (resumed to {args.iters})" if args.resume else variant
        # Constant lr after a short warm-up, so runs of different lengths share their first iterations.
        cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), *(["--resume"] if args.resume else []),
               "--config-file", config, *opts,
               "SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "20",
               "TEST.EVAL_PERIOD", str(args.eval_period), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", out]
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        with open(out + ".log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
            _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"{variant}: train_net failed, see {out}.log")
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
        times = [m["time"] for m in metrics if "time" in m and m["iteration"] >= 20]
        entry = {
            "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]),
            "ap_vs_iter": [
                [min(m["iteration"] + 1, args.iters), m["bbox/AP"]] for m in metrics if "bbox/AP" in m
            ],
            "ap50_final": [m["bbox/AP50"] for m in metrics if "bbox/AP50" in m][-1],
            "s_per_iter": statistics.median(times),
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "wall_s": time.perf_counter() - start,
        }
        print(key, json.dumps(entry), flush=True)
        _save("train.json", {**(_load("train.json") or {}), key: entry})  # re-read: other runs may have saved


# -------------------------------------------------------------------------------------------- memory
def memory(args) -> None:
    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model

    from deqdet.data.mapper import build_train_mapper
    from deqdet.engine import build_config
    from deqdet.memory import SavedTensorMeter

    torch.set_num_threads(args.threads)
    cases = {
        "adamixer": (ADAMIXER, []),
        "deqdet": (DEQDET, []),
        "deqdet_all_in_graph": (DEQDET, ["MODEL.DEQDET.GRAD_STASH", "False"]),
        "deqdet_official_schedule": (DEQDET, ["MODEL.DEQDET.REFINEMENT_STEPS", "20",
                                              "MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 3, 6, 9, 12, 20)"]),
        "deqdet_official_schedule_all_in_graph": (DEQDET, [
            "MODEL.DEQDET.REFINEMENT_STEPS", "20",
            "MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 3, 6, 9, 12, 20)",
            "MODEL.DEQDET.GRAD_STASH", "False"]),
    }
    cfg0 = build_config(DEQDET, ["MODEL.DEQDET.PERTURB_CONTENT_PROB", "0.0", "DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    batches = []
    for batch in build_detection_train_loader(cfg0, mapper=build_train_mapper(cfg0)):
        batches.append(batch)
        if len(batches) == args.batches:
            break
    results = {}
    for name, (config, opts) in cases.items():
        torch.manual_seed(0)
        model = build_model(build_config(config, [*opts, "MODEL.DEVICE", "cpu"]))
        model.train()
        peaks, seconds = [], []
        for batch in batches:
            meter = SavedTensorMeter(skip=model.parameters())
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                losses = model(batch)
                sum(losses.values()).backward()
            seconds.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            peaks.append(meter.peak)
        results[name] = {"peak_saved_mib": max(peaks) / 2**20, "s_per_iter": statistics.median(seconds),
                         "overrides": opts, "config": os.path.relpath(config, ROOT)}
        print(name, results[name], flush=True)
    results["_note"] = (f"{args.batches} training iterations of batch {cfg0.SOLVER.IMS_PER_BATCH} from "
                        f"shapes_train (the same batches for every model), {args.threads} thread(s)")
    _save("memory.json", results)


# ----------------------------------------------------------------------------------------- inference
def inference(args) -> None:
    import numpy as np
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model

    from deqdet.engine import Trainer, build_config

    torch.set_num_threads(args.threads)
    weights = args.weights or os.path.join(ROOT, "output", "bench", "deqdet", "model_final.pth")
    results = {"weights": os.path.relpath(weights, ROOT), "max_iters": args.max_iters, "runs": []}
    residual_curves = None
    for tol in args.tols:
        cfg = build_config(DEQDET, ["MODEL.DEVICE", "cpu", "MODEL.DEQDET.TOL", str(tol),
                                    "MODEL.DEQDET.MAX_ITERS", str(args.max_iters),
                                    "MODEL.DEQDET.SOLVER", args.solver,
                                    "DATALOADER.NUM_WORKERS", "0"])
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(weights)
        steps, residuals = [], []
        handle = model.register_forward_hook(_recorder(steps, residuals))
        loader = Trainer.build_test_loader(cfg, "shapes_val")
        evaluator = COCOEvaluator(
            "shapes_val", output_dir=None, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE
        )
        start = time.perf_counter()
        metrics = inference_on_dataset(model, loader, evaluator)["bbox"]
        seconds = time.perf_counter() - start
        handle.remove()
        run = {"tol": tol, "solver": args.solver, "AP": metrics["AP"], "AP50": metrics["AP50"],
               "mean_steps": float(np.mean(steps)), "s_per_image": seconds / len(steps), "images": len(steps)}
        print(run, flush=True)
        results["runs"].append(run)
        if tol == 0:
            residual_curves = residuals
    results["_note"] = (f"shapes_val ({len(DatasetCatalog.get('shapes_val'))} images), batch 1, "
                        f"{args.threads} thread(s); steps = applications of the refinement stage incl. the "
                        "output one")
    tag = f"_{args.tag}" if args.tag else ""
    _save(f"inference_{args.solver}{tag}.json", results)
    if residual_curves is not None:
        _plot_residuals(np.array(residual_curves, dtype=float),
                        os.path.join(RESULTS, f"residual_per_iteration{tag}.png"))


def _recorder(steps: list, residuals: list):
    """A forward hook that appends each output's DEQ steps and residuals to the lists."""

    def record(module, inputs, outputs):
        for o in outputs:
            steps.append(int(o["steps"]))
            residuals.append(o["residuals"].tolist())

    return record


def _plot_residuals(curves, path: str) -> None:
    """curves (images, iterations): mean and 10-90 % band of the relative residual, log scale."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = range(1, curves.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.fill_between(it, np.percentile(curves, 10, axis=0), np.percentile(curves, 90, axis=0), alpha=0.3,
                    label="10-90 % of images")
    ax.plot(it, curves.mean(0), marker="o", ms=3, label="mean")
    ax.set_yscale("log")
    ax.set_xlabel("iteration k of the refinement stage")
    ax.set_ylabel("||z_k - z_k-1|| / ||z_k-1||")
    ax.set_title("DEQDet on shapes_val: residual per iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# -------------------------------------------------------------------------------------------- report
def _last_prediction_loss(variant: str):
    """[(iteration, loss)]: cls + L1 + GIoU loss of the last supervised prediction (AdaMixer: its last
    stage ``s5``; DEQDet: its last segment ``iter{max}``), from the run's metrics.json (window medians)."""
    path = os.path.join(ROOT, "output", "bench", variant.split(" (resumed")[0], "metrics.json")
    metrics = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    metrics = [m for m in metrics if "total_loss" in m]
    if not metrics:
        return []
    prefixes = {k[: -len("_loss_cls")] for k in metrics[0] if k.endswith("_loss_cls")}
    last = max((p for p in prefixes if not p.startswith("init")), key=lambda p: int(p.lstrip("iters")))
    return [(m["iteration"] + 1, sum(m[f"{last}_loss_{n}"] for n in ("cls", "l1", "giou")))
            for m in metrics if (m["iteration"] + 1) % 40 == 0 or m is metrics[-1]]


def report(args) -> None:
    """Rewrite the tables at the end of REPORT (after TABLES) from the JSON files."""
    lines = [TABLES, "", "## The tables (2-core CPU)", ""]
    train_res = _load("train.json") or {}
    if train_res:
        lines += ["### Training (same backbone, queries, dims, batch, iterations; `@mini`: the fit-speed "
                  "probe; `@pretrained`: ResNet initialised from the RetinaNet demo's)", "",
                  "| variant | AP vs iteration | final AP50 | s/iter (median) | peak RSS (MiB) |",
                  "|---|---|---|---|---|"]
        for name, r in train_res.items():
            curve = ", ".join(f"{i}: {ap:.1f}" for i, ap in r["ap_vs_iter"])
            lines.append(f"| {name} | {curve} | {r['ap50_final']:.1f} | {r['s_per_iter']:.2f} | "
                         f"{r['peak_rss_mib']:.0f} |")
        losses = {name: _last_prediction_loss(name) for name in train_res
                  # a run that was continued: the continuation's row shows the whole curve
                  if not any(other.startswith(f"{name} (resumed") for other in train_res)}
        losses = {name: curve for name, curve in losses.items() if curve}  # metrics.json on this machine
        if losses:
            lines += ["", "Loss of the last supervised prediction (cls + L1 + GIoU; AdaMixer: stage 6, "
                      "DEQDet: last RAG segment), by iteration:", "",
                      "| variant | loss by iteration |", "|---|---|"]
            lines += [f"| {name} | " + ", ".join(f"{i}: {v:.2f}" for i, v in curve) + " |"
                      for name, curve in losses.items()]
        lines += ["", "Commands:", ""] + [f"    python {r['command']}" for r in train_res.values()] + [""]
    mem = _load("memory.json")
    if mem:
        lines += ["### Training activation memory (peak bytes saved for backward)", "", mem.pop("_note"), "",
                  "| model | peak saved activations (MiB) | s/iter |", "|---|---|---|"]
        lines += [f"| {n} | {r['peak_saved_mib']:.1f} | {r['s_per_iter']:.2f} |" for n, r in mem.items()]
        lines += [""]
    for name in sorted(f for f in os.listdir(RESULTS) if f.startswith("inference_") and f.endswith(".json")):
        inf, solver = _load(name), name[len("inference_"):-len(".json")]
        if inf:
            heading = f"### Adaptive inference ({solver}, MAX_ITERS {inf['max_iters']}, {inf['weights']})"
            lines += [heading, "",
                      inf["_note"], "", "| TOL | AP | AP50 | mean steps | s/image |", "|---|---|---|---|---|"]
            lines += [f"| {r['tol']:g} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['mean_steps']:.2f} | "
                      f"{r['s_per_image']:.3f} |" for r in inf["runs"]] + [""]
    with open(REPORT) as f:
        summary = f.read().partition(TABLES)[0]
    with open(REPORT, "w") as f:
        f.write(summary + "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("train")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--eval-period", type=int, default=75)
    p.add_argument("--mini", action="store_true", help="the fit-speed probe on shapes_mini_train (see MINI)")
    p.add_argument("--backbone", default="",
                   help="initialise the ResNet from this checkpoint (variant@pretrained)")
    p.add_argument("--lr", type=float, default=0.0, help="SOLVER.BASE_LR (default: the config's)")
    p.add_argument("--resume", action="store_true", help="continue the variant's last run to --iters (its "
                   "metrics.json keeps the earlier evaluations; s/iter and RSS are of the continuation)")
    p = sub.add_parser("memory")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("inference")
    p.add_argument("--weights", default="")
    p.add_argument("--tols", type=float, nargs="+", default=[0.0, 1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--max-iters", type=int, default=20)
    p.add_argument("--solver", default="fixed_point", choices=["fixed_point", "anderson"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. the checkpoint's iteration)")
    sub.add_parser("report")
    args = parser.parse_args()
    {"train": train, "memory": memory, "inference": inference, "report": report}[args.phase](args)


if __name__ == "__main__":
    main()
