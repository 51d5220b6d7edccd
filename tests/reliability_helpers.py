"""Shared pieces of the crash/resume and multi-process tests: shrunk configs of the shapes recipes
(seconds per run on a 2-core CPU), a dataset of equally sized images, and reading final weights."""

import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_SIZE_DATASET = "shapes_fixed_size"

# A few iterations of batch 2 at about 96 px, a checkpoint every 2 iterations, fixed seed, no
# evaluation. One data worker and no aspect-ratio grouping: the conditions of an exact resume.
COMMON = [
    "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "()", "SEED", "7",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2", "SOLVER.MAX_ITER", "6",
    "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
    "INPUT.MIN_SIZE_TRAIN", "(96, 112)", "INPUT.MAX_SIZE_TRAIN", "128", "TEST.EVAL_PERIOD", "0", "MODEL.DEVICE", "cpu",
]
SMALL_QUERIES = [
    "MODEL.QUERY.NUM_QUERIES", "8", "MODEL.QUERY.CONTENT_DIM", "32", "MODEL.QUERY.NUM_HEADS", "2",
    "MODEL.QUERY.FEAT_CHANNELS", "32", "MODEL.QUERY.NECK_NORM_GROUPS", "8", "MODEL.QUERY.FFN_DIM", "64",
    "MODEL.QUERY.IN_POINTS", "4", "MODEL.QUERY.OUT_POINTS", "8",
]
# The DEQ decoder with its RAP noise (official probabilities), RAG and the gradient stash.
DEQ = ["--config-file", os.path.join(ROOT, "configs", "shapes", "deqdet_r18.yaml"), *COMMON, *SMALL_QUERIES,
       "MODEL.DEQDET.REFINEMENT_STEPS", "3", "MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 3)",
       "MODEL.DEQDET.RAG", "1", "MODEL.DEQDET.EXTRA_INIT_SUPERVISIONS", "1", "MODEL.DEQDET.MAX_ITERS", "3"]
# The combined detector: ATSS + DyHead dense head whose top boxes initialise the DEQ decoder.
DENSE_QUERY = ["--config-file", os.path.join(ROOT, "configs", "shapes", "dyhead_deqdet_r18.yaml"), *COMMON,
               "MODEL.QUERY.NUM_QUERIES", "8", "MODEL.QUERY.FFN_DIM", "64", "MODEL.QUERY.IN_POINTS", "4",
               "MODEL.QUERY.OUT_POINTS", "8", "MODEL.DEQDET.MAX_ITERS", "3"]
ATSS_DYHEAD = ["--config-file", os.path.join(ROOT, "configs", "shapes", "atss_dyhead_r18.yaml"), *COMMON,
               "MODEL.DYHEAD.NUM_CONVS", "1"]


def final_weights(output_dir: str) -> dict:
    return torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]


def register_fixed_size_dataset(folder: str) -> None:
    """``shapes_mini_train`` with every image cut to 128 x 128 px (boxes clipped, emptied ones
    dropped) as ``FIXED_SIZE_DATASET``: batches of any split pad to the same size."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from PIL import Image

    from deqdet.data import ensure_shapes

    json_path = os.path.join(folder, "fixed.json")
    if not os.path.isfile(json_path):
        src = ensure_shapes("shapes_mini_train")
        coco = json.loads(src.read_text())
        for image in coco["images"]:
            name = os.path.join(folder, os.path.basename(image["file_name"]))
            Image.open(src.parent / image["file_name"]).convert("RGB").crop((0, 0, 128, 128)).save(name)
            image.update(file_name=name, width=128, height=128)
        kept = []
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            w, h = min(x + w, 128) - x, min(y + h, 128) - y
            if w > 4 and h > 4:
                kept.append({**ann, "bbox": [x, y, w, h], "area": w * h})
        coco["annotations"] = kept
        with open(json_path, "w") as f:
            json.dump(coco, f)
    if FIXED_SIZE_DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(FIXED_SIZE_DATASET)
        MetadataCatalog.remove(FIXED_SIZE_DATASET)
    register_coco_instances(FIXED_SIZE_DATASET, {}, json_path, "")
