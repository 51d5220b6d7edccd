"""Load a training or test set once, check it up front and report all of its problems at once.

What happens to each problem (the log names every one; a summary line counts them):

- an image that is missing, empty, unreadable, 16/32-bit or not the size its annotation says:
  skipped in training; in evaluation an error listing the images (skipping them would count
  their objects as missed);
- a box that is not finite, of zero or negative size, or entirely outside its image: dropped (in
  training and, by :class:`~deqdet.evaluation.CheckedCOCOEvaluator`, in evaluation's ground truth);
- a box partly outside its image: clipped to the image;
- the problems of a COCO annotation file as a file (:mod:`deqdet.data.annotation_file`: malformed
  boxes and annotations, orphan annotations, unknown categories, duplicate ids), found in one pass
  before the dataset is loaded: dropped, kept or an error, as that module's table says;
- no usable image left, or fewer classes configured than the dataset has: an error.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import (
    check_metadata_consistency,
    filter_images_with_only_crowd_annotations,
    print_instances_class_histogram,
)
from detectron2.utils import comm
from tqdm import tqdm

from ..errors import UserInputError
from .annotation_file import check_coco_dict, log_report
from .checks import clean_record_boxes, image_problem
from .datasets import ensure_shapes
from .shapes import SPLITS

__all__ = [
    "NUM_CLASSES_KEYS", "check_annotation_file", "check_num_classes", "checked_dataset_dicts", "load_dataset",
]

logger = logging.getLogger("deqdet")

# The config keys that hold the class count of each META_ARCHITECTURE (all must match the data).
NUM_CLASSES_KEYS = {
    "QueryDetector": ("MODEL.QUERY.NUM_CLASSES",),
    "ATSS": ("MODEL.ATSS.NUM_CLASSES",),
    "RetinaNet": ("MODEL.RETINANET.NUM_CLASSES",),
    "GeneralizedRCNN": ("MODEL.ROI_HEADS.NUM_CLASSES",),
    # and those of its dense detector (MODEL.DENSE_QUERY.DENSE_DETECTOR)
    "DenseQueryDetector": ("MODEL.QUERY.NUM_CLASSES",),
}
_LOGGED_PER_KIND = 20  # problems of one kind logged one by one per dataset; the rest only counted
_NAMED_IN_ERROR = 3  # images named in the one-line error
_CHECK_THREADS = 16  # header reads wait on the disk, not the CPU


def load_dataset(name: str) -> list[dict]:
    """``DatasetCatalog.get(name)`` after :func:`check_annotation_file` of its COCO file (when it has
    one), with a missing or malformed annotation file as a clear error."""
    if name not in DatasetCatalog.list():
        raise UserInputError(f"dataset {name!r} is not registered (DATASETS.TRAIN / DATASETS.TEST)")
    if name in SPLITS:
        ensure_shapes(name)  # generated on first use: its annotation file exists only afterwards
    json_file = MetadataCatalog.get(name).get("json_file")
    try:
        if json_file:
            check_annotation_file(name, json_file)
        dicts = DatasetCatalog.get(name)
    except json.JSONDecodeError as e:
        raise UserInputError(f"malformed JSON in {json_file or name}: {e}") from e
    except FileNotFoundError as e:
        raise UserInputError(
            f"annotation file of dataset {name!r} not found: {e.filename or json_file}"
        ) from e
    except (KeyError, AssertionError, ValueError, TypeError) as e:
        # Detectron2's load_coco_json (register_coco_instances) refuses what it cannot read, e.g. a
        # null or empty bbox, which deqdet.data.register_coco_file drops and names
        raise UserInputError(f"{json_file or name}: {e.args[0] if e.args else type(e).__name__}") from e
    if not dicts:
        raise UserInputError(f"dataset {name!r} is empty (no images in {json_file or 'its loader'})")
    return dicts


def check_annotation_file(name: str, json_file: str) -> None:
    """The up-front pass over dataset ``name``'s COCO file (:func:`check_coco_dict`), in training and
    evaluation alike: every problem named in the log, one summary line.

    Raises:
        UserInputError: problems that are errors (unknown categories, duplicate image ids, ...),
            counted and the first ones named, in one line.
    """
    with open(json_file) as f:
        coco = json.load(f)
    if not isinstance(coco, dict):
        raise UserInputError(f"{json_file}: not a COCO annotation file (a JSON object with 'images')")
    report = check_coco_dict(coco)
    source = f"dataset {name!r}, {json_file}"
    log_report(source, report, logger)
    error = report.error(source)
    if error:
        raise UserInputError(error)


def _log_problems(name: str, problems: list[tuple[str, str]], what: str) -> Counter:
    """Log ``(where, problem)`` pairs (at most ``_LOGGED_PER_KIND`` per kind); count them per kind."""
    kinds = Counter()
    for where, problem in problems:
        kind = problem.split(":")[0]
        kinds[kind] += 1
        if kinds[kind] <= _LOGGED_PER_KIND:
            logger.warning(f"dataset {name!r}: {what} {where}: {problem}")
    return kinds


def _number(count: int, noun: str) -> str:
    """``"1 box"``, ``"3 boxes"``, ``"2 images"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('x') else 's'}"


