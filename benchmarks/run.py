#!/usr/bin/env python
"""Speed and memory of DEQDet, AdaMixer, ATSS (+ DyHead) and Detectron2's own detectors, side by side.

    make bench                                  # python benchmarks/run.py: the full run (< 30 min, 2 cores)
    make bench BENCH_ARGS=--quick               # batch 1, 2 rounds, memory at the shapes size only
    python benchmarks/run.py --models deqdet_r50 adamixer_r50 --sizes 800x1216 --only memory --train-batch 2
    python benchmarks/run.py --device cuda
    python benchmarks/run.py --sizes 800x1333 --only latency step --batches 1 --autocast bfloat16

Models (random weights, R50, no downloads): see :data:`MODELS`. For each size (``HxW``; ``shapes``
is the `shapes` test size) it measures

* ``params``: parameters; ``flops``: fvcore's count of one batch-1 inference (one multiply-add = one
  flop, its convention; deformable convolutions counted as the 3x3 convolution they compute;
  operators fvcore cannot count are listed);
* ``latency``: eval-mode inference of batch 1 and 4 random images, every model once per round, rounds
  repeated (``--repeat``, after a warm-up round), so machine load hits all models alike and the ratios
  are fair; median, min and max per model (at the second size, batch 4 skips the warm-up round and
  DEQDet's inference-only variants: see :func:`latency`);
* ``step``: one DEQDet refinement step (100 queries) against the R50 backbone's forward, interleaved
  (and the step through ``torch.compile`` when ``deqdet_r50_compiled`` is measured);
* ``train``: one training step (forward + backward, ``--train-batch`` images with 8 random boxes
  each), interleaved like the latency;
* ``memory``: peak memory of one training step (after a warm-up step at the first size; the first
  step at later sizes), each model in its own subprocess: on CPU the
  process's resident high-water mark (whole process, and its rise during the step) and the peak
  bytes of tensors saved for backward (device independent); on CUDA ``torch.cuda.max_memory_allocated``.

Writes ``benchmarks/results/<tag>.json``, ``<tag>.md`` and ``<tag>.png`` (tag ``bench``, or
``bench_quick`` with ``--quick``), stamped with the machine, versions, command line, the seconds each
phase took and the 1-minute load average before and after it. The JSON holds a list of runs: one,
or with ``--append`` the tag's earlier runs too (a run with the same command is replaced), so that
runs of different models or phases on one machine share one file, each under its own heading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet")]

import torch  # noqa: E402

# name -> (config: a path in the repository or "zoo:" + a Detectron2 model-zoo config, overrides, label)
MODELS = {
    "deqdet_r50": ("configs/deqdet_r50_1x.yaml", [], "DEQDet R50, 20 + 1 steps"),
    "deqdet_r50_tol": ("configs/deqdet_r50_1x.yaml", ["MODEL.DEQDET.TOL", "0.3"], "DEQDet R50, TOL 0.3"),
    "deqdet_r50_compiled": (
        "configs/deqdet_r50_1x.yaml",
        ["MODEL.DEQDET.COMPILE", "True"],
        "DEQDet R50, 20 + 1 steps, compiled stage",
    ),
    "deqdet_r50_graph": (
        "configs/deqdet_r50_1x.yaml",
        ["MODEL.DEQDET.CUDA_GRAPH", "True"],
        "DEQDet R50, 20 + 1 steps, CUDA graph",
    ),
    "deqdet_r50_compiled_graph": (
        "configs/deqdet_r50_1x.yaml",
        ["MODEL.DEQDET.COMPILE", "True", "MODEL.DEQDET.CUDA_GRAPH", "True"],
        "DEQDet R50, 20 + 1 steps, compiled stage in a CUDA graph",
    ),
    "adamixer_r50": ("configs/adamixer_r50_1x.yaml", [], "AdaMixer R50, 6 stages"),
    "atss_r50": ("configs/atss_r50_fpn_1x.yaml", [], "ATSS R50, 4-conv towers"),
    "atss_dyhead_r50": ("configs/dyhead_r50_atss_fpn_1x.yaml", [], "ATSS R50 + 6 DyHead blocks"),
    "dense_query_r50": ("configs/deqdet_dyhead_r50_1x.yaml", [], "DyHead RetinaNet + DEQ decoder R50"),
    "dense_query_r50_2steps": (
        "configs/deqdet_dyhead_r50_1x.yaml",
        ["MODEL.DEQDET.TOL", "0.0", "MODEL.DEQDET.MAX_ITERS", "1"],
        "DyHead RetinaNet + DEQ decoder R50, init + 2 steps (the shapes flagship's test depth)",
    ),
    "faster_rcnn_r50": ("zoo:COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", [], "Faster R-CNN R50-FPN"),
    "retinanet_r50": ("zoo:COCO-Detection/retinanet_R_50_FPN_1x.yaml", [], "RetinaNet R50-FPN"),
}
# Variants timed at inference only (their base model has the train / memory rows).
INFERENCE_VARIANTS = {
    "deqdet_r50_tol", "deqdet_r50_compiled", "deqdet_r50_graph", "deqdet_r50_compiled_graph",
    "dense_query_r50_2steps",
}
# Measured on CUDA only: the CUDA graphs.
CUDA_ONLY = {"deqdet_r50_graph", "deqdet_r50_compiled_graph"}
SIZES = {"800x1333": (800, 1333), "shapes": (256, 352)}
PHASES = ("flops", "latency", "step", "train", "memory")
REFERENCE = "faster_rcnn_r50"


def model_label(name: str) -> str:
    """A model's label in the tables (its name if no longer in :data:`MODELS`, for older results)."""
    return MODELS[name][2] if name in MODELS else name


