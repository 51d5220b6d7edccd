"""A short CPU training of ATSS + DyHead (identity-initialised blocks) on the `shapes` mini split through
train_net.py: the loss falls and the final evaluation finds objects (AP > 0)."""

import pytest

from tests.helpers import config_file, run_metrics, train_main

pytestmark = pytest.mark.slow

CONFIG = config_file("shapes", "atss_dyhead_r18.yaml")


def test_atss_dyhead_short_training_learns(tmp_path):
    out = str(tmp_path)
    train_main([
        "--config-file", CONFIG,
        "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "60", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "5", "SOLVER.BASE_LR", "0.002", "INPUT.MIN_SIZE_TRAIN", "(192,)",
        "INPUT.MIN_SIZE_TEST", "192", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SEED", "0",
        "OUTPUT_DIR", out,
    ])
    metrics = run_metrics(out)
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses[-1] < 0.9 * losses[0], losses
    ap = [m["bbox/AP"] for m in metrics if "bbox/AP" in m][-1]
    assert ap > 0, ap
