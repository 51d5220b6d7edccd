"""A short real training of the shapes AdaMixer recipe (scaled down further) through train_net:
the loss falls and the final evaluation gives AP > 0."""

import pytest

from tests.helpers import MINI_TRAINING, TRAINABLE_QUERIES, config_file, run_metrics, train_main

pytestmark = pytest.mark.slow

CONFIG = config_file("shapes", "adamixer_r18.yaml")
TINY = [*MINI_TRAINING, *TRAINABLE_QUERIES, "MODEL.QUERY.NUM_STAGES", "2", "SOLVER.MAX_ITER", "80",
        "TEST.DETECTIONS_PER_IMAGE", "100", "SEED", "3"]


def test_short_adamixer_training_learns(tmp_path):
    out = str(tmp_path)
    train_main(["--config-file", CONFIG, *TINY, "OUTPUT_DIR", out])
    metrics = run_metrics(out)
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], losses
    ap = [m["bbox/AP"] for m in metrics if "bbox/AP" in m][-1]
    assert ap > 0, ap
