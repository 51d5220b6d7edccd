#!/usr/bin/env python
"""What each part of the combined detector's answer is worth: COCO AP of its dense head, of the DEQ
decoder's init stage and of the decoder's refined output, each without and with the decoder NMS, from
the same trained checkpoints.

    python benchmarks/decoder_stages.py --config-file configs/shapes/demo.yaml \\
        --weights s1=output/demo_s1/model_final.pth s2=output/demo_s2/model_final.pth --nms 1.0 0.5

For every checkpoint (``LABEL=PATH``) and every ``--nms`` threshold (``MODEL.DENSE_QUERY.DECODER_NMS_THRESH``:
1.0 = none) the rows are:

- ``dense head``: the dense detector's own detections (``INFERENCE_SOURCE dense``, its own NMS);
- ``init stage``: the detector answering with its DEQ decoder's init stage (``MODEL.DEQDET.TEST_OUTPUT
  init``: the first stage on the dense proposals, class prior added, scored and selected as any answer);
- ``refined``: the decoder's output after its fixed-point iterations (``TEST_OUTPUT refined``,
  ``MODEL.DEQDET.TOL`` / ``MAX_ITERS``).

Evaluated on ``DATASETS.TEST[0]`` with the trainer's evaluator, on the CPU. Writes
``benchmarks/results/decoder_stages<tag>.{md,json}``. ``--opts`` overrides the config (e.g. a checkpoint
trained under other settings).

``--fixes`` adds to every row the AP with each error fixed from the ground truth
(:data:`deqdet.analysis.ORACLE_FIXES`: classes, boxes, ranking), which says what each kind of error
costs that answer, and a table of the decoder's localisation (:func:`localisation`): for every query
whose dense proposal has IoU >= 0.5 with a ground-truth box, the IoU of the proposal, of the init
stage's box and of the box after ``--trace-steps`` plain applications of the refinement stage with that
ground-truth box, and how much of a ``--jitter`` of the boxes each stage corrects.
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
from deqdet.analysis import ORACLE_FIXES, FirstHitEvaluator, OracleFixEvaluator  # noqa: E402
from deqdet.engine import Trainer, build_config  # noqa: E402
from deqdet.evaluation import CheckedCOCOEvaluator  # noqa: E402
from deqdet.modeling.query.boxes import xyxy_to_xyzr, xyzr_to_xyxy  # noqa: E402

KEYS = ("AP", "AP50", "AP75")
FIRST_HIT = "first hit"  # the row entry of FirstHitEvaluator's summary
ON_OBJECT_IOU = 0.5  # a query counts in the localisation table when its proposal overlaps a box this much


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
    if truth:
        evaluators.append(FirstHitEvaluator(truth))
    results = inference_on_dataset(model, loader, DatasetEvaluators(evaluators))
    row = {k: round(results["bbox"][k], 1) for k in KEYS}
    for name in ORACLE_FIXES if truth else ():
        row[f"AP, {name} fixed"] = round(results[f"{name}_bbox"]["AP"], 1)
    if truth:
        row[FIRST_HIT] = {k: round(v, 3 if "IoU" in k and "%" not in k else 1)
                          for k, v in results["first_hit"].items()}
    return row


def jittered(xyzr: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """(B, N, 4) xyzr with each corner moved by ``sigma`` x its box's width / height x N(0, 1), corners kept
    in order and at least 1 px apart."""
    xyxy = xyzr_to_xyxy(xyzr)
    wh = xyxy[..., 2:] - xyxy[..., :2]
    noise = torch.randn(xyxy.shape, generator=generator).to(xyxy)
    corners = xyxy + sigma * torch.cat([wh, wh], dim=-1) * noise
    low = torch.minimum(corners[..., :2], corners[..., 2:])
    high = torch.maximum(torch.maximum(corners[..., :2], corners[..., 2:]), low + 1.0)
    return xyxy_to_xyzr(torch.cat([low, high], dim=-1))


@torch.no_grad()
def localisation(cfg, model: nn.Module, truth: dict, steps: int, sigma: float) -> dict:
    """Per query on an object (its dense proposal has IoU >= ON_OBJECT_IOU with a ground-truth box), the IoU
    with that box of: the proposal, the init stage's box, the box after ``steps`` applications of the
    refinement stage; and, to see whether a stage corrects boxes at all, the init stage's box from the
    proposal jittered by ``sigma`` of its size, and one application of the refinement stage to the init
    stage's box so jittered. Returns the means, the share of queries the refinement moved closer, the
    shares at IoU >= 0.75 / 0.9 and the share of the IoU lost to each jitter that the stage won back."""
    generator = torch.Generator().manual_seed(0)
    ious = {k: [] for k in ("proposal", "init", "refined", "jittered proposal", "init stage on it",
                            "jittered init box", "refinement on it")}
    for batch in Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]):
        inputs = model.initial_queries(batch)
        decoder, features = model.decoder, inputs.features
        init = decoder.init_stage(inputs.content, inputs.xyzr, features)
        state = init
        for _ in range(steps):  # plain applications of f, as at test time with TOL 0
            state = decoder.refine_stage(state.content, state.xyzr, features)
        noisy_proposals = jittered(inputs.xyzr, sigma, generator)
        noisy_init = jittered(init.xyzr, sigma, generator)
        boxes = {
            "proposal": xyzr_to_xyxy(inputs.xyzr), "init": init.boxes, "refined": state.boxes,
            "jittered proposal": xyzr_to_xyxy(noisy_proposals),
            "init stage on it": decoder.init_stage(inputs.content, noisy_proposals, features).boxes,
            "jittered init box": xyzr_to_xyxy(noisy_init),
            "refinement on it": decoder.refine_stage(init.content, noisy_init, features).boxes,
        }
        for i, (x, (h, w)) in enumerate(zip(batch, inputs.images.image_sizes)):
            gt_boxes = truth[x["image_id"]][0]
            if not len(gt_boxes):
                continue
            to_original = gt_boxes.new_tensor([x["width"] / w, x["height"] / h] * 2)
            per_box = {k: pairwise_iou(Boxes(b[i].float() * to_original), Boxes(gt_boxes))
                       for k, b in boxes.items()}
            best, index = per_box["proposal"].max(dim=1)
            on_object = (best >= ON_OBJECT_IOU).nonzero().flatten()
            for k, iou in per_box.items():
                ious[k].append(iou[on_object, index[on_object]])
    m = {k: torch.cat(v) for k, v in ious.items()}
    mean = lambda k: round(m[k].mean().item(), 3)  # noqa: E731
    share = lambda x: round(x.float().mean().item() * 100, 1)  # noqa: E731
    won_back = lambda clean, noisy, out: round(  # noqa: E731
        100 * (m[out].mean() - m[noisy].mean()).item() / (m[clean].mean() - m[noisy].mean()).item(), 1)
    return {
        "queries": len(m["proposal"]),
        "mean IoU: dense proposal / init stage / refined":
            f"{mean('proposal')} / {mean('init')} / {mean('refined')}",
        "% the refinement moved closer": share(m["refined"] > m["init"]),
        "% IoU >= 0.75: init stage / refined": f"{share(m['init'] >= 0.75)} / {share(m['refined'] >= 0.75)}",
        "% IoU >= 0.9: init stage / refined": f"{share(m['init'] >= 0.9)} / {share(m['refined'] >= 0.9)}",
        f"init stage on proposals jittered by {sigma}: mean IoU jittered / out, % of the loss won back":
            f"{mean('jittered proposal')} / {mean('init stage on it')}, "
            f"{won_back('proposal', 'jittered proposal', 'init stage on it')}",
        f"one refinement step on init boxes jittered by {sigma}: mean IoU jittered / out, % won back":
            f"{mean('jittered init box')} / {mean('refinement on it')}, "
            f"{won_back('init', 'jittered init box', 'refinement on it')}",
    }


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
    parser.add_argument("--jitter", type=float, default=0.1,
                        help="the localisation table's box jitter, a fraction of each box's width / height")
    parser.add_argument("--tag", default="")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    # each row sets the model's inference source and the decoder's answer itself; the evaluator scores
    # its "instances"
    cfg = build_config(args.config_file,
                       args.opts + ["MODEL.DEVICE", "cpu", "MODEL.DENSE_QUERY.INFERENCE_SOURCE", "decoder"])
    if cfg.MODEL.META_ARCHITECTURE != "DenseQueryDetector" or cfg.MODEL.QUERY.DECODER != "DEQDecoder":
        raise SystemExit(f"{args.config_file}: needs MODEL.META_ARCHITECTURE DenseQueryDetector and "
                         "MODEL.QUERY.DECODER DEQDecoder")
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
                for answer, name in (("init", "init stage"), ("refined", "refined")):
                    model.decoder.test_output = answer  # MODEL.DEQDET.TEST_OUTPUT
                    rows[f"{name}{suffix}"] = evaluate(cfg, model, work, truth)
        results[label] = rows
        print(label, json.dumps(rows), flush=True)
        if args.fixes:
            localised[label] = localisation(cfg, model, truth, args.trace_steps, args.jitter)
            print(label, json.dumps(localised[label]), flush=True)
    write(args, results, localised)


def write(args, results: dict, localised: dict):
    labels = list(results)
    rows = list(results[labels[0]])
    fixed = [k for k in results[labels[0]][rows[0]] if k not in (*KEYS, FIRST_HIT)]
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
    if fixed:
        hit_keys = list(results[labels[0]][rows[0]][FIRST_HIT])
        lines += ["", "Each object's first hit (the highest-scored detection of its class with IoU >= 0.5 "
                  "with it, the one COCO's matching counts first) against the best-placed detection of its "
                  "class: "
                  + " / ".join(hit_keys) + ":", "",
                  "| answer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for row in rows:
            cells = [" / ".join(str(results[lb][row][FIRST_HIT][k]) for k in hit_keys) for lb in labels]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if localised:
        lines += ["", f"The decoder's boxes, per query on an object (dense proposal IoU >= {ON_OBJECT_IOU}; "
                  f"refined: {args.trace_steps} applications of the refinement stage):", "",
                  "| | " + " | ".join(localised) + " |", "|---|" + "---|" * len(localised)]
        for key in localised[labels[0]]:
            lines.append(f"| {key} | " + " | ".join(str(localised[lb][key]) for lb in localised) + " |")
    save(f"decoder_stages{args.tag}", {"results": results, "localisation": localised}, lines)


def save(name: str, payload: dict, lines: list) -> None:
    """Write ``benchmarks/results/<name>.json`` (``payload`` with the command line) and ``<name>.md``
    (``lines``), and print the Markdown."""
    out = os.path.join(ROOT, "benchmarks", "results", name)
    with open(out + ".json", "w") as f:
        json.dump({"command": sys.argv[1:], **payload}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
