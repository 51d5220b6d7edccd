#!/usr/bin/env python
"""The main job (``make demo``): train the demo detector on ``shapes_train``, evaluate it on
``shapes_val`` with ``COCOEvaluator``, print the AP table and draw predictions into a PNG.

    python tools/demo.py --config-file configs/shapes/demo.yaml OUTPUT_DIR output/demo
"""

from __future__ import annotations

import json
import os
import sys
import time

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.utils.visualizer import Visualizer

import deqdet  # noqa: F401  (registers datasets and models)
from deqdet.data import SPLITS, ensure_shapes
from deqdet.engine import Trainer, setup
from deqdet.errors import UserInputError, one_line


def draw_predictions(cfg, dataset_name: str, out_path: str, num_images: int, score_thresh: float) -> str:
    """Run ``DefaultPredictor`` on the first ``num_images`` of ``dataset_name``; save a grid PNG."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(dataset_name)
    tiles = []
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = read_image(record["file_name"], format="RGB")
        instances = predictor(image if cfg.INPUT.FORMAT == "RGB" else image[:, :, ::-1])["instances"].to("cpu")
        instances = instances[instances.scores >= score_thresh]
        vis = Visualizer(image, metadata, scale=2.0).draw_instance_predictions(instances)
        tiles.append(vis.get_image())
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    cols = 4
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    grid = np.vstack([np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)])
    cv2.imwrite(out_path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return out_path


def main() -> None:
    parser = default_argument_parser()
    parser.add_argument("--vis-images", type=int, default=8, help="validation images to draw")
    parser.add_argument("--vis-threshold", type=float, default=0.3, help="score threshold for drawing")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        cfg = setup(args)
        for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
            if name in SPLITS:  # generate embedded data up front, so training starts at once
                ensure_shapes(name)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    except UserInputError as e:
        sys.exit(f"error: {one_line(e)}")
    train_eval_s = time.perf_counter() - start
    png = draw_predictions(
        cfg, cfg.DATASETS.TEST[0], os.path.join(cfg.OUTPUT_DIR, "predictions.png"), args.vis_images, args.vis_threshold
    )
    print("\n=== deqdet demo ===")
    # the final evaluation's numbers, as the trainer's EvalHook logged them
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        final = [m for m in map(json.loads, f) if "bbox/AP" in m][-1]
    print(f"{cfg.DATASETS.TEST[0]} bbox: " + ", ".join(
        f"{k[5:]} {final[k]:.1f}" for k in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")))
    print(f"predictions drawn on {cfg.DATASETS.TEST[0]}: {os.path.abspath(png)}")
    print(f"wall time (set-up of data, training, evaluation, drawing): {time.perf_counter() - start:.0f} s "
          f"(training + evaluation {train_eval_s:.0f} s)")


if __name__ == "__main__":
    main()
