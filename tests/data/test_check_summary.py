"""The data check's one-line summary counts in words that agree with the numbers."""

import logging

from detectron2.structures import BoxMode
from PIL import Image

from deqdet.data.loading import check_dataset
from tests.data.hostile_data import write_coco


def test_one_dropped_box_and_one_image_are_singular(tmp_path, caplog):
    folder = tmp_path / "one"
    write_coco(folder, ["good"])
    record = {"file_name": str(folder / "good.png"), "height": 0, "width": 0, "image_id": 1,
              "annotations": [{"bbox": [0, 0, -5, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]}
    record["width"], record["height"] = Image.open(record["file_name"]).size
    with caplog.at_level(logging.INFO):
        check_dataset("one", [record], skip_bad_images=False)
    assert "dataset 'one': 1 image checked; 1 box dropped (" in caplog.text, caplog.text
