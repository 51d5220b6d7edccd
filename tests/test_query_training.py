"""A short real training of the shapes AdaMixer recipe (scaled down further) through train_net:
the loss falls and the final evaluation gives AP > 0."""

import json
import os

import train_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes", "adamixer_r18.yaml")
TINY = [
    "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_train',)",
    "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
    "MODEL.QUERY.NUM_STAGES", "2", "MODEL.QUERY.NUM_QUERIES", "20", "MODEL.QUERY.CONTENT_DIM", "64",
    "MODEL.QUERY.FFN_DIM", "128", "MODEL.QUERY.FEAT_CHANNELS", "32", "MODEL.QUERY.NECK_NORM_GROUPS", "8",
    "MODEL.QUERY.IN_POINTS", "8", "MODEL.QUERY.OUT_POINTS", "16",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "80", "TEST.DETECTIONS_PER_IMAGE", "100", "SEED", "3",
]


def test_short_adamixer_training_learns(tmp_path):
    out = str(tmp_path)
    train_net.main(train_net.default_argument_parser().parse_args(["--config-file", CONFIG, *TINY, "OUTPUT_DIR", out]))
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], losses
    ap = [m["bbox/AP"] for m in metrics if "bbox/AP" in m][-1]
    assert ap > 0, ap
