"""A user's COCO-format dataset from the command line (DATASETS.COCO_FILES): trains and evaluates
with non-contiguous category ids, a crowd box and images without annotations; the class count is
checked against the dataset for every detector."""

import json
import os
from unittest import mock

import pytest
from detectron2.data import MetadataCatalog

import train_net
from deqdet.data import loading
from deqdet.data.loading import check_num_classes
from deqdet.engine import build_config
from tests.data.hostile_data import ATSS_CONFIG, TINY_ATSS, write_coco
from tests.helpers import ROOT

CATEGORY_IDS = (3, 7, 12)


def _own_dataset(folder):
    """Six images, classes 3 / 7 / 12, a crowd box on the first image and two images without boxes."""
    json_path = write_coco(folder, ["good", "good2", "grayscale", "rgba", "palette", "cmyk"],
                           category_ids=CATEGORY_IDS, empty_images=2)
    coco = json.loads(json_path.read_text())
    coco["annotations"].append({"id": 99, "image_id": 1, "bbox": [40, 2, 20, 10], "iscrowd": 1,
                                "category_id": 7, "area": 200.0})
    json_path.write_text(json.dumps(coco))
    return json_path


def test_train_and_evaluate_on_own_coco_files(tmp_path):
    train_json = _own_dataset(tmp_path / "train")
    val_json = _own_dataset(tmp_path / "val")
    out = tmp_path / "out"
    train_net.main(train_net.default_argument_parser().parse_args([
        "--config-file", ATSS_CONFIG, *TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "3", "SOLVER.MAX_ITER", "4",
        "OUTPUT_DIR", str(out),
        "DATASETS.COCO_FILES", f"('own_train={train_json}:{train_json.parent}', 'own_val={val_json}')",
        "DATASETS.TRAIN", "('own_train',)", "DATASETS.TEST", "('own_val',)",
    ]))
    assert MetadataCatalog.get("own_train").thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
    final = [json.loads(line) for line in open(out / "metrics.json")][-1]  # the evaluation after training
    assert {"bbox/AP-class3", "bbox/AP-class7", "bbox/AP-class12"} <= set(final)
    assert final["bbox/AP"] == final["bbox/AP"]  # not NaN: there were predictions to evaluate
    predictions = json.load(open(out / "inference" / "own_val" / "coco_instances_results.json"))
    assert predictions and {p["category_id"] for p in predictions} <= set(CATEGORY_IDS)  # mapped back
    assert {p["image_id"] for p in predictions} == set(range(1, 9))  # the images without boxes too
    log = open(out / "log.txt").read()
    assert "dataset 'own_train': 8 images checked; no problems found" in log  # no "0 unusable ()"


def test_bad_coco_files_entries_are_named(tmp_path):
    for entry, fragment in [
        ("no_equals_sign", "DATASETS.COCO_FILES entry 'no_equals_sign' is not NAME=JSON_FILE[:IMAGE_ROOT]"),
        (f"x={tmp_path}/nope.json", f"annotation file of 'x' not found: {tmp_path}/nope.json"),
    ]:
        with pytest.raises(SystemExit) as info:
            train_net.cli(["--config-file", ATSS_CONFIG, "DATASETS.COCO_FILES", f"('{entry}',)"])
        message = str(info.value.code)
        assert message.startswith("error: ") and fragment in message, message


@pytest.mark.parametrize("config,keys", [
    ("configs/shapes/deqdet_r18.yaml", ["MODEL.QUERY.NUM_CLASSES"]),
    ("configs/shapes/atss_dyhead_r18.yaml", ["MODEL.ATSS.NUM_CLASSES"]),
    ("configs/shapes/retinanet_r18.yaml", ["MODEL.RETINANET.NUM_CLASSES"]),
    ("configs/shapes/rcnn_dyhead_r18.yaml", ["MODEL.ROI_HEADS.NUM_CLASSES"]),
    # one key sets both heads of the combined detector (deqdet.data.class_count); the first is named
    ("configs/shapes/dyhead_deqdet_r18.yaml", ["MODEL.QUERY.NUM_CLASSES"]),
])
def test_class_count_checked_against_the_dataset(config, keys):
    """shapes has 8 classes: 7 configured is an error naming the key, 9 a warning naming it."""
    for key in keys:
        too_few = f"{key} is 7 but dataset 'shapes_mini_train' has 8 classes"
        with pytest.raises(loading.UserInputError, match=too_few):
            check_num_classes(build_config(os.path.join(ROOT, config), [key, "7"]), "shapes_mini_train")
        with mock.patch.object(loading.logger, "warning") as warning:
            check_num_classes(build_config(os.path.join(ROOT, config), [key, "9"]), "shapes_mini_train")
        said = [call[0][0] for call in warning.call_args_list]
        assert any(f"{key} is 9 but dataset 'shapes_mini_train' has 8 classes" in m for m in said), said
        with mock.patch.object(loading.logger, "warning") as warning:
            check_num_classes(build_config(os.path.join(ROOT, config)), "shapes_mini_train")
        warning.assert_not_called()


def test_too_few_classes_stop_training_with_one_line(tmp_path):
    with pytest.raises(SystemExit) as info:
        train_net.cli(["--config-file", ATSS_CONFIG, *TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "2",
                       "DATASETS.TRAIN", "('shapes_mini_train',)", "OUTPUT_DIR", str(tmp_path)])
    assert str(info.value.code) == ("error: MODEL.ATSS.NUM_CLASSES is 2 but dataset 'shapes_mini_train' "
                                    "has 8 classes: set MODEL.ATSS.NUM_CLASSES 8")


def test_each_dataset_is_loaded_once_per_loader(tmp_path):
    """The up-front check and the data loader share one load of the annotation file."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import load_coco_json

    from deqdet.engine import Trainer

    json_path = _own_dataset(tmp_path)
    loads = []

    def load():
        loads.append(1)
        return load_coco_json(str(json_path), str(tmp_path), "counted")

    if "counted" in DatasetCatalog.list():
        DatasetCatalog.remove("counted")
    DatasetCatalog.register("counted", load)
    cfg = build_config(ATSS_CONFIG, [*TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "3",
                                     "DATASETS.TRAIN", "('counted',)"])
    Trainer.build_train_loader(cfg)
    assert len(loads) == 1
    Trainer.build_test_loader(cfg, "counted")
    assert len(loads) == 2
