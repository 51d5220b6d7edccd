#!/usr/bin/env python
"""The combined detector against its parts on one long schedule: AP against training time on `shapes`.

    python benchmarks/convergence.py train --detectors retinanet flagship atss_dyhead --iters 4000
    python benchmarks/convergence.py train --detectors flagship --seed 2 --jobs 1   # another seed
    python benchmarks/convergence.py record-stopped --detectors deqdet adamixer   # runs killed early
    python benchmarks/convergence.py report     # convergence.md / .png from convergence.json

From one shared ResNet trained on ``shapes`` (the CPU stand-in for ImageNet weights; ``--backbone``, a
file written by ``tools/extract_backbone.py --by-suffix``, loaded into every detector's ResNet; the
rest of each detector starts from its own initialisation):

    python benchmarks/convergence.py train --detectors retinanet --iters 4000 --seed 3 --jobs 1
    python tools/extract_backbone.py "output/convergence/retinanet@4000_s3/model_final.pth" \
        output/convergence/shapes_trunk.pth --by-suffix
    python benchmarks/convergence.py train --detectors deqdet adamixer flagship atss_dyhead_identity \
        retinanet --iters 2000 --eval-period 500 --backbone output/convergence/shapes_trunk.pth --lr 2.5e-4

Every detector trains on the CPU (``OUTPUT_DIR output/convergence/<run>``, ``<run>`` being
``<name>@<iters>`` for seed 1 and ``<name>@<iters>_s<seed>`` for another, with ``_trunk`` appended when
it starts from ``--backbone shapes_trunk.pth`` (``_trunk2`` from ``shapes_trunk2.pth``, ...) and ``_lr<lr>``
with ``--lr``; from scratch otherwise), batch 4, ``--iters``
iterations (warm-up 100, lr x0.1 at 75 % and 93 %), ``SEED`` ``--seed`` (default 1), the demo's input
sizes, with ``OMP_NUM_THREADS=1`` and ``--jobs`` processes side by side (2 on 2 cores). It is evaluated on
``shapes_val`` every ``--eval-period`` iterations (``TEST.EVAL_PERIOD``, a checkpoint each time); for the
combined detector the dense head's AP comes from the same checkpoints: from the run's own evaluations
when its config evaluates both heads (``MODEL.DENSE_QUERY.INFERENCE_SOURCE both``), otherwise from
evaluating each checkpoint again with ``INFERENCE_SOURCE dense``.
A detector whose ``model_final.pth`` exists is not trained again, one stopped early resumes from its last
checkpoint (``--resume``), and evaluations whose logs hold a result are not repeated: calling ``train``
again collects the results of finished runs and completes stopped ones.
The time axis is iterations x the run's median s/iter (training only, evaluation excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time

from recipe_protocol import RETINANET, ROOT, SHAPES, _env, _last_ap

RESULTS = os.path.join(ROOT, "benchmarks", "results")
RESULT_FILE = os.path.join(RESULTS, "convergence.json")
# the demo's input sizes for every detector, so that AP compares detectors and not resolutions
DEMO_INPUT = ["INPUT.MIN_SIZE_TRAIN", "(160, 192, 224)", "INPUT.MIN_SIZE_TEST", "288",
              "INPUT.MAX_SIZE_TEST", "480", "DATALOADER.NUM_WORKERS", "0", "MODEL.CHANNELS_LAST", "True"]
# name -> (config, overrides, whether it has a dense head to evaluate on its own)
FLAGSHIP = os.path.join(SHAPES, "retinanet_dyhead_deqdet_r18.yaml")
OWN_NECK = ["MODEL.DENSE_QUERY.DECODER_INPUT", "bottom_up", "MODEL.RESNETS.OUT_FEATURES",
            "['res2', 'res3', 'res4', 'res5']", "MODEL.QUERY.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']",
            "MODEL.QUERY.NECK_STYLE", "DEQDet", "MODEL.QUERY.NECK_NORM_GROUPS", "16"]
# deqdet_r18.yaml's decoder width (50 queries, 128-d content, FFN 512) and refinement schedule (6 steps
# supervised at 1, 3, 6 with RAG 2, 2 extra init supervisions, 6 + 1 at test)
DEQDET_WIDTH = ["MODEL.QUERY.NUM_QUERIES", "50", "MODEL.QUERY.CONTENT_DIM", "128",
                "MODEL.QUERY.FFN_DIM", "512"]
DEQDET_DEPTH = ["MODEL.DEQDET.REFINEMENT_STEPS", "6", "MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 3, 6)",
                "MODEL.DEQDET.RAG", "2", "MODEL.DEQDET.EXTRA_INIT_SUPERVISIONS", "2",
                "MODEL.DEQDET.MAX_ITERS", "6"]
DECODER_LR_QUARTER = ["SOLVER.PARAM_GROUP_RULES", '[["^(decoder|content_proj|queries)[.]", 0.25, 1.0]]']
DETECTORS = {
    "retinanet": (RETINANET, [], False),
    # the published block and initialisation (the config's defaults when this run was recorded)
    "atss_dyhead": (os.path.join(SHAPES, "atss_dyhead_r18.yaml"),
                    ["MODEL.DYHEAD.IDENTITY_INIT", "False", "MODEL.DYHEAD.ZERO_INIT_OFFSET", "False"], False),
    # the config as shipped: blocks that start as the identity
    "atss_dyhead_identity": (os.path.join(SHAPES, "atss_dyhead_r18.yaml"), [], False),
    "deqdet": (os.path.join(SHAPES, "deqdet_r18.yaml"), [], False),
    "adamixer": (os.path.join(SHAPES, "adamixer_r18.yaml"), [], False),
    "flagship": (FLAGSHIP, [], True),
    # the flagship with deqdet_r18.yaml's decoder: its width (50 queries, 128-d content, FFN 512) and its
    # refinement schedule (6 steps supervised at 1, 3, 6 with RAG 2, 2 extra init supervisions, 6 + 1 at test)
    "flagship_deqdet_decoder": (FLAGSHIP, DEQDET_WIDTH + DEQDET_DEPTH, True),
    # the decoder's whole gradient reaches the shared pyramid (the config scales it by 0.1)
    "flagship_feature_grad1": (FLAGSHIP, ["MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD", "1.0"], True),
    # the decoder's queries as in the papers (50 learned embeddings, whole-image boxes, no class prior):
    # the dense head only shares the pyramid and adds its losses
    "flagship_whole_image": (FLAGSHIP, [
        "MODEL.QUERY.NUM_QUERIES", "50", "MODEL.DENSE_QUERY.QUERY_INIT", "whole_image",
        "MODEL.DENSE_QUERY.QUERY_CONTENT", "embedding", "MODEL.DENSE_QUERY.CLASS_PRIOR", "False"], True),
    # the ResNet at a quarter of the lr (2.5e-4 at the config's 1e-3: the rate DEQDet fine-tunes it at),
    # everything else at the config's lr, as DETRs fine-tune a pre-trained backbone at a fraction
    "flagship_resnet_lr0.25": (FLAGSHIP, [
        "SOLVER.PARAM_GROUP_RULES", '[["^dense[.]backbone[.]backbone[.]bottom_up[.]", 0.25, 1.0]]'], True),
    # the decoder reads C2-C5 as DEQDet does: the ResNet's res2-res5 through its own 3x3 + ReLU channel
    # mapper (not the DyHead pyramid it shares with the dense head), with the whole gradient into the ResNet
    "flagship_own_neck": (FLAGSHIP, OWN_NECK + ["MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD", "1.0"], True),
    # none of the decoder's gradient reaches the shared pyramid (the config sends a tenth)
    "flagship_feature_grad0": (FLAGSHIP, ["MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD", "0.0"], True),
    # DEQDet's optimiser settings (the papers' AdamW weight decay 1e-4 and gradient clip 1.0) instead of
    # the from-scratch `shapes` recipes' 0.05 and 10
    "flagship_deqdet_optim": (FLAGSHIP, ["SOLVER.WEIGHT_DECAY", "0.0001", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
                                         "1.0"], True),
    # the decoder (its stages, query content projection and per-slot embeddings) at a quarter of the lr,
    # 2.5e-4 as DEQDet is fine-tuned, the dense detector at the config's 1e-3
    "flagship_decoder_lr0.25": (FLAGSHIP, DECODER_LR_QUARTER, True),
    # flagship_deqdet_decoder with the decoder at a quarter of the lr
    "flagship_deqdet_decoder_lr0.25": (FLAGSHIP, DEQDET_WIDTH + DEQDET_DEPTH + DECODER_LR_QUARTER, True),
    # the same with one-to-two matching of the decoder's queries at every supervised stage (H-DETR's
    # one-to-many matching; the decoder's class-wise NMS removes the duplicates at test)
    "flagship_deqdet_decoder_lr0.25_o2m2": (FLAGSHIP, DEQDET_WIDTH + DEQDET_DEPTH + DECODER_LR_QUARTER
                                            + ["MODEL.QUERY.MATCHES_PER_GT", "2"], True),
    # DEQDet's refinement schedule alone (6 steps supervised at 1, 3, 6, RAG 2, 2 extra init supervisions,
    # 6 + 1 at test) on the flagship's narrow decoder, at a quarter of the lr
    "flagship_deep_lr0.25": (FLAGSHIP, DEQDET_DEPTH + DECODER_LR_QUARTER, True),
    # 50 queries (DEQDet's number) instead of 20 on the flagship's decoder, at a quarter of the lr
    "flagship_queries50_lr0.25": (FLAGSHIP, ["MODEL.QUERY.NUM_QUERIES", "50"] + DECODER_LR_QUARTER, True),
    # the decoder samples P3-P7 (strides 8-128, the dense head's levels) instead of P3-P5, at a quarter
    # of the lr
    "flagship_p3p7_lr0.25": (FLAGSHIP, ["MODEL.QUERY.IN_FEATURES", "['p3', 'p4', 'p5', 'p6', 'p7']"]
                             + DECODER_LR_QUARTER, True),
    # the same at a tenth (1e-4)
    "flagship_decoder_lr0.1": (FLAGSHIP, [
        "SOLVER.PARAM_GROUP_RULES", '[["^(decoder|content_proj|queries)[.]", 0.1, 1.0]]'], True),
    # the decoder on its own neck over C2-C5 as in flagship_own_neck, at the config's tenth of its gradient
    "flagship_own_neck_grad0.1": (FLAGSHIP, OWN_NECK, True),
}


def _schedule(iters: int, eval_period: int, seed: int) -> list:
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)}, {int(iters * 0.93)})",
            "SOLVER.WARMUP_ITERS", "100", "SOLVER.IMS_PER_BATCH", "4", "TEST.EVAL_PERIOD", str(eval_period),
            "SOLVER.CHECKPOINT_PERIOD", str(eval_period), "MODEL.DEVICE", "cpu", "SEED", str(seed)]


def run_key(name: str, iters: int, seed: int, backbone: str = "", lr: float = 0.0) -> str:
    """The run's key in convergence.json and its folder under output/convergence: ``_trunk`` for runs from
    ``shapes_trunk.pth``, ``_trunk2`` from ``shapes_trunk2.pth`` and so on."""
    trunk = ""
    if backbone:
        stem = os.path.splitext(os.path.basename(backbone))[0]
        trunk = "_" + (stem[len("shapes_"):] if stem.startswith("shapes_") else stem)
    return f"{name}@{iters}" + ("" if seed == 1 else f"_s{seed}") + trunk + (f"_lr{lr:g}" if lr else "")


def _python(args: list, log_path: str, mode: str = "w") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=open(log_path, mode),
                            stderr=subprocess.STDOUT, env=_env())


class Run:
    """One detector's training process, then the dense-head evaluation of each of its checkpoints."""

    def __init__(self, name: str, iters: int, eval_period: int, seed: int, backbone: str = "",
                 lr: float = 0.0):
        self.name, self.iters, self.eval_period = name, iters, eval_period
        self.key = run_key(name, iters, seed, backbone, lr)
        config, opts, self.has_dense = DETECTORS[name]
        self.out = os.path.join(ROOT, "output", "convergence", self.key)
        os.makedirs(self.out, exist_ok=True)
        init = ["MODEL.WEIGHTS", os.path.abspath(backbone)] if backbone else []
        init += ["SOLVER.BASE_LR", f"{lr:g}"] if lr else []
        self.args = ["--config-file", config, *opts, *DEMO_INPUT, *_schedule(iters, eval_period, seed), *init]
        self.pending = [] if not self.has_dense else list(range(eval_period, iters + 1, eval_period))
        self.dense = {}
        self.phase, self.proc = "train", None
        if not os.path.isfile(os.path.join(self.out, "model_final.pth")):  # otherwise collect what is there
            resume = ["--resume"] if os.path.isfile(os.path.join(self.out, "last_checkpoint")) else []
            self.proc = _python([os.path.join(ROOT, "train_net.py"), *resume, *self.args,
                                 "OUTPUT_DIR", self.out], os.path.join(self.out, "train.log"),
                                "a" if resume else "w")

    def _checkpoint(self, iteration: int) -> str:
        name = "model_final.pth" if iteration == self.iters else f"model_{iteration - 1:07d}.pth"
        return os.path.join(self.out, name)

    def poll(self):
        """None while running; the result dict when done. Raises SystemExit when a process failed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                return None
            if self.proc.returncode != 0:
                raise SystemExit(f"{self.name}: {self.phase} failed, see its log in {self.out}")
        if self.phase.startswith("dense@"):
            self.dense[int(self.phase[6:])] = _last_ap(os.path.join(self.out, f"{self.phase}.log"))
        else:  # a config with INFERENCE_SOURCE both logged its dense head's AP at each evaluation
            self.dense.update(_logged_dense(self.out, self.iters))
            self.pending = [i for i in self.pending if i not in self.dense]
        while self.pending:
            iteration = self.pending.pop(0)
            self.phase = f"dense@{iteration}"
            log = os.path.join(self.out, f"{self.phase}.log")
            if os.path.isfile(log) and "copypaste: AP," in open(log).read():  # evaluated by an earlier call
                self.dense[iteration] = _last_ap(log)
                continue
            self.proc = _python([os.path.join(ROOT, "train_net.py"), "--eval-only", *self.args,
                                 "MODEL.WEIGHTS", self._checkpoint(iteration),
                                 "MODEL.DENSE_QUERY.INFERENCE_SOURCE", "dense",
                                 "OUTPUT_DIR", os.path.join(self.out, self.phase)], log)
            return None
        return self._result()

    def _result(self) -> dict:
        return _record(self.out, self.iters, self.args, self.dense)


def _logged_dense(out: str, iters: int) -> dict:
    """{iteration: (AP, AP50, AP75)} of the dense head from the run's own evaluations (``dense_bbox/*``
    in ``metrics.json``, logged when ``MODEL.DENSE_QUERY.INFERENCE_SOURCE`` is ``both``)."""
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    return {min(m["iteration"] + 1, iters): (m["dense_bbox/AP"], m["dense_bbox/AP50"], m["dense_bbox/AP75"])
            for m in metrics if "dense_bbox/AP" in m}


def _record(out: str, iters: int, args: list, dense: dict) -> dict:
    """A run's entry of convergence.json from its ``metrics.json``: median s/iter, the AP curve (with
    the dense head's AP at the iterations in ``dense``), the command; ``stopped_at`` if it ended early."""
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    s_per_iter = statistics.median(m["time"] for m in metrics if "time" in m and m["iteration"] >= 20)
    # evaluations are logged at iteration k * period - 1, the last one (after training) at MAX_ITER
    curve = [{"iteration": min(m["iteration"] + 1, iters), "ap": m["bbox/AP"], "ap50": m["bbox/AP50"],
              "ap75": m["bbox/AP75"]} for m in metrics if "bbox/AP" in m]
    if not curve:
        raise SystemExit(f"{out}: no evaluation logged yet")
    for point in curve:
        point["train_s"] = round(point["iteration"] * s_per_iter, 1)
        if point["iteration"] in dense:
            point["dense_ap"], point["dense_ap50"], point["dense_ap75"] = dense[point["iteration"]]
    last = max(m["iteration"] for m in metrics) + 1
    return {"s_per_iter": s_per_iter, "load_avg_end": os.getloadavg()[0], "curve": curve,
            **({"stopped_at": last} if last < iters else {}),
            "command": "OMP_NUM_THREADS=1 python train_net.py " + " ".join(
                os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in args)}


