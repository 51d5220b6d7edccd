"""The up-front pass over a COCO annotation file: every problem of the file counted and named, with
one outcome in training and evaluation alike (dropped, kept, or a one-line error); what training
survives, evaluation survives."""

import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

import train_net
from deqdet.data.annotation_file import check_coco_dict
from tests.data.hostile_data import ATSS_CONFIG, TINY_ATSS, write_coco

TINY = [*TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "2"]
BAD_BOXES = {50: [1, 2, 3], 52: None, 53: [], 54: ["a", 1, 2, 3], 55: 7}  # annotation id -> bbox


def _hostile_file(folder):
    """Two good images (ids 1, 2; annotations 1, 2) plus: the malformed boxes of BAD_BOXES on image 1,
    annotation 56 without a bbox, annotation 51 of image_id 9999 (no such image), and annotation id 2
    used a second time (a good box on image 1)."""
    json_path = write_coco(folder, ["good", "good2"])  # categories 1 and 2
    coco = json.loads(json_path.read_text())
    base = {"image_id": 1, "iscrowd": 0, "category_id": 1, "area": 9.0}
    coco["annotations"] += [{**base, "id": i, "bbox": bbox} for i, bbox in BAD_BOXES.items()]
    coco["annotations"] += [{**base, "id": 56}, {**base, "id": 51, "image_id": 9999, "bbox": [1, 1, 5, 5]},
                            {**base, "id": 2, "bbox": [30, 20, 10, 10]}]
    json_path.write_text(json.dumps(coco))
    return json_path


def test_every_problem_of_a_file_is_classified():
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}, {"id": 1, "file_name": "b.png",
                   "width": 10, "height": 10}, {"id": 3, "file_name": "c.png", "width": 0, "height": 10}],
        "categories": [{"id": 1, "name": "x"}, {"name": "nameless id"}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
            {"id": 8, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]},
            {"id": 9, "image_id": 42, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},
        ],
    }
    report = check_coco_dict(coco)
    assert [kind for kind, _ in report.problems] == [
        "malformed image", "duplicate image id", "malformed category", "unknown category",
        "orphan annotation", "malformed box", "malformed annotation", "duplicate annotation id"]
    assert [a["id"] for a in report.annotations] == [7, 7]  # duplicates kept
    assert report.error("f.json") == (
        "f.json: 1 x malformed image (image 3: width 0 and height 10 must be positive); "
        "1 x duplicate image id (image id 1 is used 2 times); "
        "1 x malformed category ({'name': 'nameless id'} needs an id and a name); "
        "1 x unknown category (annotation 8 (image_id 1) category_id 99); "
        "1 x malformed annotation (annotations[5] has no (number or string) id)")
    assert check_coco_dict({"images": [], "categories": [], "annotations": []}).error("f.json") is None


def test_training_and_evaluation_survive_the_same_annotations(tmp_path):
    """Before: Detectron2's loader stopped training at the null box (TypeError) or the duplicate id
    (AssertionError), and evaluation died at the 3-number box (ValueError) or the orphan (KeyError)."""
    json_path = _hostile_file(tmp_path / "data")
    out = tmp_path / "out"
    train_net.main(train_net.default_argument_parser().parse_args([
        "--config-file", ATSS_CONFIG, *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out),
        "DATASETS.COCO_FILES", f"('bad={json_path}',)", "DATASETS.TRAIN", "('bad',)",
        "DATASETS.TEST", "('bad',)"]))
    final = [json.loads(line) for line in open(out / "metrics.json")][-1]
    assert "bbox/AP" in final  # evaluated after training
    log = open(out / "log.txt").read()
    source = f"dataset 'bad', {json_path}"
    for i, bbox in BAD_BOXES.items():
        assert f"{source}: malformed box (dropped): annotation {i} (image_id 1) box {bbox!r} is not" in log
    assert f"{source}: malformed box (dropped): annotation 56 (image_id 1) box None is not" in log
    assert f"{source}: orphan annotation (dropped): annotation 51 (image_id 9999)" in log
    assert f"{source}: duplicate annotation id (kept): annotation id 2 is used 2 times" in log
    summary = (f"{source}: 10 annotations; 7 dropped (malformed box: 6, orphan annotation: 1); "
               "1 annotation ids used more than once (kept)")
    assert log.count(summary) == 2  # training's dataset and evaluation's
    assert "evaluation of 'bad': 7 ground-truth boxes dropped (malformed box: 6, orphan annotation: 1)" in log

    train_net.main(train_net.default_argument_parser().parse_args([
        "--config-file", ATSS_CONFIG, "--eval-only", *TINY, "OUTPUT_DIR", str(tmp_path / "eval"),
        "DATASETS.COCO_FILES", f"('bad={json_path}',)", "DATASETS.TEST", "('bad',)"]))
    assert (tmp_path / "eval" / "inference" / "bad" / "coco_instances_results.json").is_file()


def test_unknown_categories_are_one_error_in_training_and_evaluation(tmp_path):
    json_path = write_coco(tmp_path / "data", ["good", "good2"])
    coco = json.loads(json_path.read_text())
    for ann in coco["annotations"]:
        ann["category_id"] = 99
    json_path.write_text(json.dumps(coco))
    messages = []
    for flags, split in (([], "TRAIN"), (["--eval-only"], "TEST")):
        with pytest.raises(SystemExit) as info:
            train_net.cli([*flags, "--config-file", ATSS_CONFIG, *TINY, "DATASETS.COCO_FILES",
                           f"('unk={json_path}',)", f"DATASETS.{split}", "('unk',)",
                           "OUTPUT_DIR", str(tmp_path)])
        messages.append(str(info.value.code))
    assert messages[0] == messages[1] == (
        f"error: dataset 'unk', {json_path}: 2 x unknown category (annotation 1 (image_id 1) category_id 99; "
        "annotation 2 (image_id 2) category_id 99)")


def test_detectron2_registered_file_that_its_loader_refuses_is_one_line(tmp_path):
    json_path = _hostile_file(tmp_path / "data")
    if "d2_bad" in DatasetCatalog.list():
        DatasetCatalog.remove("d2_bad")
        MetadataCatalog.remove("d2_bad")
    register_coco_instances("d2_bad", {}, str(json_path), str(json_path.parent))
    with pytest.raises(SystemExit) as info:
        train_net.cli(["--config-file", ATSS_CONFIG, *TINY, "DATASETS.TRAIN", "('d2_bad',)",
                       "OUTPUT_DIR", str(tmp_path / "out")])
    message = str(info.value.code)
    assert message.startswith(f"error: {json_path}: ") and "\n" not in message
