#!/usr/bin/env python
"""Latency and throughput of YOUR model on YOUR images: a config + weights, run as
``DefaultPredictor`` runs it (test-time resize included), one image at a time.

    .venv/bin/python tools/measure_latency.py --config-file configs/shapes/demo.yaml \\
        --input photos/ --warmup 3 --repeat 2 --opts MODEL.WEIGHTS output/demo/model_final.pth

The first ``--warmup`` calls (on the first image) are not timed; then every image is run
``--repeat`` times. Prints the device, the per-image latency (mean, p50, p90, p99, min, max, in ms)
and the throughput (images/s); ``--json FILE`` also writes them. On CUDA every call is followed by
``torch.cuda.synchronize()``, so a latency is the whole call. Inputs that cannot be read are named
and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Dict, List

import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
import numpy as np
import torch

from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.inference import read_inputs
from deqdet.predictor import Predictor
from deqdet.quiet import silence_known_warnings


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="images: files, globs (quoted) or folders")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before measuring (default 3)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs over all images (default 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def measure(
    run: Callable[[np.ndarray], object],
    images: List[np.ndarray],
    *,
    warmup: int,
    repeat: int,
    synchronize: Callable[[], None],
) -> Dict[str, float]:
    """Time ``run(image)`` (followed by ``synchronize()``) on every image ``repeat`` times after
    ``warmup`` untimed calls; returns latency statistics in ms and throughput in images/s."""
    for _ in range(warmup):
        run(images[0])
        synchronize()
    times = []
    for _ in range(repeat):
        for image in images:
            start = time.perf_counter()
            run(image)
            synchronize()
            times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {
        "images": len(times),
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "images_per_s": float(len(times) / ms.sum() * 1000),
    }


def main(argv=None) -> int:
    silence_known_warnings()
    args = get_parser().parse_args(argv)
    if args.warmup < 0 or args.repeat < 1:
        print("error: --warmup must be >= 0 and --repeat >= 1", file=sys.stderr)
        return 2
    try:
        images = read_inputs(args.input, "BGR")
        cfg = build_config(args.config_file, args.opts)
        predictor = Predictor(cfg)
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    device = torch.device(cfg.MODEL.DEVICE)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        stats = measure(predictor, images, warmup=args.warmup, repeat=args.repeat, synchronize=synchronize)
    stats = {"device": str(device), "threads": torch.get_num_threads(), "warmup": args.warmup, **stats}
    print(
        f"{args.config_file} on {stats['device']} ({stats['threads']} threads), {len(images)} images x "
        f"{args.repeat}, {args.warmup} warm-up calls"
    )
    print(
        "latency ms: "
        + ", ".join(
            f"{k[:-3]} {stats[k]:.1f}" for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms")
        )
    )
    print(f"throughput: {stats['images_per_s']:.2f} images/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
