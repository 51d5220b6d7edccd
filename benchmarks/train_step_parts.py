#!/usr/bin/env python
"""Where a training step's time goes, for configs on their own data: variants measured interleaved.

    python benchmarks/train_step_parts.py --steps 20 \\
        --variant flagship=configs/shapes/demo.yaml \\
        --variant "pad128=configs/shapes/demo.yaml MODEL.DYHEAD.SIZE_DIVISIBILITY 0" \\
        --variant retinanet=configs/shapes/retinanet_demo.yaml

Each variant is ``NAME=CONFIG [KEY VALUE ...]``, built on the CPU with its own train loader (the
trainer's, so the batches are the recipe's). After ``--warmup`` steps each, the variants take turns
step by step, so that a load change on the machine reaches all of them alike; compare their ratios.
A step is timed as forward (the model's losses), backward and optimizer step (data loading excluded);
inside the forward, forward hooks time the pyramid (bottom-up network, FPN, DyHead blocks), the dense
head and, for the combined detector, the dense proposals and the query decoder's losses. Writes
``<out>.md`` and ``<out>.json`` (``--out``, default ``output/train_step_parts``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet")]

import torch  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import deqdet  # noqa: E402, F401  (registers models and datasets)
from deqdet.engine import Trainer, build_config  # noqa: E402

PARTS = ("forward", "backward", "optimizer")


def timed(owner, attr: str, name: str, totals: dict):
    """Replace ``owner.attr`` (a callable attribute) by one that adds its wall time to ``totals[name]``."""
    original = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(owner, attr, wrapped)


def inner_parts(model) -> dict:
    """{part name: callable owner and attribute} timed inside the forward, where the model has them."""
    dense = getattr(model, "dense", model)
    parts = {}
    backbone = dense.backbone
    pyramid = getattr(backbone, "backbone", backbone)  # the FPN under DyHead blocks, or the FPN itself
    if hasattr(pyramid, "bottom_up"):
        parts["bottom-up network"] = pyramid.bottom_up
    parts["pyramid (bottom-up + FPN + DyHead)"] = backbone
    if hasattr(backbone, "dyhead_tower"):
        parts["DyHead blocks"] = backbone.dyhead_tower
    parts["dense head (convs)"] = dense.head
    return parts


class Variant:
    def __init__(self, spec: str):
        name, _, rest = spec.partition("=")
        config, *opts = shlex.split(rest) or [""]
        if not name or not config or len(opts) % 2:
            raise SystemExit(f"--variant {spec!r}: expected NAME=CONFIG [KEY VALUE ...]")
        self.name, self.config, self.opts = name, config, opts
        cfg = build_config(config, opts + ["MODEL.DEVICE", "cpu"])
        torch.manual_seed(0)
        self.model = Trainer.build_model(cfg).train()
        self.optimizer = Trainer.build_optimizer(cfg, self.model)
        self.loader = iter(Trainer.build_train_loader(cfg))
        self.totals = collections.defaultdict(float)
        for part, module in inner_parts(self.model).items():
            timed(module, "forward", part, self.totals)
        if hasattr(self.model, "dense_proposals"):
            timed(self.model, "dense_proposals", "dense proposals (NMS)", self.totals)
            timed(self.model.decoder, "losses", "query decoder losses", self.totals)
        self.steps = 0

    def step(self, record: bool):
        batch = next(self.loader)
        marks = [time.perf_counter()]
        losses = self.model(batch)
        marks.append(time.perf_counter())
        self.optimizer.zero_grad()
        sum(losses.values()).backward()
        marks.append(time.perf_counter())
        self.optimizer.step()
        marks.append(time.perf_counter())
        if not record:
            self.totals.clear()
            return
        for part, start, end in zip(PARTS, marks, marks[1:]):
            self.totals[part] += end - start
        self.steps += 1

    def per_step_ms(self) -> dict:
        return {k: 1000 * v / self.steps for k, v in self.totals.items()}


def write(variants, args, loads):
    rows = {v.name: {"config": v.config, "opts": v.opts, "ms_per_step": v.per_step_ms()} for v in variants}
    for row in rows.values():
        row["ms_per_step"]["step"] = sum(row["ms_per_step"][p] for p in PARTS)
    first = variants[0].name
    base = rows[first]["ms_per_step"]["step"]
    parts = list(PARTS) + sorted({k for r in rows.values() for k in r["ms_per_step"]} - set(PARTS) - {"step"})
    lines = [
        "# Training step parts",
        "",
        f"Command: `python benchmarks/train_step_parts.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; 1-minute load average "
        f"{loads[0]:.2f} before, {loads[1]:.2f} after. {args.steps} steps per variant after {args.warmup} "
        "warm-up steps, variants interleaved step by step; data loading excluded.",
        "",
        "| ms per step | " + " | ".join(rows) + " |",
        "|---|" + "---:|" * len(rows),
        "| **step** | " + " | ".join(f"**{r['ms_per_step']['step']:.0f}**" for r in rows.values()) + " |",
        f"| step / {first} | "
        + " | ".join(f"{r['ms_per_step']['step'] / base:.2f}" for r in rows.values())
        + " |",
    ]
    for part in parts:
        cells = [f"{r['ms_per_step'][part]:.1f}" if part in r["ms_per_step"] else "-" for r in rows.values()]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines += ["", "Parts inside the forward overlap (the pyramid contains the bottom-up network and the",
              "blocks).", "", "Variants:", ""]
    lines += [f"- `{name}`: `{r['config']}` {' '.join(r['opts'])}" for name, r in rows.items()]
    out = args.out
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"command": sys.argv[1:], "loads": loads, "variants": rows}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}.md")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=CONFIG [KEY VALUE ...]")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=os.path.join("output", "train_step_parts"),
                        help="stem of the result files (.md, .json)")
    args = parser.parse_args(argv)
    variants = [Variant(spec) for spec in args.variant]
    loads = [os.getloadavg()[0]]
    with EventStorage(0):
        for i in range(args.warmup + args.steps):
            for v in variants:
                v.step(record=i >= args.warmup)
    loads.append(os.getloadavg()[0])
    write(variants, args, loads)


if __name__ == "__main__":
    main()
