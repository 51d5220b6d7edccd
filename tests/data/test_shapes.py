"""The embedded ``shapes`` dataset: determinism, tight boxes, coverage of classes and sizes."""

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from deqdet.data.shapes import CLASSES, GENERATOR_VERSION, SPLITS, compose_image, generate_split, render_image


def test_same_seed_gives_identical_json_and_pixels(tmp_path):
    spec = replace(SPLITS["shapes_mini_val"], num_images=12)
    json_a = generate_split("s", spec, tmp_path / "a", workers=2)
    json_b = generate_split("s", spec, tmp_path / "b", workers=1)
    assert json_a.read_bytes() == json_b.read_bytes()
    for image in json.loads(json_a.read_text())["images"]:
        pixels_a = (json_a.parent / image["file_name"]).read_bytes()
        assert pixels_a == (json_b.parent / image["file_name"]).read_bytes()
    json_c = generate_split("s", replace(spec, seed=spec.seed + 1), tmp_path / "c")
    assert json_c.read_bytes() != json_a.read_bytes()


@pytest.mark.parametrize("index", range(40))
def test_boxes_are_tight_around_visible_pixels(index):
    spec = SPLITS["shapes_train"]
    seed = spec.seed * 1_000_003 + index
    image, layers, visible = compose_image(seed, spec)
    _, annotations = render_image(seed, spec)
    h, w = image.shape[:2]

    # recompute visibility independently: a layer's pixels minus everything painted above it
    expected = []
    for i, (mask, cls) in enumerate(layers):
        above = np.zeros_like(mask)
        for upper, _ in layers[i + 1 :]:
            above |= upper
        vis = mask.astype(bool) & ~above.astype(bool)
        np.testing.assert_array_equal(vis, visible[i].astype(bool))
        if cls >= 0 and vis.sum() >= spec.min_visible * mask.sum() and mask.sum() > 0:
            expected.append((cls, vis))
    assert len(annotations) == len(expected)
    for ann, (cls, vis) in zip(annotations, expected):
        x, y, bw, bh = ann["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
        ys, xs = np.nonzero(vis)
        assert (x, y, x + bw - 1, y + bh - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert ann["category_id"] == cls and ann["area"] == vis.sum()


@pytest.fixture(scope="module")
def default_splits():
    return {name: DatasetCatalog.get(name) for name in ("shapes_train", "shapes_val")}


def test_default_splits_cover_all_classes_sizes_and_empty_images(default_splits):
    assert MetadataCatalog.get("shapes_val").thing_classes == list(CLASSES)
    assert len(CLASSES) >= 6
    for name, records in default_splits.items():
        assert len(records) == SPLITS[name].num_images
        classes = Counter(a["category_id"] for r in records for a in r["annotations"])
        assert set(classes) == set(range(len(CLASSES))), name
        assert sum(1 for r in records if not r["annotations"]) > 0, f"{name} has no empty image"
        # (detectron2's loader keeps boxes, not COCO's "area"): box areas in COCO's small /
        # medium / large buckets each hold at least 5% of the objects
        areas = np.array([a["bbox"][2] * a["bbox"][3] for r in records for a in r["annotations"]])
        for lo, hi in ((0, 32**2), (32**2, 96**2), (96**2, np.inf)):
            assert ((areas >= lo) & (areas < hi)).mean() > 0.05, (name, lo, hi)


def test_a_split_is_generated_on_first_use_through_the_checked_loader(tmp_path):
    """On a machine without the data (an empty DEQDET_DATA), loading a split through the checks that
    training, evaluation and the tools use generates it instead of failing on its missing JSON."""
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    code = ("from deqdet.data.loading import load_dataset; "
            "print(len(load_dataset('shapes_mini_val')))")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(DEQDET_DATA=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(SPLITS["shapes_mini_val"].num_images)
    assert (tmp_path / f"shapes-v{GENERATOR_VERSION}" / "shapes_mini_val" / "annotations.json").is_file()


def test_splits_are_drawn_from_distinct_seeds():
    """A split sharing a seed with another would repeat its images: shapes_test would not be held out."""
    seeds = [spec.seed for spec in SPLITS.values()]
    assert len(set(seeds)) == len(seeds)
    assert {"shapes_train", "shapes_val", "shapes_test"} <= set(SPLITS)
