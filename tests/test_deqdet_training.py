"""A short real training of the shapes DEQDet recipe (scaled down further) through train_net: the loss
falls, the final evaluation runs, and on the trained checkpoint the equilibrium residual decreases."""

import json
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

import train_net
from deq_helpers import SHAPES_CONFIG, TINY
from deqdet.engine import build_config

RUN = [
    *TINY, "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_train',)",
    "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "60", "TEST.DETECTIONS_PER_IMAGE", "12",
]


def test_short_deqdet_training_learns_and_converges(tmp_path):
    out = str(tmp_path)
    train_net.main(train_net.default_argument_parser().parse_args(["--config-file", SHAPES_CONFIG, *RUN, "OUTPUT_DIR", out]))
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], losses
    assert all(f"iter{i}_loss_cls" in metrics[0] for i in (1, 3, 6))  # every segment's loss is logged
    assert [m["bbox/AP"] for m in metrics if "bbox/AP" in m]  # the final evaluation ran

    cfg = build_config(SHAPES_CONFIG, [*RUN, "MODEL.DEQDET.MAX_ITERS", "12"])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(os.path.join(out, "model_final.pth"))
    records = DatasetCatalog.get("shapes_mini_val")[:4]
    inputs = [{"image": torch.as_tensor(read_image(r["file_name"], format="RGB").transpose(2, 0, 1).copy()).float()}
              for r in records]
    with torch.no_grad():
        residuals = torch.stack([o["residuals"] for o in model(inputs)])  # (4, 12)
    mean = residuals.mean(0)
    assert torch.isfinite(mean).all()
    assert mean[-1] < 0.5 * mean[0] and mean[6:].mean() < mean[:6].mean(), mean
