#!/usr/bin/env python
"""What each part of the combined detector's answer is worth: COCO AP of its dense head, of the DEQ
decoder's init stage and of the decoder's refined output, each without and with the decoder NMS, from
the same trained checkpoints.

    python benchmarks/decoder_stages.py --config-file configs/shapes/demo.yaml \\
        --weights s1=output/demo_s1/model_final.pth s2=output/demo_s2/model_final.pth --nms 1.0 0.5

For every checkpoint (``LABEL=PATH``) and every ``--nms`` threshold (``MODEL.DENSE_QUERY.DECODER_NMS_THRESH``:
1.0 = none) the rows are:

- ``dense head``: the dense detector's own detections (``INFERENCE_SOURCE dense``, its own NMS);
- ``init stage``: the decoder's first stage on the dense proposals, class prior added, scored and
  selected as the decoder's output is (top ``TEST.DETECTIONS_PER_IMAGE`` (query, class) pairs);
- ``refined``: the decoder's output after its fixed-point iterations (``MODEL.DEQDET.TOL`` /
  ``MAX_ITERS``), i.e. what the detector returns.

Evaluated on ``DATASETS.TEST[0]`` with the trainer's evaluator, on the CPU. Writes
``benchmarks/results/decoder_stages<tag>.{md,json}``. ``--opts`` overrides the config (e.g. a checkpoint
trained under other settings).

``--fixes`` adds to every row the AP with each error fixed from the ground truth
(:data:`deqdet.analysis.ORACLE_FIXES`: classes, boxes, ranking), which says what each kind of error
costs that answer, and a table of the decoder's localisation: for every query whose init-stage box has
IoU >= 0.5 with a ground-truth box, that IoU and the IoU of the same query's box with the same
ground-truth box after ``--trace-steps`` plain applications of the refinement stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "projects", "DEQDet")]

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset  # noqa: E402
from detectron2.structures import Boxes, BoxMode, pairwise_iou  # noqa: E402
from torch import nn  # noqa: E402

import deqdet  # noqa: E402, F401  (registers models and datasets)
from deqdet.analysis import ORACLE_FIXES, OracleFixEvaluator  # noqa: E402
from deqdet.engine import Trainer, build_config  # noqa: E402
from deqdet.evaluation import CheckedCOCOEvaluator  # noqa: E402
from deqdet.modeling.meta_arch import decoder_outputs  # noqa: E402

KEYS = ("AP", "AP50", "AP75")
ON_OBJECT_IOU = 0.5  # a query counts in the localisation table when its init box overlaps a box this much


class InitStage(nn.Module):
    """The combined detector answering with its decoder's init stage (inference only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        inputs = self.model.initial_queries(batched_inputs)
        out = self.model.decoder.init_stage(inputs.content, inputs.xyzr, inputs.features)
        logits = out.logits if inputs.prior is None else out.logits + inputs.prior
        return decoder_outputs(
            {"logits": logits, "boxes": out.boxes}, batched_inputs, inputs.images.image_sizes,
            self.model.dense.max_detections_per_image, self.model.decoder_nms_thresh,
        )


def ground_truth(dataset: str) -> dict:
    """``image_id`` -> (boxes (G, 4) XYXY, classes (G,)) of the dataset's non-crowd annotations."""
    truth = {}
    for record in DatasetCatalog.get(dataset):
        anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        truth[record["image_id"]] = (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                     torch.tensor([a["category_id"] for a in anns], dtype=torch.long))
    return truth