def _counts(kinds: Counter) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common())


def check_dataset(name: str, dicts: list[dict], *, skip_bad_images: bool) -> list[dict]:
    """The records of ``dicts`` whose images pass :func:`image_problem`, with their boxes cleaned
    (:func:`clean_record_boxes`); headers are read in a thread pool, with a progress bar.

    Raises:
        UserInputError: some images are unusable and ``skip_bad_images`` is false, or none is usable.
    """
    with ThreadPoolExecutor(min(_CHECK_THREADS, len(dicts))) as pool:
        found = list(
            tqdm(
                pool.map(image_problem, dicts),
                total=len(dicts),
                desc=f"checking {name}",
                unit="image",
                disable=None if comm.is_main_process() else True,  # None: only on a terminal
                mininterval=1.0,
            )
        )
    bad = [(record["file_name"], problem) for record, problem in zip(dicts, found) if problem]
    good = [record for record, problem in zip(dicts, found) if problem is None]
    dropped_boxes, clipped = [], 0
    for record in good:
        dropped, n_clipped = clean_record_boxes(record)
        dropped_boxes += [(f"{record['file_name']} box {bbox}", reason) for bbox, reason in dropped]
        clipped += n_clipped
    image_kinds = _log_problems(name, bad, "skipped image" if skip_bad_images else "image")
    box_kinds = _log_problems(name, dropped_boxes, "dropped")
    summary = [f"dataset {name!r}: {_number(len(dicts), 'image')} checked"]
    if bad:
        summary.append(f"{len(bad)} unusable ({_counts(image_kinds)})")
    if dropped_boxes:
        summary.append(f"{_number(len(dropped_boxes), 'box')} dropped ({_counts(box_kinds)})")
    if clipped:
        summary.append(f"{_number(clipped, 'box')} clipped to their image")
    if len(summary) == 1:
        summary.append("no problems found")
    logger.info("; ".join(summary))
    if bad and (not skip_bad_images or not good):
        named = "; ".join(f"{file_name} ({problem})" for file_name, problem in bad[:_NAMED_IN_ERROR])
        more = (
            f"; and {len(bad) - _NAMED_IN_ERROR} more (all in the log)" if len(bad) > _NAMED_IN_ERROR else ""
        )
        raise UserInputError(
            f"dataset {name!r}: {len(bad)} of {len(dicts)} images cannot be used: {named}{more}"
        )
    return good


def check_num_classes(cfg, name: str) -> None:
    """Compare the class count(s) configured for ``cfg.MODEL.META_ARCHITECTURE`` with the
    ``thing_classes`` of dataset ``name`` (known once it is loaded).

    Raises:
        UserInputError: fewer classes configured than the dataset has (more only warn).
    """
    classes = MetadataCatalog.get(name).get("thing_classes")
    if classes is None:
        return
    keys = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ())
    if cfg.MODEL.META_ARCHITECTURE == "DenseQueryDetector":
        keys += NUM_CLASSES_KEYS.get(cfg.MODEL.DENSE_QUERY.DENSE_DETECTOR, ())
    for key in keys:
        configured = functools.reduce(getattr, key.split("."), cfg)
        if configured < len(classes):
            raise UserInputError(
                f"{key} is {configured} but dataset {name!r} has {len(classes)} classes: "
                f"set {key} {len(classes)}"
            )
        if configured > len(classes):
            logger.warning(
                f"{key} is {configured} but dataset {name!r} has {len(classes)} classes: "
                f"{configured - len(classes)} class outputs will never see an object"
            )


def checked_dataset_dicts(cfg, names, *, is_train: bool) -> list[dict]:
    """The records of datasets ``names``, each loaded once and checked, ready for Detectron2's
    ``build_detection_{train,test}_loader(dataset=...)``.

    Training skips unusable images and, with ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``, images left
    without boxes; evaluation refuses unusable images (see the module's docstring).
    """
    per_dataset = []
    for name in names:
        per_dataset.append(check_dataset(name, load_dataset(name), skip_bad_images=is_train))
        check_num_classes(cfg, name)
    if len(names) > 1:
        check_metadata_consistency("thing_classes", names)
    dataset = list(itertools.chain.from_iterable(per_dataset))
    if is_train and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dataset = filter_images_with_only_crowd_annotations(dataset)
        if not dataset:
            raise UserInputError(f"no training image with a usable box in {', '.join(names)}")
    classes = MetadataCatalog.get(names[0]).get("thing_classes")
    if is_train and classes is not None:
        print_instances_class_histogram(dataset, classes)
    return dataset
