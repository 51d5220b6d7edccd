"""One class count for every head: from the training data unless the config sets it, one key enough,
heads that disagree named in one line."""

import functools
import os

import pytest
from detectron2.modeling import build_model

from deqdet.data.class_count import class_count_keys
from deqdet.engine import build_config
from deqdet.errors import UserInputError
from tests.data.hostile_data import write_coco
from tests.helpers import CPU, ROOT, TINY_DENSE_QUERY

FLAGSHIP = os.path.join(ROOT, "configs", "shapes", "retinanet_dyhead_deqdet_r18.yaml")
COUNT_KEYS = ["MODEL.QUERY.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES"]


def _own_three_classes(tmp_path):
    """A COCO file with categories 5, 9 and 23 as training and test data (names unique to the test)."""
    path = write_coco(tmp_path / "own", ["good", "good2", "grayscale"], category_ids=(5, 9, 23))
    name = f"own3_{tmp_path.name}"
    return ["DATASETS.COCO_FILES", f"('{name}_train={path}', '{name}_val={path}')",
            "DATASETS.TRAIN", f"('{name}_train',)", "DATASETS.TEST", f"('{name}_val',)"]


def _counts(cfg):
    return {key: functools.reduce(getattr, key.split("."), cfg) for key in class_count_keys(cfg)}


def test_shipped_configs_take_the_count_of_their_data():
    assert _counts(build_config(FLAGSHIP)) == {key: 8 for key in COUNT_KEYS}  # shapes: 8 classes
    coco = build_config(os.path.join(ROOT, "configs", "deqdet_dyhead_r50_1x.yaml"))
    assert _counts(coco) == {key: 80 for key in COUNT_KEYS}


def test_flagship_on_an_own_three_class_file_has_three_classes_in_both_heads(tmp_path):
    cfg = build_config(FLAGSHIP, [*CPU, *TINY_DENSE_QUERY[2:], *_own_three_classes(tmp_path)])
    assert _counts(cfg) == {key: 3 for key in COUNT_KEYS}
    model = build_model(cfg)
    assert model.decoder.init_stage.fc_cls.out_features == 3
    anchors = model.dense.anchor_generator.num_cell_anchors[0]
    assert model.dense.head.cls_score.out_channels == 3 * anchors


def test_one_key_set_is_every_heads_count(tmp_path):
    cfg = build_config(FLAGSHIP, [*_own_three_classes(tmp_path), "MODEL.RETINANET.NUM_CLASSES", "5"])
    assert _counts(cfg) == {key: 5 for key in COUNT_KEYS}


def test_heads_that_disagree_are_named_in_one_line():
    with pytest.raises(UserInputError) as info:
        build_config(FLAGSHIP, ["MODEL.QUERY.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "8"])
    message = str(info.value)
    assert "\n" not in message
    assert "MODEL.QUERY.NUM_CLASSES 3" in message and "MODEL.RETINANET.NUM_CLASSES 8" in message
