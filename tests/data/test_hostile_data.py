"""Hostile datasets: every odd or broken image and box has a defined outcome (trained on, skipped
and counted, dropped, clipped, or a one-line error naming the file), found up front from image
headers where possible; a short training run on such a dataset has finite losses; evaluation's
ground truth drops the boxes training drops."""

import json
import logging
import math
import os
from unittest import mock

import pytest
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

import train_net
from deqdet.data.checks import clean_record_boxes, image_problem
from deqdet.data.loading import check_dataset, checked_dataset_dicts
from deqdet.data.mapper import CheckedDatasetMapper
from deqdet.engine import build_config
from deqdet.errors import UserInputError
from deqdet.evaluation import CheckedCOCOEvaluator, clean_ground_truth
from tests.data.hostile_data import (
    ATSS_CONFIG,
    FOUND_WHEN_DECODED,
    HOSTILE_BOXES,
    READABLE,
    REFUSED,
    TINY_ATSS,
    H,
    W,
    perfect_instances,
    register,
    write_coco,
)
from tests.helpers import run_metrics

TINY = [*TINY_ATSS, "MODEL.ATSS.NUM_CLASSES", "2"]
REFUSED_AS = {
    "16bit": "16/32-bit image",
    "size_mismatch": "size mismatch",
    "zero_bytes": "empty file (0 bytes)",
    "corrupt": "unreadable",
    "missing": "image not found",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Every kind of image, registered as ``hostile``; returns (records by kind, JSON path)."""
    kinds = READABLE + REFUSED + FOUND_WHEN_DECODED
    json_path = write_coco(tmp_path_factory.mktemp("hostile"), kinds)
    records = register("hostile", json_path)
    return {kind: record for kind, record in zip(kinds, records)}, json_path


def test_header_check_finds_what_it_can(hostile):
    records, _ = hostile
    for kind in READABLE + FOUND_WHEN_DECODED:
        assert image_problem(records[kind]) is None, kind
    for kind, expected in REFUSED_AS.items():
        assert image_problem(records[kind]).startswith(expected), (kind, image_problem(records[kind]))
    stored_size = dict(records["exif_rotated"], width=H, height=W)  # annotated as stored, not as shown
    assert "after its EXIF rotation" in image_problem(stored_size)


def _bright_inside_box(out):
    """Mean pixel value inside the (only) ground-truth box and outside it."""
    image = out["image"].float().mean(0)
    x0, y0, x1, y1 = out["instances"].gt_boxes.tensor[0].round().int().tolist()
    inside = image[y0:y1, x0:x1]
    outside = image.sum() - inside.sum()
    return inside.mean().item(), (outside / (image.numel() - inside.numel())).item()


def test_odd_formats_decode_with_boxes_on_their_objects(hostile):
    """Grayscale, RGBA, palette, CMYK, EXIF-rotated and very large images train as 3-channel
    pictures with the box still on the bright square."""
    records, _ = hostile
    mapper = CheckedDatasetMapper(build_config(ATSS_CONFIG, TINY), is_train=True)
    for kind in READABLE:
        record = dict(records[kind], annotations=records[kind]["annotations"][:1])
        out = mapper(record)
        assert out["image"].shape[0] == 3 and min(out["image"].shape[1:]) == 64, kind
        inside, outside = _bright_inside_box(out)
        assert inside > 200 and outside < 60, (kind, inside, outside)


def test_image_broken_past_its_header_is_skipped_in_training_and_named_in_evaluation(hostile):
    records, _ = hostile
    cfg = build_config(ATSS_CONFIG, TINY)
    train_mapper = CheckedDatasetMapper(cfg, is_train=True)
    assert train_mapper(dict(records["truncated"])) is None and train_mapper.skipped == 1
    with pytest.raises(UserInputError, match="cannot read image .*truncated.png"):
        CheckedDatasetMapper(cfg, is_train=False)(dict(records["truncated"]))


def test_hostile_boxes_are_dropped_or_clipped(hostile):
    records, _ = hostile
    record = json.loads(json.dumps(records["boxes"]))  # a copy
    dropped, clipped = clean_record_boxes(record)
    assert [reason for _, reason in dropped] == [
        "zero or negative size", "zero or negative size", "non-finite box", "outside the image"]
    assert clipped == sum(outcome == "clipped" for _, outcome in HOSTILE_BOXES)
    assert len(record["annotations"]) == 1 + clipped
    for ann in record["annotations"]:
        x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H


def test_short_training_on_a_hostile_dataset(hostile, tmp_path):
    """Recoverable images train with finite losses; the refused ones are named and counted in
    the summary of loading; the truncated one is skipped (and named) when the loader reaches it."""
    out = str(tmp_path)
    # 10 usable images, 6 iterations of 2: the loader reaches every image, the truncated one too
    train_net.main(train_net.default_argument_parser().parse_args(
        ["--config-file", ATSS_CONFIG, *TINY, "DATASETS.TRAIN", "('hostile',)", "DATASETS.TEST", "()",
         "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out]))
    metrics = run_metrics(out)
    # Detectron2's trainer stops at the first non-finite total loss: iteration 5 reached, all were finite
    assert metrics[-1]["iteration"] == 5
    assert all(math.isfinite(v) for k, v in metrics[-1].items() if "loss" in k)
    log = open(os.path.join(out, "log.txt")).read()
    n_images = len(READABLE + REFUSED + FOUND_WHEN_DECODED)
    assert f"dataset 'hostile': {n_images} images checked; {len(REFUSED)} unusable" in log, log[-3000:]
    dropped = "4 boxes dropped (zero or negative size: 2, non-finite box: 1, outside the image: 1)"
    assert f"{dropped}; 2 boxes clipped" in log
    for kind in REFUSED:
        assert f"skipped image {os.path.join(os.path.dirname(str(hostile[1])), kind)}" in log, kind
    assert "skipped in training: cannot read image" in log and "truncated.png" in log


def test_evaluation_refuses_unusable_images_all_at_once(hostile, tmp_path):
    with pytest.raises(SystemExit) as info:
        train_net.cli(["--config-file", ATSS_CONFIG, "--eval-only", *TINY, "DATASETS.TEST", "('hostile',)",
                       "OUTPUT_DIR", str(tmp_path)])
    message = str(info.value.code)
    n_images = len(READABLE + REFUSED + FOUND_WHEN_DECODED)
    expected = f"error: dataset 'hostile': {len(REFUSED)} of {n_images} images cannot be used: "
    assert message.startswith(expected), message
    assert "\n" not in message and "16bit.png (16/32-bit image" in message
    assert "and 2 more (all in the log)" in message


def test_empty_or_fully_unusable_dataset_is_an_error(tmp_path):
    register("empty_set", write_coco(tmp_path / "empty", []))
    register("all_broken", write_coco(tmp_path / "broken", ["missing", "corrupt"]))
    for name, fragment in [("empty_set", "dataset 'empty_set' is empty (no images in"),
                           ("all_broken", "dataset 'all_broken': 2 of 2 images cannot be used")]:
        with pytest.raises(SystemExit) as info:
            train_net.cli(["--config-file", ATSS_CONFIG, *TINY, "DATASETS.TRAIN", f"('{name}',)",
                           "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / name)])
        assert fragment in str(info.value.code), info.value.code


def _perfect_predictions_ap(evaluator_class, name, record, output_dir):
    """bbox AP of ``evaluator_class`` when the predictions are training's boxes of ``record``."""
    evaluator = evaluator_class(name, output_dir=str(output_dir))
    evaluator.reset()
    evaluator.process([{"image_id": record["image_id"]}], [{"instances": perfect_instances(record)}])
    return evaluator.evaluate()["bbox"]["AP"]


def test_evaluation_ground_truth_drops_what_training_drops(tmp_path):
    """A detector that finds exactly the boxes training teaches scores AP 100: the zero-size,
    NaN and outside boxes are not counted as missed (they are with Detectron2's evaluator)."""
    record = register("boxes_only", write_coco(tmp_path, ["boxes"], category_ids=(1,)))[0]
    clean_record_boxes(record)
    checked = _perfect_predictions_ap(CheckedCOCOEvaluator, "boxes_only", record, tmp_path / "a")
    assert checked == pytest.approx(100.0)
    assert _perfect_predictions_ap(COCOEvaluator, "boxes_only", record, tmp_path / "b") < 80.0


class _Lines(logging.Handler):
    """The messages logged to the ``deqdet`` logger while it is attached."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger("deqdet")
        self.level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self.lines

    def __exit__(self, *exc):
        logger = logging.getLogger("deqdet")
        logger.removeHandler(self)
        logger.setLevel(self.level)


def _malformed_and_orphan(folder):
    """Two good images (ids 1, 2) plus a 3-number box (annotation 50, image 1) and an annotation
    whose image_id names no image (annotation 51, image_id 9999)."""
    json_path = write_coco(folder, ["good", "good2"])  # categories 1 and 2
    coco = json.loads(json_path.read_text())
    coco["annotations"] += [
        {"id": 50, "image_id": 1, "bbox": [1, 2, 3], "iscrowd": 0, "category_id": 1, "area": 9.0},
        {"id": 51, "image_id": 9999, "bbox": [1, 1, 5, 5], "iscrowd": 0, "category_id": 1, "area": 25.0},
    ]
    json_path.write_text(json.dumps(coco))
    return json_path


def test_malformed_box_and_orphan_annotation_are_named_in_training_and_evaluation(tmp_path):
    json_path = _malformed_and_orphan(tmp_path / "data")
    records = register("malformed", json_path)
    with _Lines() as lines:
        checked_dataset_dicts(build_config(ATSS_CONFIG, TINY), ["malformed"], is_train=True)
    log = "\n".join(lines)
    source = f"dataset 'malformed', {json_path}"
    assert f"{source}: orphan annotation (dropped): annotation 51 (image_id 9999): no image has this id" \
        in log
    assert f"{source}: malformed box (dropped): annotation 50 (image_id 1) box [1, 2, 3] is not " in log
    assert f"{source}: 4 annotations; 2 dropped (malformed box: 1, orphan annotation: 1)" in log
    assert "2 images checked; 1 box dropped (malformed box: 1)" in log  # Detectron2's loader kept it

    with _Lines() as lines:  # died with ValueError (3 numbers) and KeyError (image_id 9999)
        dropped, clipped = clean_ground_truth(COCO(str(json_path)))
        record = json.loads(json.dumps(records[0]))  # a copy, with training's boxes
        clean_record_boxes(record)
        ap = _perfect_predictions_ap(CheckedCOCOEvaluator, "malformed", record, tmp_path / "eval")
    assert dropped == [
        ("annotation 50 (image_id 1) box [1, 2, 3] is not [x, y, width, height]", "malformed box"),
        ("annotation 51 (image_id 9999): no image has this id", "orphan annotation"),
    ]
    assert clipped == 0
    log = "\n".join(lines)
    assert "evaluation of 'malformed': malformed box, dropped from the ground truth: annotation 50 " \
        "(image_id 1) box [1, 2, 3]" in log
    assert "evaluation of 'malformed': orphan annotation, dropped from the ground truth: annotation 51 " \
        "(image_id 9999)" in log
    assert "evaluation of 'malformed': 2 ground-truth boxes dropped (malformed box: 1, " \
        "orphan annotation: 1), as in training" in log
    # class 1: image 1's object found (AP 100 unless the 3-number box or the orphan, both class 1,
    # counted as missed); class 2: image 2's object not predicted (AP 0)
    assert ap == pytest.approx(50.0)


def test_eval_only_survives_malformed_box_and_orphan_annotation(tmp_path):
    json_path = _malformed_and_orphan(tmp_path / "data")
    out = tmp_path / "out"
    train_net.main(train_net.default_argument_parser().parse_args(
        ["--config-file", ATSS_CONFIG, "--eval-only", *TINY, "DATASETS.COCO_FILES",
         f"('bad_val={json_path}',)", "DATASETS.TEST", "('bad_val',)", "OUTPUT_DIR", str(out)]))
    log = open(out / "log.txt").read()
    assert "annotation 51 (image_id 9999)" in log and "malformed box" in log
    assert (out / "inference" / "bad_val" / "coco_instances_results.json").is_file()


def test_a_clean_dataset_prints_no_empty_counts():
    records = [{"file_name": "x", "height": H, "width": W, "image_id": 1, "annotations": []}]
    with _Lines() as lines, mock.patch("deqdet.data.loading.image_problem", return_value=None):
        check_dataset("clean", records, skip_bad_images=True)
    assert lines == ["dataset 'clean': 1 image checked; no problems found"]
