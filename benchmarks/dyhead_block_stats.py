#!/usr/bin/env python
"""What each DyHead block sees and samples, per pyramid level, for one checkpoint (or the initialisation).

    python benchmarks/dyhead_block_stats.py --name atss_dyhead@4000 \
        --config-file output/convergence/atss_dyhead@4000/config.yaml \
        --weights output/convergence/atss_dyhead@4000/model_final.pth
    python benchmarks/dyhead_block_stats.py --name atss_dyhead@init \
        --config-file configs/shapes/atss_dyhead_r18.yaml --weights init

Runs ``--images`` images of ``DATASETS.TEST[0]`` through the model in eval mode and records, for every
block and level: the standard deviation of the block's input, the mean and maximum |offset| of the
deformable taps (pixels of that level), the share of taps whose sampling point lies outside the map
(DCNv2 reads zeros there), and the block output's spatial standard deviation (mean over images and
channels; 0 means the level's output is one constant vector, the same at every position).
Results are merged into ``dyhead_block_stats.json`` under ``--name``; ``dyhead_block_stats.md`` is rewritten
from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "DEQDet"))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402

from deqdet.engine import Trainer, build_config  # noqa: E402
from deqdet.modeling.dyhead.dyconv import DyConv  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
RESULT_FILE = os.path.join(RESULTS, "dyhead_block_stats.json")


def outside_share(offset: torch.Tensor) -> float:
    """Share of the 9 taps per position whose sampling point falls outside the map.

    offset: (N, 18, H, W), (dy, dx) per tap k = 3 i + j, stride 1 (the block's own-level DCN).
    """
    n, _, h, w = offset.shape
    taps = torch.arange(-1, 2, dtype=offset.dtype, device=offset.device)
    ys = torch.arange(h, dtype=offset.dtype, device=offset.device).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=offset.dtype, device=offset.device).view(1, 1, 1, w)
    y = ys + taps.repeat_interleave(3).view(1, 9, 1, 1) + offset[:, 0::2]
    x = xs + taps.repeat(3).view(1, 9, 1, 1) + offset[:, 1::2]
    # a point within one pixel of the border still reads an in-map corner (bilinear)
    outside = (y <= -1) | (y >= h) | (x <= -1) | (x >= w)
    return outside.float().mean().item()


def block_stats(model, batch: list) -> list:
    """One row per (block, level) for the images in ``batch``."""
    rows = []

    def hook(index):
        def record(block, inputs, outputs):
            for name, x in inputs[0].items():
                offset = block.offset(block.offset_norm(x))[:, :18]
                rows.append({
                    "block": index, "level": name, "size": list(x.shape[-2:]),
                    "input_std": x.float().std().item(),
                    "offset_abs_mean": offset.abs().mean().item(),
                    "offset_abs_max": offset.abs().max().item(),
                    "taps_outside": outside_share(offset),
                    "output_spatial_std": outputs[name].float().std(dim=(2, 3)).mean().item(),
                })
        return record

    blocks = [m for m in model.modules() if isinstance(m, DyConv)]
    if not blocks:
        raise SystemExit("the model has no DyHead block (MODEL.DYHEAD.NUM_CONVS is 0)")
    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    return rows


def write_report(data: dict) -> None:
    lines = ["# DyHead blocks: what they read and sample, per level", "",
             "Written by `python benchmarks/dyhead_block_stats.py` (commands below). Per block and level: "
             "std of the block's input; mean / max |offset| of the deformable taps in pixels of the level; "
             "share of taps sampling outside the map (read as zeros); spatial std of the block's output "
             "(0: the same vector at every position, no spatial information left).", ""]
    for name, entry in data.items():
        lines += [f"## {name}", "", f"`{entry['command']}`", "",
                  "| block | level | map | input std | mean / max abs offset (px) | taps outside "
                  "| output spatial std |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in entry["rows"]:
            lines.append(f"| {r['block']} | {r['level']} | {r['size'][0]}x{r['size'][1]} "
                         f"| {r['input_std']:.3g} | {r['offset_abs_mean']:.3g} / {r['offset_abs_max']:.3g} "
                         f"| {100 * r['taps_outside']:.0f} % | {r['output_spatial_std']:.3f} |")
        lines.append("")
    with open(os.path.join(RESULTS, "dyhead_block_stats.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="key of this checkpoint in the results")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="a checkpoint, or 'init' for the initialisation")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    torch.manual_seed(1)
    cfg = build_config(args.config_file, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", *args.opts])
    model = Trainer.build_model(cfg).eval()
    if args.weights != "init":
        DetectionCheckpointer(model).load(args.weights)
    loader = iter(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]))
    batch = [next(loader)[0] for _ in range(args.images)]
    data = json.load(open(RESULT_FILE)) if os.path.isfile(RESULT_FILE) else {}
    rel = [os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in sys.argv[1:]]
    data[args.name] = {"command": "python benchmarks/dyhead_block_stats.py " + shlex.join(rel),
                       "rows": block_stats(model, batch)}
    with open(RESULT_FILE, "w") as f:
        json.dump(data, f, indent=1)
    write_report(data)
    for r in data[args.name]["rows"]:
        print(r)


if __name__ == "__main__":
    main()