def evaluate(cfg, model: nn.Module, out_dir: str, truth: dict = None) -> dict:
    """AP / AP50 / AP75 of the model's ``instances``; with ``truth`` also the AP with each oracle fix."""
    dataset = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    evaluators = [Trainer.build_evaluator(cfg, dataset, output_folder=out_dir)]
    for name, fix in ORACLE_FIXES.items() if truth else ():
        coco = CheckedCOCOEvaluator(dataset, output_dir=os.path.join(out_dir, name),
                                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        evaluators.append(OracleFixEvaluator(coco, fix, truth, prefix=f"{name}_"))
    results = inference_on_dataset(model, loader, DatasetEvaluators(evaluators))
    row = {k: round(results["bbox"][k], 1) for k in KEYS}
    for name in ORACLE_FIXES if truth else ():
        row[f"AP, {name} fixed"] = round(results[f"{name}_bbox"]["AP"], 1)
    return row


@torch.no_grad()
def localisation(cfg, model: nn.Module, truth: dict, steps: int) -> dict:
    """Per query on an object (init box IoU >= ON_OBJECT_IOU with a ground-truth box): its IoU with that box
    at the init stage and after ``steps`` applications of the refinement stage; their means, the share of
    queries the refinement moved closer, and the shares at IoU >= 0.75 / 0.9."""
    before, after = [], []
    for batch in Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]):
        inputs = model.initial_queries(batch)
        states = model.decoder.trace(inputs.content, inputs.xyzr, inputs.features, steps)
        for i, (x, (h, w)) in enumerate(zip(batch, inputs.images.image_sizes)):
            gt_boxes = truth[x["image_id"]][0]
            if not len(gt_boxes):
                continue
            to_original = gt_boxes.new_tensor([x["width"] / w, x["height"] / h] * 2)
            init = pairwise_iou(Boxes(states[0]["boxes"][i].float() * to_original), Boxes(gt_boxes))
            refined = pairwise_iou(Boxes(states[-1]["boxes"][i].float() * to_original), Boxes(gt_boxes))
            best, index = init.max(dim=1)
            on_object = (best >= ON_OBJECT_IOU).nonzero().flatten()
            before.append(best[on_object])
            after.append(refined[on_object, index[on_object]])
    before, after = torch.cat(before), torch.cat(after)
    share = lambda x: round(x.float().mean().item() * 100, 1)  # noqa: E731
    return {"queries": len(before), "mean IoU init": round(before.mean().item(), 3),
            "mean IoU refined": round(after.mean().item(), 3), "% moved closer": share(after > before),
            "% IoU >= 0.75 init / refined": f"{share(before >= 0.75)} / {share(after >= 0.75)}",
            "% IoU >= 0.9 init / refined": f"{share(before >= 0.9)} / {share(after >= 0.9)}"}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", nargs="+", required=True, metavar="LABEL=PATH")
    parser.add_argument("--nms", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--fixes", action="store_true",
                        help="add the AP with each error fixed and the decoder's localisation table")
    parser.add_argument("--trace-steps", type=int, default=2,
                        help="applications of the refinement stage in the localisation table (the trained "
                             "depth of the shapes configs: 2)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    # each row sets the model's inference source itself; the evaluator scores its "instances"
    cfg = build_config(args.config_file,
                       args.opts + ["MODEL.DEVICE", "cpu", "MODEL.DENSE_QUERY.INFERENCE_SOURCE", "decoder"])
    if cfg.MODEL.META_ARCHITECTURE != "DenseQueryDetector":
        raise SystemExit(f"{args.config_file}: MODEL.META_ARCHITECTURE must be DenseQueryDetector")
    work = os.path.join(ROOT, "output", "decoder_stages")
    truth = ground_truth(cfg.DATASETS.TEST[0]) if args.fixes else None
    results, localised = {}, {}
    for spec in args.weights:
        label, _, path = spec.rpartition("=")
        label = label or path
        if not os.path.isfile(path):
            raise SystemExit(f"--weights: checkpoint not found: {path}")
        model = Trainer.build_model(cfg).eval()
        DetectionCheckpointer(model).load(path)
        rows = {}
        with torch.no_grad():
            model.inference_source = "dense"
            rows["dense head"] = evaluate(cfg, model, work, truth)
            model.inference_source = "decoder"
            for nms in args.nms:
                model.decoder_nms_thresh = nms
                suffix = "" if nms >= 1.0 else f", NMS {nms}"
                rows[f"init stage{suffix}"] = evaluate(cfg, InitStage(model), work, truth)
                rows[f"refined{suffix}"] = evaluate(cfg, model, work, truth)
        results[label] = rows
        print(label, json.dumps(rows), flush=True)
        if args.fixes:
            localised[label] = localisation(cfg, model, truth, args.trace_steps)
            print(label, json.dumps(localised[label]), flush=True)
    write(args, results, localised)


def write(args, results: dict, localised: dict):
    labels = list(results)
    rows = list(results[labels[0]])
    fixed = [k for k in results[labels[0]][rows[0]] if k not in KEYS]
    lines = [
        "# The combined detector's parts, from the same checkpoints",
        "",
        f"Command: `python benchmarks/decoder_stages.py {shlex.join(sys.argv[1:])}`",
        "",
        "AP / AP50 / AP75 on the test split"
        + (f"; then the AP with the {', '.join(ORACLE_FIXES)} fixed from the ground truth" if fixed else "")
        + "; one column per checkpoint.",
        "",
        "| answer | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for row in rows:
        cells = [" / ".join(f"{results[lb][row][k]:.1f}" for k in KEYS) for lb in labels]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
        if fixed:
            cells = [" / ".join(f"{results[lb][row][k]:.1f}" for k in fixed) for lb in labels]
            lines.append(f"| {row}: {' / '.join(fixed)} | " + " | ".join(cells) + " |")
    if localised:
        lines += ["", f"Queries on an object (init box IoU >= {ON_OBJECT_IOU}), init stage against "
                  f"{args.trace_steps} applications of the refinement stage:", "",
                  "| | " + " | ".join(localised) + " |", "|---|" + "---|" * len(localised)]
        for key in localised[labels[0]]:
            lines.append(f"| {key} | " + " | ".join(str(localised[lb][key]) for lb in localised) + " |")
    out = os.path.join(ROOT, "benchmarks", "results", f"decoder_stages{args.tag}")
    with open(out + ".json", "w") as f:
        json.dump({"command": sys.argv[1:], "results": results, "localisation": localised}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