def _load() -> dict:
    return json.load(open(RESULT_FILE)) if os.path.isfile(RESULT_FILE) else {}


@contextlib.contextmanager
def _results():
    """convergence.json's runs as a dict to update, written back on exit; a lock keeps runs that end
    together from reading a half-written file or overwriting each other's entries."""
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(os.path.join(ROOT, "output"), exist_ok=True)
    with open(os.path.join(ROOT, "output", "convergence.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _load()
        yield data
        with open(RESULT_FILE + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(RESULT_FILE + ".tmp", RESULT_FILE)


def train(args) -> None:
    if args.backbone and not os.path.isfile(args.backbone):
        raise SystemExit(f"--backbone {args.backbone}: no such file")
    pending, running = list(args.detectors), []
    while pending or running:
        while pending and len(running) < args.jobs:
            running.append(Run(pending.pop(0), args.iters, args.eval_period, args.seed, args.backbone,
                               args.lr))
            print(f"started {running[-1].name}: {' '.join(running[-1].args)}", flush=True)
        time.sleep(10)
        for run in list(running):
            result = run.poll()
            if result is not None:
                running.remove(run)
                with _results() as data:
                    data[run.key] = result
                print(run.name, json.dumps(result["curve"][-1]), flush=True)
    report(args)


def record_stopped(args) -> None:
    """Record runs stopped before ``--iters`` (killed for lack of time) with their evaluations so far,
    marked ``stopped_at`` (the last trained iteration)."""
    with _results() as data:
        for name in args.detectors:
            key = run_key(name, args.iters, args.seed, args.backbone, args.lr)
            out = os.path.join(ROOT, "output", "convergence", key)
            config, overrides, has_dense = DETECTORS[name]
            init = ["MODEL.WEIGHTS", os.path.abspath(args.backbone)] if args.backbone else []
            init += ["SOLVER.BASE_LR", f"{args.lr:g}"] if args.lr else []
            command = ["--config-file", config, *overrides, *DEMO_INPUT,
                       *_schedule(args.iters, args.eval_period, args.seed), *init, "OUTPUT_DIR", out]
            data[key] = _record(out, args.iters, command,
                                _logged_dense(out, args.iters) if has_dense else {})
    report(args)


def _section(runs: dict, figure: str, plt) -> str:
    """The Markdown table, per-evaluation AP table and figure ``figure`` (under RESULTS) of ``runs``."""
    lines = ["| detector | iterations | AP | AP50 | AP75 | dense head AP / AP75 | s/iter | training time |",
             "|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, run in runs.items():
        last = run["curve"][-1]
        dense = f"{last['dense_ap']:.1f} / {last['dense_ap75']:.1f}" if "dense_ap" in last else "-"
        label = f"{key}, stopped at {run['stopped_at']}" if "stopped_at" in run else key
        lines.append(f"| {label} | {last['iteration']} | {last['ap']:.1f} | {last['ap50']:.1f} "
                     f"| {last['ap75']:.1f} | {dense} | {run['s_per_iter']:.3f} "
                     f"| {last['train_s'] / 60:.0f} min |")
        minutes = [p["train_s"] / 60 for p in run["curve"]]
        line, = ax.plot(minutes, [p["ap"] for p in run["curve"]], marker="o", label=key)
        if "dense_ap" in last:
            ax.plot(minutes, [p.get("dense_ap") for p in run["curve"]], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{key} (its dense head)")
    ax.set_xlabel("training time, minutes (iterations x median s/iter, 1 thread, 2 runs side by side)")
    ax.set_ylabel("shapes_val AP")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, figure), dpi=100)
    plt.close(fig)
    iterations = sorted({p["iteration"] for run in runs.values() for p in run["curve"]})
    points = ["| detector | " + " | ".join(f"@{i}" for i in iterations) + " |",
              "|---|" + "---|" * len(iterations)]
    for key, run in runs.items():
        by_iter = {p["iteration"]: p for p in run["curve"]}
        cells = [f"{by_iter[i]['ap']:.1f}" if i in by_iter else "" for i in iterations]
        points.append(f"| {key} | " + " | ".join(cells) + " |")
        if "dense_ap" in run["curve"][-1]:
            cells = [f"{by_iter[i]['dense_ap']:.1f}" if "dense_ap" in by_iter.get(i, {}) else ""
                     for i in iterations]
            points.append(f"| {key}, its dense head | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return ("\n".join(lines) + "\n\nAP at each evaluation:\n\n" + "\n".join(points)
            + f"\n\n![AP against training time]({figure})\n")


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _load()
    scratch = {k: run for k, run in data.items() if "_trunk" not in k}
    trunk = {k: run for k, run in data.items() if "_trunk" in k}
    text = ("# The combined detector against its parts on one schedule\n\n"
            "Written by `python benchmarks/convergence.py report` from `convergence.json`; protocol in "
            "`benchmarks/convergence.py` (seed 1 unless the run's name holds `_s<seed>`, batch 4, "
            "2-core CPU, 1 thread per run, two runs side by side). AP at the last iteration.\n\n"
            "## From scratch\n\n" + _section(scratch, "convergence.png", plt))
    if trunk:
        text += ("\n## From one shared ResNet trained on `shapes`\n\nEvery detector's ResNet starts from "
                 "the same file (`--backbone`, the ResNet of a RetinaNet-recipe run, "
                 "`tools/extract_backbone.py --by-suffix`); everything else from its own initialisation, "
                 "with its config's optimiser, at the lr in its command.\n\n"
                 + _section(trunk, "convergence_trunk.png", plt))
    commands = "\n".join(f"- {key}: `{run['command']}`" for key, run in data.items())
    with open(os.path.join(RESULTS, "convergence.md"), "w") as f:
        f.write(text + "\n## Commands\n\n" + commands + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--detectors", nargs="+", required=True, choices=list(DETECTORS))
    p.add_argument("--iters", type=int, default=4000)
    p.add_argument("--eval-period", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (1 thread each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backbone", default="", help="start every detector's ResNet from this file "
                   "(tools/extract_backbone.py --by-suffix)")
    p.add_argument("--lr", type=float, default=0.0, help="SOLVER.BASE_LR for every detector (default: "
                   "each config's own)")
    p.set_defaults(func=train)
    sub.add_parser("report").set_defaults(func=report)
    p = sub.add_parser("record-stopped", help="record killed runs with their evaluations so far")
    p.add_argument("--detectors", nargs="+", required=True, choices=list(DETECTORS))
    p.add_argument("--iters", type=int, default=4000)
    p.add_argument("--eval-period", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backbone", default="", help="as the run's train command")
    p.add_argument("--lr", type=float, default=0.0, help="as the run's train command")
    p.set_defaults(func=record_stopped)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
