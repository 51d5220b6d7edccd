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
from detectron2.evaluation import inference_on_dataset  # noqa: E402
from torch import nn  # noqa: E402

import deqdet  # noqa: E402, F401  (registers models and datasets)
from deqdet.engine import Trainer, build_config  # noqa: E402
from deqdet.modeling.meta_arch import decoder_outputs  # noqa: E402

KEYS = ("AP", "AP50", "AP75")


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


def evaluate(cfg, model: nn.Module, out_dir: str) -> dict:
    dataset = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    evaluator = Trainer.build_evaluator(cfg, dataset, output_folder=out_dir)
    result = inference_on_dataset(model, loader, evaluator)["bbox"]
    return {k: round(result[k], 1) for k in KEYS}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", nargs="+", required=True, metavar="LABEL=PATH")
    parser.add_argument("--nms", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--tag", default="")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    # each row sets the model's inference source itself; the evaluator scores its "instances"
    cfg = build_config(args.config_file,
                       args.opts + ["MODEL.DEVICE", "cpu", "MODEL.DENSE_QUERY.INFERENCE_SOURCE", "decoder"])
    if cfg.MODEL.META_ARCHITECTURE != "DenseQueryDetector":
        raise SystemExit(f"{args.config_file}: MODEL.META_ARCHITECTURE must be DenseQueryDetector")
    work = os.path.join(ROOT, "output", "decoder_stages")
    results = {}
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
            rows["dense head"] = evaluate(cfg, model, work)
            model.inference_source = "decoder"
            for nms in args.nms:
                model.decoder_nms_thresh = nms
                suffix = "" if nms >= 1.0 else f", NMS {nms}"
                rows[f"init stage{suffix}"] = evaluate(cfg, InitStage(model), work)
                rows[f"refined{suffix}"] = evaluate(cfg, model, work)
        results[label] = rows
        print(label, json.dumps(rows), flush=True)
    write(args, results)


def write(args, results: dict):
    labels = list(results)
    rows = list(results[labels[0]])
    lines = [
        "# The combined detector's parts, from the same checkpoints",
        "",
        f"Command: `python benchmarks/decoder_stages.py {shlex.join(sys.argv[1:])}`",
        "",
        "AP / AP50 / AP75 on the test split; one column per checkpoint.",
        "",
        "| answer | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for row in rows:
        cells = [" / ".join(f"{results[lb][row][k]:.1f}" for k in KEYS) for lb in labels]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    out = os.path.join(ROOT, "benchmarks", "results", f"decoder_stages{args.tag}")
    with open(out + ".json", "w") as f:
        json.dump({"command": sys.argv[1:], "results": results}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
