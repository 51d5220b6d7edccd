#!/usr/bin/env python
"""Training-step time of the demo detector with the CPU speed options (stem type, channels-last).

    python benchmarks/cpu_speed_options.py --threads 2 --repeat 5

One forward + backward of configs/shapes/retinanet_demo.yaml's model on a synthetic batch (8 images of
224x304, 4 boxes each), each variant timed ``--repeat`` times interleaved with the others (so load
changes hit all alike); the median is reported. Writes benchmarks/results/cpu_speed_options.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "DEQDet"))

from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from deqdet.engine import Trainer, build_config  # noqa: E402

VARIANTS = {
    "basic stem": [],
    "basic stem, channels-last": ["MODEL.CHANNELS_LAST", "True"],
    "patch stem": ["MODEL.RESNETS.STEM_TYPE", "patch"],
    "patch stem, channels-last": ["MODEL.RESNETS.STEM_TYPE", "patch", "MODEL.CHANNELS_LAST", "True"],
}


def synthetic_batch(n=8, h=224, w=304):
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(n):
        inst = Instances((h, w))
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w - 60.0, h - 60.0])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 8 + 50 * torch.rand(4, 2, generator=g)], 1))
        inst.gt_classes = torch.randint(0, 8, (4,), generator=g)
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
        batch.append({"image": image, "instances": inst})
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = os.path.join(ROOT, "configs", "shapes", "retinanet_demo.yaml")
    # the demo's anchors and everything else stay; only the two options vary
    base = ["MODEL.DEVICE", "cpu", "MODEL.CHANNELS_LAST", "False", "MODEL.RESNETS.STEM_TYPE", "basic"]
    models = {
        name: Trainer.build_model(build_config(demo, base + opts)).train() for name, opts in VARIANTS.items()
    }
    batch = synthetic_batch()
    seconds = {name: [] for name in models}
    with EventStorage(0):
        for r in range(args.repeat + 1):
            for name, model in models.items():
                start = time.perf_counter()
                sum(model(batch).values()).backward()
                if r:  # the first round warms up
                    seconds[name].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
    result = {name: statistics.median(s) for name, s in seconds.items()}
    result["_note"] = (f"forward + backward, batch 8 at 224x304, {args.threads} thread(s), "
                       f"median of {args.repeat}")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "cpu_speed_options.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
