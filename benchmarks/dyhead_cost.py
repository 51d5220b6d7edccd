#!/usr/bin/env python
"""Cost of Dynamic Head on ATSS R50: parameters, FLOPs (fvcore) and CPU latency per image.

    python benchmarks/dyhead_cost.py       # all rows, 800x1333, results to benchmarks/results/
    python benchmarks/dyhead_cost.py --size 800 1216 --rows dyhead6_torchvision dyhead6_sampling

Rows: ATSS with its 4-conv GN towers and no block (the usual ATSS), no tower and no block, and 2 / 6
DyHead blocks in place of the towers, each DyHead row with both deformable-conv implementations
(``MODEL.DYHEAD.DCN_IMPL``: torchvision's kernel, or grid_sample + matmul). FLOPs are fvcore's
counts (one multiply-add = one flop, as fvcore counts convolutions), with the deformable conv
counted as the 3x3 convolution it computes. Latency: eval mode, no grad, one random image of the
given size (padded to a multiple of 128 as the model does), median of ``--repeat`` runs after one
warm-up, ``torch.set_num_threads(--threads)``: wall-clock latency and the process's CPU time. On a
shared machine the wall clock depends on the other processes (the 1-minute load average before each
row is recorded); with ``--threads 1`` the CPU time is what the image costs one core.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet")]

from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.analysis import FlopCountAnalysis  # noqa: E402  (fvcore's, for Instances outputs)

import deqdet  # noqa: E402,F401
from deqdet.engine import build_config  # noqa: E402

ROWS = {
    "atss_tower4": ("configs/atss_r50_fpn_1x.yaml", []),
    "atss_no_tower": ("configs/atss_r50_fpn_1x.yaml", ["MODEL.ATSS.NUM_CONVS", "0"]),
    "dyhead2_torchvision": (
        "configs/dyhead_r50_atss_fpn_1x.yaml",
        ["MODEL.DYHEAD.NUM_CONVS", "2", "MODEL.DYHEAD.DCN_IMPL", "torchvision"],
    ),
    "dyhead2_sampling": (
        "configs/dyhead_r50_atss_fpn_1x.yaml",
        ["MODEL.DYHEAD.NUM_CONVS", "2", "MODEL.DYHEAD.DCN_IMPL", "sampling"],
    ),
    "dyhead6_torchvision": ("configs/dyhead_r50_atss_fpn_1x.yaml", ["MODEL.DYHEAD.DCN_IMPL", "torchvision"]),
    "dyhead6_sampling": ("configs/dyhead_r50_atss_fpn_1x.yaml", ["MODEL.DYHEAD.DCN_IMPL", "sampling"]),
}


def _deform_conv_flops(inputs, outputs):
    """torchvision::deform_conv2d(input, weight, offset, mask, bias, ...): C_in * 9 MACs per output."""
    weight_shape = inputs[1].type().sizes()
    out_shape = outputs[0].type().sizes()
    return math.prod(out_shape) * math.prod(weight_shape[1:])


def build(row: str):
    config, opts = ROWS[row]
    cfg = build_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu", *opts])
    return build_model(cfg).eval()


def measure(row: str, size, repeat: int) -> dict:
    model = build(row)
    params = sum(p.numel() for p in model.parameters())
    image = torch.randint(0, 256, (3, *size), generator=torch.Generator().manual_seed(0)).float()
    inputs = [{"image": image, "height": size[0], "width": size[1]}]
    result = {"row": row, "params_M": round(params / 1e6, 2)}
    with torch.no_grad():
        if row.endswith("torchvision") or not row.startswith("dyhead"):
            flops = FlopCountAnalysis(model, inputs)
            flops.set_op_handle("torchvision::deform_conv2d", _deform_conv_flops)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            result["gflops"] = round(flops.total() / 1e9, 1)
            tower = flops.by_module().get("model.backbone.dyhead_tower", 0)
            result["gflops_dyhead_tower"] = round(tower / 1e9, 1)
        model(inputs)  # warm-up
        times, cpu_times = [], []
        for _ in range(repeat):
            start, cpu_start = time.perf_counter(), time.process_time()
            model(inputs)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    result["latency_s"] = round(statistics.median(times), 2)
    result["cpu_time_s"] = round(statistics.median(cpu_times), 2)
    result["latency_all_s"] = [round(t, 2) for t in times]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "dyhead_cost.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for row in args.rows:
        load_before = os.getloadavg()[0]
        result = measure(row, tuple(args.size), args.repeat)
        result["load_avg_1min_before"] = round(load_before, 2)
        print(json.dumps(result), flush=True)
        results.append(result)
    record = {
        "size": list(args.size),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
