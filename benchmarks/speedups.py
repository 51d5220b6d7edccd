#!/usr/bin/env python
"""Before / after figures of each speed-up: old and new code on the same inputs, interleaved in one
process (A, B, A, B, ...), so machine load hits both alike.

    python benchmarks/speedups.py                   # all cases, 3 rounds after a warm-up round
    python benchmarks/speedups.py --cases sample_3d refinement_step --repeat 5

Cases (paper sizes: 800x1333 input, 256 channels, 100 queries, DEQDet's 64 points x 4 groups):

* ``sample_3d``: the 3D sampling, one ``grid_sample`` per level on NCHW maps (before) vs one weighted
  gather per level on channels-last maps (after); forward without grad, and forward + backward (the
  gather's backward is the slower one, so ``sample_3d`` gathers only when no gradient is needed).
* ``refinement_step``: one DEQDet refinement stage (no grad) on the channel mapper's maps as NCHW
  (before) or channels-last (after, what the mapper now returns).
* ``deqdet_inference``: the whole DEQDet R50 (20 + 1 steps, batch 1), its channel mapper's output
  made NCHW again by a forward hook (before) or left channels-last (after).
* ``dyhead_block``: one DyHead block on an 800x1333 FPN pyramid, torchvision's deformable conv vs the
  gather-based ``DCN_IMPL: sampling``.
* ``dyhead_channels_last``: the same block with the gather-based DCN on NCHW maps, each DCN copying its
  input to channels-last and its output back (before), vs channels-last in and out (after).

Writes ``benchmarks/results/speedups.json`` and ``speedups.md`` (the largest output difference of each
pair is recorded next to the times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet"), os.path.join(ROOT, "benchmarks")]

import torch  # noqa: E402
from run import build, images, interleaved, load, machine, summary  # noqa: E402

STRIDES = (4, 8, 16, 32)


def _pyramid(channels=256, hw=(800, 1333), strides=STRIDES, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(-(-hw[0] // s), -(-hw[1] // s)) for s in strides]
    return [torch.randn(1, channels, h, w, generator=g) for h, w in sizes]


def _queries(n=100, hw=(800, 1333), seed=1):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(1, n, 2, generator=g) * torch.tensor([hw[1], hw[0]], dtype=torch.float32)
    return torch.cat(
        [xy, torch.rand(1, n, 1, generator=g) * 4 + 5, torch.randn(1, n, 1, generator=g) * 0.5], -1
    )


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def case_sample_3d(repeat):
    from deqdet.modeling.query.sampling import (
        _sample_levels_gather,
        _sample_levels_grid,
        level_weights,
        sample_3d,
        sampling_points,
    )

    nchw = _pyramid()
    last = [f.contiguous(memory_format=torch.channels_last) for f in nchw]
    offsets = torch.randn(1, 100, 4 * 64, 3, generator=torch.Generator().manual_seed(2)) * 0.5
    points = sampling_points(offsets, _queries())
    out = {}
    with torch.no_grad():
        diff = _diff(sample_3d(points, nchw, STRIDES, 4), sample_3d(points, last, STRIDES, 4))
        t = interleaved(
            {
                "before": lambda: sample_3d(points, nchw, STRIDES, 4),
                "after": lambda: sample_3d(points, last, STRIDES, 4),
            },
            repeat,
            "cpu",
        )
    out["sample_3d forward"] = {**{k: summary(v) for k, v in t.items()}, "max_abs_diff": diff}
    leaves = [points.clone().requires_grad_(), *(f.clone().requires_grad_() for f in nchw)]
    leaves_cl = [points.clone().requires_grad_(), *(f.clone().requires_grad_() for f in last)]

    def fwd_bwd(fn, p, *feats):
        fn(p, list(feats), STRIDES, 4, level_weights(p[..., 2], STRIDES)).square().sum().backward()

    t = interleaved(
        {
            "before": lambda: fwd_bwd(_sample_levels_grid, *leaves),
            "after": lambda: fwd_bwd(_sample_levels_gather, *leaves_cl),
        },
        repeat,
        "cpu",
    )
    out["sample_3d forward + backward"] = {k: summary(v) for k, v in t.items()}
    return out


def case_refinement_step(repeat):
    model, _ = build("deqdet_r50", "cpu")
    stage = model.decoder.refine_stage
    torch.manual_seed(0)
    with torch.no_grad():
        for p in stage.parameters():  # non-zero offset and mixing generators, as after training
            p.add_(torch.randn_like(p) * 0.01)
        nchw, last = _pyramid(), None
        last = [f.contiguous(memory_format=torch.channels_last) for f in nchw]
        content, xyzr = torch.randn(1, 100, 256), _queries()
        diff = _diff(stage(content, xyzr, nchw)[0], stage(content, xyzr, last)[0])
        t = interleaved(
            {"before": lambda: stage(content, xyzr, nchw), "after": lambda: stage(content, xyzr, last)},
            repeat,
            "cpu",
        )
    return {"refinement step (100 queries)": {**{k: summary(v) for k, v in t.items()}, "max_abs_diff": diff}}


def case_deqdet_inference(repeat):
    model, _ = build("deqdet_r50", "cpu")
    inputs = images(1, (800, 1333), "cpu")
    nchw = {"on": False}
    model.neck.register_forward_hook(lambda m, a, out: [o.contiguous() for o in out] if nchw["on"] else out)

    def run(before):
        nchw["on"] = before
        return model(inputs)[0]["instances"].scores

    with torch.no_grad():
        diff = _diff(run(True), run(False))
        t = interleaved({"before": lambda: run(True), "after": lambda: run(False)}, repeat, "cpu")
    return {
        "DEQDet R50 inference, 800x1333, 20 + 1 steps": {
            **{k: summary(v) for k, v in t.items()},
            "max_abs_diff": diff,
        }
    }


def _dyhead_block(dcn_impl):
    """One DyHead block (non-trivial offsets) and an 800x1333 FPN pyramid P3-P7."""
    from deqdet.modeling.dyhead.dyconv import DyConv

    torch.manual_seed(0)
    block = DyConv(256, 256, dcn_impl=dcn_impl).eval()
    with torch.no_grad():
        block.offset.weight.normal_(std=0.01)  # non-trivial offsets
    return block, dict(zip(["p3", "p4", "p5", "p6", "p7"], _pyramid(strides=(8, 16, 32, 64, 128))))


def _block_pair(name, before, after, repeat):
    """Two calls returning the same pyramid: the largest output difference, then interleaved times."""
    with torch.no_grad():
        diff = max(_diff(a, b) for a, b in zip(before().values(), after().values()))
        t = interleaved({"before": before, "after": after}, repeat, "cpu")
    return {name: {**{k: summary(v) for k, v in t.items()}, "max_abs_diff": diff}}


def case_dyhead_block(repeat):
    block, pyramid = _dyhead_block("torchvision")

    def run(impl):
        for m in block.DyConv:
            m.conv.impl = impl
        return block(pyramid)

    return _block_pair(
        "DyHead block, 800x1333 pyramid (torchvision DCN -> sampling DCN)",
        lambda: run("torchvision"), lambda: run("sampling"), repeat,
    )


def case_dyhead_channels_last(repeat):
    block, pyramid = _dyhead_block("sampling")
    nchw = {"on": False}
    for m in block.DyConv:  # before: every DCN returned an NCHW copy
        m.conv.register_forward_hook(lambda mod, a, out: out.contiguous() if nchw["on"] else out)

    def run(before):
        nchw["on"], block.channels_last = before, not before
        return block(pyramid)

    return _block_pair(
        "DyHead block, 800x1333 pyramid, sampling DCN (NCHW copies -> channels-last)",
        lambda: run(True), lambda: run(False), repeat,
    )


CASES = {
    "sample_3d": case_sample_3d,
    "refinement_step": case_refinement_step,
    "deqdet_inference": case_deqdet_inference,
    "dyhead_block": case_dyhead_block,
    "dyhead_channels_last": case_dyhead_channels_last,
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = os.path.join(ROOT, "benchmarks", "results", "speedups.json")
    record = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    command = f"python benchmarks/speedups.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    for name in args.cases:
        before = load()
        rows = CASES[name](args.repeat)
        after = load()
        for row, value in rows.items():
            value.update(command=command, load_1min=[before, after], threads=args.threads)
            record["rows"][row] = value
            print(row, {k: v["median_s"] if isinstance(v, dict) else v for k, v in value.items()}, flush=True)
    record["machine"] = machine()
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    m = record["machine"]
    lines = [
        "# Speed-ups: before / after, interleaved in one process",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}. Median (min-max) seconds over the "
        "rounds after a warm-up round; 1-minute load average before -> after each case.",
        "",
        "| change | before (s) | after (s) | speed-up | max abs output diff | threads | load | command |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for row, v in record["rows"].items():
        b, a = v["before"], v["after"]
        lines.append(
            f"| {row} | {b['median_s']:.4f} ({b['min_s']:.4f}-{b['max_s']:.4f}) | {a['median_s']:.4f} "
            f"({a['min_s']:.4f}-{a['max_s']:.4f}) | {b['median_s'] / a['median_s']:.2f}x | "
            f"{v.get('max_abs_diff', '')} | {v['threads']} | {v['load_1min'][0]} -> {v['load_1min'][1]} | "
            f"`{v['command']}` |"
        )
    with open(os.path.join(ROOT, "benchmarks", "results", "speedups.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
