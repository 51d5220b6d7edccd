#!/usr/bin/env python
"""The main job (``make demo``): train the demo detector on ``shapes_train``, evaluate it on ``shapes_val``
with ``COCOEvaluator`` and print the AP table, draw predictions into a PNG.

For the combined detector (``DenseQueryDetector``, the default demo) it also prints the dense head's AP
from the same checkpoint and evaluation pass (``MODEL.DENSE_QUERY.INFERENCE_SOURCE both``) and the DEQ
decoder's mean refinement steps per image, and draws the refinement of a few validation images.

    python tools/demo.py --config-file configs/shapes/demo.yaml OUTPUT_DIR output/demo
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

import deqdet  # noqa: F401  (registers datasets and models)
from deqdet.data import SPLITS, ensure_shapes
from deqdet.engine import Trainer, setup
from deqdet.errors import UserInputError, one_line
from deqdet.quiet import silence_known_warnings
from deqdet.visualization import render_refinement

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="configs/shapes/demo.yaml", metavar="FILE")
    parser.add_argument("--vis-images", type=int, default=8, help="validation images to draw")
    parser.add_argument("--vis-threshold", type=float, default=0.3, help="score threshold for drawing")
    parser.add_argument("--refine-images", type=int, default=3,
                        help="validation images whose DEQ refinement is drawn (refinement_grid.png, ...)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def ap_line(dataset_name: str, bbox: dict) -> str:
    return f"{dataset_name} bbox: " + ", ".join(f"{k} {bbox[k]:.1f}" for k in AP_KEYS)


def draw_predictions(cfg, dataset_name: str, out_path: str, num_images: int, score_thresh: float) -> str:
    """Run ``DefaultPredictor`` (which takes BGR images) on the first ``num_images`` of ``dataset_name``;
    save a grid PNG."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(dataset_name)
    tiles = []
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = read_image(record["file_name"], format="BGR")
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= score_thresh]
        visualizer = Visualizer(image[:, :, ::-1], metadata, scale=2.0)
        tiles.append(visualizer.draw_instance_predictions(instances).get_image())
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    cols = 4
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    grid = np.vstack([np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)])
    cv2.imwrite(out_path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return out_path


def main(argv=None) -> None:
    silence_known_warnings()
    args = parse_args(argv)
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
    dataset = cfg.DATASETS.TEST[0]
    results = trainer._last_eval_results  # the final evaluation (EvalHook)
    lines = [ap_line(dataset, results["bbox"])]
    model = trainer.model
    if "dense_bbox" in results:  # the combined detector's dense head: same weights, same pass
        lines.append(f"dense head ({type(model.dense).__name__}) " + ap_line(dataset, results["dense_bbox"]))
    if cfg.MODEL.DEQDET.TEST_OUTPUT == "init" and "deq" in results:
        lines.append("DEQ decoder: answers at its init stage (MODEL.DEQDET.TEST_OUTPUT init), no refinement "
                     "step at test")
    elif "deq" in results:  # DEQStatisticsEvaluator, over the same evaluation
        deq = results["deq"]
        final_residual = deq.get("mean_final_residual", float("nan"))
        lines.append(f"DEQ refinement steps per image (TOL {cfg.MODEL.DEQDET.TOL}, at most "
                     f"{cfg.MODEL.DEQDET.MAX_ITERS} + 1): mean {deq['mean_steps']:.2f}, "
                     f"median {deq['steps_p50']:.0f}, max {deq['max_steps']:.0f}; "
                     f"mean final residual {final_residual:.3f}")
    outputs = [draw_predictions(
        cfg, dataset, os.path.join(cfg.OUTPUT_DIR, "predictions.png"), args.vis_images, args.vis_threshold
    )]
    if hasattr(getattr(model, "decoder", None), "trace") and args.refine_images > 0:
        records = DatasetCatalog.get(dataset)[: args.refine_images]
        images = [read_image(r["file_name"], format=cfg.INPUT.FORMAT) for r in records]
        names = [os.path.basename(r["file_name"]) for r in records]
        drawn = render_refinement(cfg, model, images, os.path.join(cfg.OUTPUT_DIR, "refinement"),
                                  MetadataCatalog.get(dataset), names=names)
        outputs += [drawn["grid"], drawn["curves"], drawn["gif"]]
    print("\n=== deqdet demo ===")
    print("\n".join(lines))
    print("pictures: " + ", ".join(os.path.abspath(p) for p in outputs))
    print(f"wall time (set-up of data, training, evaluation, drawing): {time.perf_counter() - start:.0f} s "
          f"(training + evaluation {train_eval_s:.0f} s)")


if __name__ == "__main__":
    main()
