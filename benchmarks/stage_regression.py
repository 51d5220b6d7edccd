#!/usr/bin/env python
"""Can a decoder stage of the combined detector learn to correct its boxes, and under which box loss?

From a trained checkpoint of the combined detector (``DenseQueryDetector``), everything is frozen except
the decoder's init stage, which is trained for ``--steps`` batches of ``DATASETS.TRAIN`` on the dense
proposals jittered by ``--jitter`` of their width / height (the init stage's own inputs, moved by a known
error), with only a box loss, one of:

- ``set``: the detector's own set criterion, box terms only (``loss_l1`` + ``loss_giou`` of the queries
  the Hungarian matcher assigns one-to-one to the ground truth), as the recipe trains the stage;
- ``overlap``: the same two terms, weighted as the criterion weighs them, on every query whose clean
  proposal has IoU >= 0.5 with a ground-truth box, towards that box. (``MODEL.QUERY.BOX_LOSS_QUERIES
  overlapping``, the training option, picks its queries by their predicted box instead, which this
  test's jitter would decide; here the choice depends on the proposals alone.)

Reported: the mean IoU with their ground-truth box of those on-object queries, jittered and after the
init stage, over each window of ``--window`` steps (the stage's output on the batch it is about to
train on). A stage that learns to localise wins the jitter back. Writes
``benchmarks/results/stage_regression<tag>.{md,json}``.

    python benchmarks/stage_regression.py --config-file configs/shapes/demo.yaml \\
        --weights output/demo/model_final.pth --losses set overlap
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet"), os.path.join(ROOT, "benchmarks")]

import torch  # noqa: E402
from decoder_stages import ON_OBJECT_IOU, jittered, save  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.structures import Boxes, pairwise_iou  # noqa: E402
from torchvision.ops import generalized_box_iou_loss  # noqa: E402

import deqdet  # noqa: E402, F401  (registers models and datasets)
from deqdet.engine import Trainer, build_config  # noqa: E402
from deqdet.modeling.meta_arch import query_targets  # noqa: E402
from deqdet.modeling.query.boxes import xyzr_to_xyxy  # noqa: E402

LOSSES = ("set", "overlap")


def on_object(proposals: torch.Tensor, gt_boxes: torch.Tensor):
    """(N, 4) proposals, (G, 4) boxes -> (indices of the proposals with IoU >= ON_OBJECT_IOU, their box)."""
    if not len(gt_boxes):
        return torch.zeros(0, dtype=torch.long), gt_boxes
    best, index = pairwise_iou(Boxes(proposals), Boxes(gt_boxes)).max(dim=1)
    keep = (best >= ON_OBJECT_IOU).nonzero().flatten()
    return keep, gt_boxes[index[keep]]


def train(cfg, weights: str, loss: str, steps: int, sigma: float, window: int, seed: int) -> list:
    """Per window of steps: (mean IoU jittered, mean IoU after the init stage) of the on-object queries."""
    torch.manual_seed(seed)
    model = Trainer.build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    stage, criterion = model.decoder.init_stage, model.criterion
    optimizer = torch.optim.AdamW(stage.parameters(), lr=cfg.SOLVER.BASE_LR, weight_decay=0.0)
    loader, generator = iter(Trainer.build_train_loader(cfg)), torch.Generator().manual_seed(seed)
    curve, before, after = [], [], []
    for step in range(1, steps + 1):
        batch = next(loader)
        with torch.no_grad():
            inputs = model.initial_queries(batch)
            noisy = jittered(inputs.xyzr, sigma, generator)
        out = stage.train()(inputs.content, noisy, inputs.features)
        gts = [x["instances"].gt_boxes.tensor for x in batch]
        chosen = [on_object(xyzr_to_xyxy(inputs.xyzr[i]), g) for i, g in enumerate(gts)]
        boxes = torch.cat([out.boxes[i][keep] for i, (keep, _) in enumerate(chosen)])
        targets = torch.cat([target for _, target in chosen])
        noisy_boxes = torch.cat([xyzr_to_xyxy(noisy[i])[keep] for i, (keep, _) in enumerate(chosen)])
        if loss == "set":  # matched as in training: the class prior is part of the logits
            prediction = out.prediction()
            if inputs.prior is not None:
                prediction["logits"] = prediction["logits"] + inputs.prior
            sizes = inputs.images.image_sizes
            losses = criterion([prediction], [query_targets(x["instances"], s) for x, s in zip(batch, sizes)])
            total = losses["s0_loss_l1"] + losses["s0_loss_giou"]
        else:
            whwh = torch.cat([boxes.new_tensor([s[1], s[0]] * 2).expand(len(keep), 4)
                              for s, (keep, _) in zip(inputs.images.image_sizes, chosen)])
            n = max(len(boxes), 1)
            total = (criterion.l1_weight * ((boxes - targets) / whwh).abs().sum()
                     + criterion.giou_weight * generalized_box_iou_loss(boxes, targets, reduction="sum")) / n
        with torch.no_grad():
            before.append(torch.diag(pairwise_iou(Boxes(noisy_boxes), Boxes(targets))))
            after.append(torch.diag(pairwise_iou(Boxes(boxes.detach()), Boxes(targets))))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % window == 0:
            curve.append((round(torch.cat(before).mean().item(), 3),
                          round(torch.cat(after).mean().item(), 3)))
            before, after = [], []
            print(f"{loss} step {step}: mean IoU jittered {curve[-1][0]}, "
                  f"after the init stage {curve[-1][1]}", flush=True)
    return curve


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--tag", default="")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    cfg = build_config(args.config_file, args.opts + ["MODEL.DEVICE", "cpu"])
    if cfg.MODEL.META_ARCHITECTURE != "DenseQueryDetector":
        raise SystemExit(f"{args.config_file}: MODEL.META_ARCHITECTURE must be DenseQueryDetector")
    if not os.path.isfile(args.weights):
        raise SystemExit(f"--weights: checkpoint not found: {args.weights}")
    results = {
        f"{loss}, seed {seed}": train(cfg, args.weights, loss, args.steps, args.jitter, args.window, seed)
        for loss in args.losses for seed in args.seeds
    }
    windows = [f"steps {i * args.window + 1}-{(i + 1) * args.window}"
               for i in range(args.steps // args.window)]
    lines = [
        "# Can the init stage learn to correct jittered boxes, and under which box loss?", "",
        f"Command: `python benchmarks/stage_regression.py {shlex.join(sys.argv[1:])}`", "",
        "Mean IoU of the on-object queries with their ground-truth box: proposals jittered by "
        f"{args.jitter} of their size / the init stage's box, over each window of training steps.", "",
        "| box loss | " + " | ".join(windows) + " |", "|---|" + "---|" * len(windows),
    ]
    for name, curve in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in curve) + " |")
    save(f"stage_regression{args.tag}", {"windows": windows, "results": results}, lines)


if __name__ == "__main__":
    main()
