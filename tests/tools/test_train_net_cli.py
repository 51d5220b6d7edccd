"""train_net.py's own code path: a few iterations, evaluation, then --eval-only on the checkpoint;
and bad input ends with one clear message naming the file or key."""

import json
import os

import pytest

import train_net
from tests.helpers import config_file, run_metrics, train_main

CONFIG = config_file("shapes", "retinanet_demo.yaml")
TINY = [
    "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
]


@pytest.mark.slow
def test_train_then_eval_only_reloads_the_checkpoint(tmp_path):
    out = str(tmp_path)
    train_main(["--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "30", "OUTPUT_DIR", out])
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    metrics = run_metrics(out)
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses[-1] < losses[0], losses  # the short run learns something
    ap_after_training = [m["bbox/AP"] for m in metrics if "bbox/AP" in m][-1]  # the final evaluation

    reloaded = train_main(
        ["--config-file", CONFIG, "--eval-only", *TINY, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
         "OUTPUT_DIR", str(tmp_path / "eval")]
    )
    assert reloaded["bbox"]["AP"] == pytest.approx(ap_after_training, abs=1e-6)


def _fails_with(argv, *fragments):
    with pytest.raises(SystemExit) as info:
        train_net.cli(argv)
    message = str(info.value.code)
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message


def test_missing_config_file_is_named(tmp_path):
    _fails_with(["--config-file", str(tmp_path / "nope.yaml")], "config file not found", "nope.yaml")


def test_unknown_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  NOT_A_KEY: 1\n')
    _fails_with(["--config-file", str(bad)], "bad.yaml", "MODEL.NOT_A_KEY")
    _fails_with(["--config-file", CONFIG, "SOLVER.NOT_A_KEY", "1"], "SOLVER.NOT_A_KEY")


def _register_copy(tmp_path, name, mutate):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from deqdet.data import ensure_shapes

    src = ensure_shapes("shapes_mini_val")
    coco = json.loads(src.read_text())
    for image in coco["images"]:
        image["file_name"] = str(src.parent / image["file_name"])
    json_path = tmp_path / f"{name}.json"
    json_path.write_text(mutate(coco))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_path), "")
    return json_path


def test_malformed_json_is_named(tmp_path):
    json_path = _register_copy(tmp_path, "broken_json", lambda coco: json.dumps(coco)[:-20])
    _fails_with(["--config-file", CONFIG, *TINY, "DATASETS.TRAIN", "('broken_json',)", "SOLVER.MAX_ITER", "1",
                 "OUTPUT_DIR", str(tmp_path)], "malformed JSON", str(json_path))


def test_missing_image_is_named(tmp_path):
    def drop_first_file(coco):
        coco["images"][0]["file_name"] = str(tmp_path / "missing.png")
        return json.dumps(coco)

    _register_copy(tmp_path, "missing_image", drop_first_file)
    _fails_with(["--config-file", CONFIG, "--eval-only", *TINY, "DATASETS.TEST", "('missing_image',)",
                 "OUTPUT_DIR", str(tmp_path)], "image not found", "missing.png")