def parse_size(text: str):
    if text in SIZES:
        return SIZES[text]
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes: expected HxW or one of {list(SIZES)}, got {text!r}"
        ) from None
    return h, w


def size_name(hw) -> str:
    return next((k for k, v in SIZES.items() if tuple(v) == tuple(hw)), f"{hw[0]}x{hw[1]}")


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------------- models
def build(name: str, device: str):
    """(model in eval mode on ``device``, cfg)."""
    from detectron2 import model_zoo
    from detectron2.modeling import build_model

    from deqdet.engine import build_config

    config, opts, _ = MODELS[name]
    path = model_zoo.get_config_file(config[4:]) if config.startswith("zoo:") else os.path.join(ROOT, config)
    cfg = build_config(path, [*opts, "MODEL.DEVICE", device, "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def unavailable(name: str, device: str):
    """Why ``name`` cannot be measured on ``device`` (None if it can)."""
    config = MODELS[name][0]
    if not (config.startswith("zoo:") or os.path.isfile(os.path.join(ROOT, config))):
        return f"no {config}"
    if name in CUDA_ONLY and not device.startswith("cuda"):
        return "measured on CUDA only"
    return None


def images(batch: int, hw, device: str, with_targets: bool = False, seed: int = 0):
    """``batch`` random uint8-valued images of size ``hw`` (and 8 random boxes of 8 classes each)."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = hw
    out = []
    for _ in range(batch):
        x = {
            "image": torch.randint(0, 256, (3, h, w), generator=g).float().to(device),
            "height": h,
            "width": w,
        }
        if with_targets:
            inst = Instances((h, w))
            xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = torch.tensor([w, h]) * (0.05 + 0.25 * torch.rand(8, 2, generator=g))
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
            inst.gt_classes = torch.randint(0, 8, (8,), generator=g)
            x["instances"] = inst.to(device)
        out.append(x)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


AUTOCAST = {"dtype": None}  # --autocast: the dtype the timed phases run under (None: off)


def timed(fn, device: str) -> float:
    dtype = AUTOCAST["dtype"]
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.split(":")[0], dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict, rounds: int, device: str, warm_up: bool = True) -> dict:
    """{name: fn} -> {name: [seconds of each measured round]}: each round runs every fn; with ``warm_up``
    an unmeasured round comes first."""
    times = {k: [] for k in fns}
    for r in range(rounds + warm_up):
        for name, fn in fns.items():
            t = timed(fn, device)
            if r or not warm_up:
                times[name].append(t)
    return times


def summary(seconds) -> dict:
    return {
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
        "all_s": [round(s, 4) for s in seconds],
    }


# ------------------------------------------------------------------------------------------- phases
def _deform_conv_flops(inputs, outputs) -> int:
    """fvcore's count of torchvision::deform_conv2d(input, weight, offset, mask, bias, ...): the 3x3
    convolution it computes, C_in * 9 multiply-adds per output value."""
    weight_shape = inputs[1].type().sizes()
    out_shape = outputs[0].type().sizes()
    return math.prod(out_shape) * math.prod(weight_shape[1:])


def flops(models: dict, hw, device: str) -> dict:
    from detectron2.utils.analysis import FlopCountAnalysis

    from deqdet.modeling.dyhead.dyconv import ModulatedDeformConv3x3

    out = {}
    for name, model in models.items():
        dcns = [m for m in model.modules() if isinstance(m, ModulatedDeformConv3x3)]
        impls = [m.impl for m in dcns]
        for m in dcns:  # fvcore counts torchvision's deform_conv2d (with the handle below), not the gathers
            m.impl = "torchvision"
        solver = getattr(getattr(model, "decoder", None), "inference", None)
        # fvcore traces the plain stage, not its compiled or CUDA-graph form (same operations).
        accelerated = {k: getattr(solver, k) for k in ("compile_stage", "cuda_graph") if hasattr(solver, k)}
        for key in accelerated:
            setattr(solver, key, False)
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, images(1, hw, device))
            analysis.set_op_handle("torchvision::deform_conv2d", _deform_conv_flops)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = analysis.total()
            unsupported = dict(analysis.unsupported_ops())
        for m, impl in zip(dcns, impls):
            m.impl = impl
        for key, value in accelerated.items():
            setattr(solver, key, value)
        out[name] = {"gflops": round(total / 1e9, 1), "unsupported_ops": unsupported}
        print(f"  flops {name}: {out[name]['gflops']} G", flush=True)
    return out


def latency(models: dict, hw, batches, repeat: int, device: str, first_size: bool = True) -> dict:
    """Interleaved inference latency per batch size. At a size after the first (``first_size`` False),
    batches after the first skip the inference-only DEQDet variants and the warm-up round (the first
    batch size warmed the models up at this size; the median of the rounds absorbs what a new batch
    shape costs once): what keeps the full 2-core CPU run within half an hour."""
    out = {}
    for i, batch in enumerate(batches):
        inputs = images(batch, hw, device)
        short = not first_size and i > 0
        timed_models = {k: m for k, m in models.items() if not (short and k in INFERENCE_VARIANTS)}
        with torch.no_grad():
            times = interleaved(
                {k: (lambda m=m, x=inputs: m(x)) for k, m in timed_models.items()},
                repeat,
                device,
                warm_up=not short,
            )
        out[f"batch{batch}"] = {k: summary(v) for k, v in times.items()}
        print(
            f"  latency batch {batch}: "
            + ", ".join(f"{k} {v['median_s']:.3f}s" for k, v in out[f"batch{batch}"].items()),
            flush=True,
        )
    return out


def refinement_step(model, hw, repeat: int, device: str, compiled=None) -> dict:
    """One refinement step of a DEQDet model (its queries, batch 1) vs its backbone's forward; with
    ``compiled`` (the same model with ``MODEL.DEQDET.COMPILE``) its compiled step too."""
    with torch.no_grad():
        batch = model.preprocess_image(images(1, hw, device))
        features = model.neck(model.backbone(batch.tensor))
        content, xyzr = model.queries(batch.image_sizes)
        init = model.decoder.init_stage(content, xyzr, features)
        content, xyzr = init.content, init.xyzr
        fns = {
            "backbone": lambda: model.backbone(batch.tensor),
            "neck": lambda: model.neck(model.backbone(batch.tensor)),
            "refinement_step": lambda: model.decoder.refine_stage(content, xyzr, features),
        }
        if compiled is not None:
            stage = compiled.decoder.inference.stage()
            fns["refinement_step_compiled"] = lambda: stage(content, xyzr, features)
        times = interleaved(fns, repeat, device)
    out = {k: summary(v) for k, v in times.items()}
    out["neck"] = summary([n - b for n, b in zip(times["neck"], times["backbone"])])  # neck alone, roughly
    out["queries"] = content.shape[1]
    out["step_over_backbone"] = round(out["refinement_step"]["median_s"] / out["backbone"]["median_s"], 4)
    if compiled is not None:
        out["compiled_step_over_backbone"] = round(
            out["refinement_step_compiled"]["median_s"] / out["backbone"]["median_s"], 4
        )
    print(f"  refinement step / backbone: {out['step_over_backbone']} "
          f"(compiled: {out.get('compiled_step_over_backbone')})", flush=True)
    return out


def train(models: dict, hw, batch: int, repeat: int, device: str) -> dict:
    from detectron2.utils.events import EventStorage

    inputs = images(batch, hw, device, with_targets=True)

    def step(model):
        sum(model(inputs).values()).backward()
        model.zero_grad(set_to_none=True)

    for m in models.values():
        m.train()
    try:
        with EventStorage(0):
            times = interleaved({k: (lambda m=m: step(m)) for k, m in models.items()}, repeat, device)
    finally:
        for m in models.values():
            m.eval()
    out = {k: summary(v) for k, v in times.items()}
    print("  train step: " + ", ".join(f"{k} {v['median_s']:.3f}s" for k, v in out.items()), flush=True)
    return out


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_child(name: str, hw, batch: int, device: str, steps: int) -> dict:
    """Run in a fresh process: peak memory and time of the last of ``steps`` training steps of ``name``."""
    from detectron2.utils.events import EventStorage

    from deqdet.memory import SavedTensorMeter

    model, _ = build(name, device)
    model.train()
    inputs = images(batch, hw, device, with_targets=True)
    result = {}
    with EventStorage(0):
        for _ in range(steps):  # the last step is measured; earlier ones warm up the allocator and oneDNN
            meter = SavedTensorMeter(skip=model.parameters())
            try:  # reset the resident high-water mark (Linux: "5" clears VmHWM)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                hwm_reset = True
            except OSError:
                hwm_reset = False
            rss_before = _rss_kib("VmRSS")
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                before_cuda = torch.cuda.memory_allocated()
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                sum(model(inputs).values()).backward()
            sync(device)
            seconds = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            result = {
                "step_s": round(seconds, 3),
                "saved_for_backward_mib": round(meter.peak / 2**20, 1),
                "rss_before_step_mib": round(rss_before / 1024, 1),
            }
            if hwm_reset:
                result["rss_step_peak_mib"] = round(_rss_kib("VmHWM") / 1024, 1)
                result["rss_step_rise_mib"] = round((_rss_kib("VmHWM") - rss_before) / 1024, 1)
            if device.startswith("cuda"):
                result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                result["cuda_step_rise_mib"] = round(
                    (torch.cuda.max_memory_allocated() - before_cuda) / 2**20, 1
                )
    return result


def memory(names, hw, batch: int, device: str, threads: int, steps: int) -> dict:
    out = {}
    for name in names:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-child",
            name,
            "--sizes",
            f"{hw[0]}x{hw[1]}",
            "--train-batch",
            str(batch),
            "--device",
            device,
            "--threads",
            str(threads),
            "--repeat",
            str(steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            out[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        else:
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {name}: {out[name]}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ reports
def machine() -> dict:
    import detectron2
    import fvcore  # noqa: F401
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
    }


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def targets(record: dict) -> list:
    """(target, measured figure, met) rows for the project's targets, from whatever was measured."""
    rows = []
    for size, res in record["sizes"].items():
        lat = res.get("latency", {}).get("batch1", {})
        med = {k: v["median_s"] for k, v in lat.items()}
        for name, goal in (("deqdet_r50", 1.0), ("deqdet_r50_compiled", 1.0), ("deqdet_r50_graph", 1.0),
                           ("deqdet_r50_compiled_graph", 1.0), ("deqdet_r50_tol", 0.8)):
            r = _ratio(med.get(name), med.get(REFERENCE))
            if r is not None:
                rows.append((f"{size}: {model_label(name)} / Faster R-CNN latency <= {goal}", r, r <= goal))
        for name in ("atss_dyhead_r50",):
            r = _ratio(med.get(name), med.get("atss_r50"))
            if r is not None:
                rows.append((f"{size}: {model_label(name)} / ATSS 4-conv latency <= 1.3", r, r <= 1.3))
        step = res.get("step")
        for key, label in (("step_over_backbone", ""), ("compiled_step_over_backbone", ", compiled")):
            if step and key in step:
                rows.append(
                    (
                        f"{size}: one refinement step ({step['queries']} queries{label}) / R50 backbone "
                        "<= 0.05",
                        step[key],
                        step[key] <= 0.05,
                    )
                )
        mem = res.get("memory", {})
        rss = () if record["device"].startswith("cuda") else ("rss_step_rise_mib",)  # host memory on CUDA
        for key in ("saved_for_backward_mib", *rss, "cuda_step_rise_mib"):
            r = _ratio(mem.get("deqdet_r50", {}).get(key), mem.get("adamixer_r50", {}).get(key))
            if r is not None:
                rows.append((f"{size}: DEQDet / AdaMixer training memory ({key}) <= 0.6", r, r <= 0.6))
    return rows


def markdown(runs: list) -> str:
    """The Markdown of a tag's runs: one run's header and tables, or each run under its own heading."""
    lines = [f"# Benchmark: {runs[0]['tag']}", ""]
    if len(runs) == 1:
        return "\n".join(lines + run_markdown(runs[0], "##")) + "\n"
    lines += [f"{len(runs)} runs, each with its own command, machine and load.", ""]
    for i, record in enumerate(runs, 1):
        lines += [f"## Run {i}: " + ", ".join(record["load"]), "", *run_markdown(record, "###")]
        if lines[-1]:
            lines.append("")
    return "\n".join(lines)


def run_markdown(record: dict, heading: str) -> list:
    """One run's lines: command, machine, versions, load, then a table per size and the targets, under
    ``heading`` ("##": level 2)."""
    m = record["machine"]
    lines = [
        f"Command: `{record['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), GPU: {m['gpu']}; device "
        f"`{record['device']}`  ",
        f"Versions: python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
        f"detectron2 {m['detectron2']}  ",
        "1-minute load average per phase (before -> after): "
        + "; ".join(f"{k} {v[0]} -> {v[1]}" for k, v in record["load"].items())
        + "  ",
        *(
            ["Seconds per phase: " + "; ".join(f"{k} {v}" for k, v in record["phase_s"].items())
             + f" (total {sum(record['phase_s'].values()) / 60:.1f} min)  "]
            if record.get("phase_s") else []
        ),
        f"Random weights; latency = median (min-max) over {record['repeat']} interleaved rounds after a "
        "warm-up round (at a size after the first, batch sizes after the first: no warm-up round and no "
        "inference-only DEQDet variants); training step and memory with "
        f"{record['train_batch']} images of 8 random boxes; memory of the last of the memory process's "
        "steps (`memory_steps` in the JSON: 2 at the first size, 1 after it)."
        + (f" Timed phases under `torch.autocast({record['autocast']})`; memory in float32."
           if record.get("autocast") else ""),
        "",
        *([record["note"], ""] if record.get("note") else []),
    ]
    if record.get("skipped"):
        lines += [f"Not measured: {record['skipped']}", ""]
    for size, res in record["sizes"].items():
        lat = res.get("latency", {})
        ref = lat.get("batch1", {}).get(REFERENCE, {}).get("median_s")
        lines += [f"{heading} {size} ({res['hw'][0]}x{res['hw'][1]})", ""]
        head = (
            ["model", "params (M)", "GFLOPs"]
            + [f"latency {b} (s)" for b in lat]
            + [
                "b1 / Faster R-CNN",
                "train step (s)",
                "saved for backward (MiB)",
                "RSS rise in step (MiB)",
                "peak RSS (MiB)",
            ]
        )
        if record["device"].startswith("cuda"):
            head.append("CUDA max allocated (MiB)")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in record["models"]:
            row = [
                model_label(name),
                f"{record['params_m'].get(name, '')}",
                f"{res.get('flops', {}).get(name, {}).get('gflops', '')}",
            ]
            for b in lat.values():
                s = b.get(name)
                row.append(f"{s['median_s']:.3f} ({s['min_s']:.3f}-{s['max_s']:.3f})" if s else "")
            b1 = lat.get("batch1", {}).get(name, {}).get("median_s")
            row.append(f"{_ratio(b1, ref)}" if b1 and ref else "")
            tr = res.get("train", {}).get(name)
            mem = res.get("memory", {}).get(name, {})
            row.append(f"{tr['median_s']:.3f}" if tr else f"{mem['step_s']} *" if "step_s" in mem else "")
            keys = ["saved_for_backward_mib", "rss_step_rise_mib", "rss_step_peak_mib"]
            if record["device"].startswith("cuda"):
                keys.append("cuda_max_allocated_mib")
            row += [f"{mem[k]}" if k in mem else mem.get("error", "")[:60] for k in keys]
            lines.append("| " + " | ".join(row) + " |")
        step = res.get("step")
        if step:
            lines += [
                "",
                f"DEQDet refinement step ({step['queries']} queries, batch 1): "
                f"{step['refinement_step']['median_s']:.4f} s; R50 backbone "
                f"{step['backbone']['median_s']:.3f} s (ratio {step['step_over_backbone']}); "
                f"channel mapper about {step['neck']['median_s']:.3f} s."
                + (
                    f" Compiled step (`MODEL.DEQDET.COMPILE`): "
                    f"{step['refinement_step_compiled']['median_s']:.4f} s "
                    f"(ratio {step['compiled_step_over_backbone']})."
                    if "refinement_step_compiled" in step
                    else ""
                ),
            ]
        if any("step_s" in v for v in res.get("memory", {}).values()) and not res.get("train"):
            lines += ["", "\\* training step timed in the model's own memory process (not interleaved)."]
        unsupported = sorted({op for v in res.get("flops", {}).values() for op in v["unsupported_ops"]})
        if unsupported:
            lines += [
                "",
                "Operators fvcore does not count (so GFLOPs are lower bounds): " + ", ".join(unsupported),
            ]
        lines.append("")
    rows = targets(record)
    if rows:
        lines += [f"{heading} Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {v} | {'yes' if ok else 'no'} |" for t, v, ok in rows]
    return lines


def chart(runs: list, path: str) -> None:
    """Batch-1 latency bars, one panel per run and size that measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(i, record, size) for i, record in enumerate(runs, 1)
              for size, r in record["sizes"].items() if r.get("latency", {}).get("batch1")]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (i, record, size) in zip(axes[0], panels):
        lat = record["sizes"][size]["latency"]["batch1"]
        names = [n for n in record["models"] if n in lat]
        med = [lat[n]["median_s"] for n in names]
        err = [
            [lat[n]["median_s"] - lat[n]["min_s"] for n in names],
            [lat[n]["max_s"] - lat[n]["median_s"] for n in names],
        ]
        ax.barh([model_label(n) for n in names], med, xerr=err, color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("inference latency, batch 1 (s)")
        run = f"run {i}: " if len(runs) > 1 else ""
        ax.set_title(f"{run}{size}, {record['device']}, {record['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_runs(path: str) -> list:
    """The runs stored in a result JSON (none if the file does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=None,
        help=f"HxW or {list(SIZES)} (default: all; --quick: shapes, then 800x1333 at batch 1)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="measured rounds (default 3, --quick 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=(1, 4), help="inference batch sizes")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--autocast",
        choices=["bfloat16", "float16"],
        default=None,
        help="run the timed phases (latency, step, train) of every model under torch.autocast with "
        "this dtype (memory and FLOPs stay float32)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 1 only, 2 rounds; FLOPs and memory (one training step, its time in the "
        "table) at the first size only; no interleaved training rounds",
    )
    parser.add_argument("--tag", default=None, help="result file name (default bench / bench_quick)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the earlier runs in <tag>.json and add this one (replacing a run with the same command)",
    )
    parser.add_argument("--note", default="", help="a sentence printed with this run's figures")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    AUTOCAST["dtype"] = getattr(torch, args.autocast) if args.autocast else None
    sizes = args.sizes or [SIZES["shapes"], SIZES["800x1333"]]
    if args.memory_child:
        print(
            json.dumps(
                memory_child(args.memory_child, sizes[0], args.train_batch, args.device, args.repeat or 2)
            )
        )
        return
    repeat = args.repeat or (2 if args.quick else 3)
    tag = args.tag or ("bench_quick" if args.quick else "bench")
    reasons = {n: unavailable(n, args.device) for n in args.models}
    skipped = {n: why for n, why in reasons.items() if why}
    names = [n for n in args.models if n not in skipped]
    record = {
        "tag": tag,
        "command": " ".join(
            [
                "python",
                os.path.relpath(os.path.abspath(__file__), ROOT),
                *map(shlex.quote, argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "device": args.device,
        "autocast": args.autocast,
        "repeat": repeat,
        "train_batch": args.train_batch,
        "models": names,
        "skipped": ", ".join(f"{n} ({why})" for n, why in skipped.items()),
        "note": args.note,
        "machine": machine(),
        "load": {},
        "phase_s": {},
        "sizes": {},
    }
    print(f"models: {names}; skipped: {skipped or 'none'}", flush=True)
    models = {n: build(n, args.device)[0] for n in names}
    record["params_m"] = {
        n: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for n, m in models.items()
    }

    def phase(key, fn, *a):
        before, start = load(), time.perf_counter()
        result = fn(*a)
        record["load"][key] = (before, load())
        record["phase_s"][key] = round(time.perf_counter() - start, 1)
        return result

    base = os.path.join(RESULTS, tag)
    earlier = load_runs(base + ".json") if args.append else []
    slot = next((i for i, r in enumerate(earlier) if r["command"] == record["command"]), len(earlier))
    runs = earlier[:slot] + [record] + earlier[slot + 1:]

    def save():  # after every phase, so that an interrupted run leaves what it measured
        os.makedirs(RESULTS, exist_ok=True)
        with open(base + ".json", "w") as f:
            json.dump(runs, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown(runs))
        chart(runs, base + ".png")
        return base

    for i, hw in enumerate(sizes):
        name = size_name(hw)
        first = i == 0  # FLOPs and memory: every size (--quick: the first); interleaved training: the first
        res = record["sizes"][name] = {"hw": list(hw)}
        print(f"{name}:", flush=True)
        if "flops" in args.only and (first or not args.quick):
            res["flops"] = phase(f"{name} flops", flops, models, hw, args.device)
            save()
        if "latency" in args.only:
            batches = [1] if args.quick else args.batches
            res["latency"] = phase(
                f"{name} latency", latency, models, hw, batches, repeat, args.device, first
            )
            save()
        if "step" in args.only and "deqdet_r50" in models:
            res["step"] = phase(
                f"{name} step", refinement_step, models["deqdet_r50"], hw, repeat, args.device,
                models.get("deqdet_r50_compiled"),
            )
            save()
        if "train" in args.only and first and not args.quick:  # later sizes: the memory process times it
            trained = {k: m for k, m in models.items() if k not in INFERENCE_VARIANTS}
            res["train"] = phase(f"{name} train", train, trained, hw, args.train_batch, repeat, args.device)
            save()
        if "memory" in args.only and (first or not args.quick):
            # one warm-up step at the first size; later sizes (and --quick) measure the first step
            res["memory_steps"] = min(repeat, 2) if first and not args.quick else 1
            res["memory"] = phase(
                f"{name} memory",
                memory,
                [n for n in names if n not in INFERENCE_VARIANTS],
                hw,
                args.train_batch,
                args.device,
                args.threads,
                res["memory_steps"],
            )
            save()
    print(f"wrote {save()}.json, .md, .png", flush=True)


if __name__ == "__main__":
    main()
