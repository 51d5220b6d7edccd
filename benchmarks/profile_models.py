#!/usr/bin/env python
"""Where the time goes: torch.profiler breakdowns of DEQDet (inference, training step) and DyHead.

    python benchmarks/profile_models.py deqdet-inference        # 800x1333, batch 1, 20 + 1 steps
    python benchmarks/profile_models.py deqdet-train            # shapes size (256x352), batch 2
    python benchmarks/profile_models.py dyhead                  # ATSS R50 + 6 DyHead blocks, 800x1333
    python benchmarks/profile_models.py deqdet-inference --size 512x704 --threads 1

Random weights (as ``benchmarks/run.py``). Parts are labelled from outside the model code: forward
hooks open a ``torch.profiler.record_function`` range around the backbone, the channel mapper, the
init stage, every call of the refinement stage (and inside a stage: self-attention, 3D sampling,
adaptive mixing, FFN), the DyHead blocks and their deformable convolutions; the matcher, the
criterion and the gradient stash's segment backward are wrapped the same way for the run. Writes
``benchmarks/results/profile_<what>.md``: inclusive time per part (a part contains its sub-parts), and
the operators with the most self time.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet"), os.path.join(ROOT, "benchmarks")]

import torch  # noqa: E402
from run import build, images, load, machine, parse_size  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402


def label_module(module, name):
    """Wrap every forward of ``module`` in a record_function range; ``name`` may be a callable."""
    open_ranges = []

    def pre(mod, args):
        rf = record_function(name() if callable(name) else name)
        rf.__enter__()
        open_ranges.append(rf)

    def post(mod, args, out):
        open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def label_method(owner, attr, name):
    """Wrap ``owner.attr`` (a function or method) in a record_function range."""
    original = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        with record_function(name):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapped)


def label_stage_parts(stage, prefix=""):
    label_module(stage.attention, prefix + "stage: self-attention")
    label_module(stage.mixing, prefix + "stage: adaptive mixing")
    label_module(stage.ffn, prefix + "stage: FFN")
    label_module(stage.sampling_offsets, prefix + "stage: sampling offsets")


def instrument_deqdet(model):
    from deqdet.modeling.deq import stash
    from deqdet.modeling.query import criterion, matcher, stage

    label_module(model.backbone, "backbone (R50)")
    label_module(model.neck, "neck (channel mapper)")
    label_module(model.decoder.init_stage, "init stage")
    calls = collections.Counter()

    def refine_name():
        grad = "with grad" if torch.is_grad_enabled() else "no grad"
        calls[grad] += 1
        return f"refinement step ({grad}) #{calls[grad]}"

    label_module(model.decoder.refine_stage, refine_name)
    for s in (model.decoder.init_stage, model.decoder.refine_stage):
        label_stage_parts(s)
    label_method(stage, "sample_3d", "stage: 3D sampling (grid_sample)")
    label_method(matcher.HungarianMatcher, "__call__", "Hungarian matcher")
    label_method(criterion.SetCriterion, "single", "losses (incl. matcher)")
    label_method(stash.GradientStash, "backward", "segment backward (gradient stash)")
    return calls


def instrument_dyhead(model):
    from deqdet.modeling.dyhead.dyconv import DeformConvGN, DyReLU

    label_module(model.backbone.backbone, "backbone + FPN")
    for i, block in enumerate(model.backbone.dyhead_tower):
        label_module(block, f"DyHead block {i + 1}")
        label_module(block.offset, "block: offset/mask conv")
    for m in model.modules():
        if isinstance(m, DeformConvGN):
            label_module(m.conv, "block: deformable conv")
            label_module(m.bn, "block: GroupNorm")
        if isinstance(m, DyReLU):
            label_module(m, "block: DyReLU")
    label_module(model.head, "ATSS head")


def breakdown(prof, total_us: float) -> list:
    """Rows (part, calls, inclusive ms, % of total) for the labelled ranges; numbered refinement steps
    are also summed per kind."""
    sums, counts = collections.defaultdict(float), collections.Counter()
    for evt in prof.events():
        if evt.device_type.name != "CPU" or "::" in evt.name or " " not in evt.name:  # labels have spaces
            continue
        name = evt.name
        sums[name] += evt.cpu_time_total
        counts[name] += 1
        if name.startswith("refinement step"):
            kind = name.split(" #")[0] + ", all calls"
            sums[kind] += evt.cpu_time_total
            counts[kind] += 1
    return [
        (k, counts[k], sums[k] / 1e3, 100 * sums[k] / total_us) for k in sums if not k.startswith("Profiler")
    ]


def write(what, prof, wall_s, loads):
    total_us = wall_s * 1e6
    rows = breakdown(prof, total_us)
    stepwise = sorted(
        [r for r in rows if "#" in r[0]], key=lambda r: (r[0].split(" #")[0], int(r[0].split("#")[1]))
    )
    parts = sorted([r for r in rows if "#" not in r[0]], key=lambda r: -r[2])
    m = machine()
    lines = [
        f"# Profile: {what}",
        "",
        f"Command: `python benchmarks/profile_models.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; torch {m['torch']}; "
        f"1-minute load average {loads[0]} before, {loads[1]} after  ",
        f"Profiled wall time of the measured call: {wall_s:.3f} s (profiler overhead included). "
        "Times are inclusive (a part contains its sub-parts: stage parts are inside the steps).",
        "",
        "| part | calls | ms | % of the call |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {p} | {c} | {ms:.1f} | {pct:.1f} |" for p, c, ms, pct in parts]
    if stepwise:
        lines += ["", "<details><summary>each refinement step</summary>", "", "| step | ms |", "|---|---:|"]
        lines += [f"| {p} | {ms:.1f} |" for p, _, ms, _ in stepwise]
        lines += ["", "</details>"]
    lines += [
        "",
        "Operators with the most self CPU time:",
        "",
        "```",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40),
        "```",
    ]
    path = os.path.join(ROOT, "benchmarks", "results", f"profile_{what.replace('-', '_')}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["deqdet-inference", "deqdet-train", "dyhead"])
    parser.add_argument("--size", type=parse_size, default=None, help="HxW (default: see above)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = args.what == "deqdet-train"
    hw = args.size or ((256, 352) if train else (800, 1333))
    batch = args.batch or (2 if train else 1)
    model, _ = build("atss_dyhead_r50" if args.what == "dyhead" else "deqdet_r50", "cpu")
    inputs = images(batch, hw, "cpu", with_targets=train)
    if args.what == "dyhead":
        instrument_dyhead(model)
    else:
        calls = instrument_deqdet(model)

    def run():
        if not train:
            with torch.no_grad():
                return model(inputs)
        from detectron2.utils.events import EventStorage

        model.train()
        with EventStorage(0):
            losses = model(inputs)
            with record_function("backward (trainer's)"):
                sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)

    run()  # warm-up
    if args.what != "dyhead":
        calls.clear()
    loads = [load()]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    loads.append(load())
    write(args.what, prof, wall, loads)


if __name__ == "__main__":
    main()
