"""A fast COCOeval for Detectron2's ``COCOEvaluator`` when detectron2's own is not compiled.

``COCOEvaluator(use_fast_impl=True)`` (its default) uses ``COCOeval_opt`` from detectron2's C++
extension; without ``detectron2._C`` it falls back to pycocotools' pure-Python COCOeval, which
is slow. :func:`install_fast_coco_eval` puts ``faster_coco_eval.COCOeval_faster`` (PyPI
``faster-coco-eval``, a C++ port of the same algorithm) in its place, so that from then on every
``COCOEvaluator`` in the process, built by this project or by the user, evaluates fast. The run set-up
(:func:`deqdet.engine.setup`) and :class:`CheckedCOCOEvaluator` call it; importing ``deqdet`` does not.
Nothing changes when detectron2's own fast COCOeval is built or ``faster-coco-eval`` is missing.

:class:`CheckedCOCOEvaluator` evaluates against the ground truth that training uses;
:class:`OutputKeyEvaluator` evaluates another output of the model (the combined detector's dense head).
"""

from __future__ import annotations

import logging
from collections import Counter

from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, coco_evaluation
from pycocotools.cocoeval import COCOeval

from .data.annotation_file import DROPPED, check_coco_dict
from .data.checks import clean_box

__all__ = [
    "CheckedCOCOEvaluator", "OutputKeyEvaluator", "clean_ground_truth", "install_fast_coco_eval",
    "coco_eval_backend",
]


_LOGGED = 20  # dropped ground-truth annotations named one by one per kind; the rest only counted


def _faster_coco_eval(coco_gt, coco_dt, iou_type):
    """``COCOeval``-compatible constructor over ``faster_coco_eval.COCOeval_faster``."""
    from faster_coco_eval import COCOeval_faster

    return COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=print)


def install_fast_coco_eval() -> str:
    """Make ``COCOEvaluator`` use faster-coco-eval when detectron2's fast COCOeval is not built.

    Returns the name of the backend now in use (see :func:`coco_eval_backend`).
    """
    if coco_evaluation.COCOeval_opt is COCOeval:  # detectron2 fell back to pycocotools
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            return coco_eval_backend()
        coco_evaluation.COCOeval_opt = _faster_coco_eval
    return coco_eval_backend()


def coco_eval_backend() -> str:
    """Which COCOeval ``COCOEvaluator(use_fast_impl=True)`` runs in this process."""
    impl = coco_evaluation.COCOeval_opt
    if impl is COCOeval:
        return "pycocotools (slow, pure Python)"
    if impl is _faster_coco_eval:
        import faster_coco_eval

        return f"faster-coco-eval {faster_coco_eval.__version__}"
    return "detectron2 COCOeval_opt (compiled)"


def clean_ground_truth(coco_api) -> tuple[list[tuple[str, str]], int]:
    """Make a pycocotools ``COCO``'s ground truth the one training uses: leave out what
    :func:`deqdet.data.annotation_file.check_coco_dict` drops (malformed boxes, orphan annotations;
    annotations of unknown categories, which training refuses and COCOeval ignores), drop the boxes
    :func:`deqdet.data.checks.clean_box` drops and clip those partly outside their image; give the
    later of duplicate annotation ids new ids (COCOeval looks boxes up by id).

    Returns:
        dropped: ``("annotation ID (image_id N) ...", reason)`` per annotation left out;
        clipped: how many boxes were clipped.
    """
    report = check_coco_dict(coco_api.dataset)
    dropped = [(detail, kind) for kind, detail in report.problems if kind in DROPPED]
    kept, clipped, used_ids = [], 0, set()
    next_id = max((a["id"] for a in report.annotations if isinstance(a["id"], int)), default=0) + 1
    for ann in report.annotations:
        image = coco_api.imgs[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        box, reason = clean_box([x, y, x + w, y + h], image["width"], image["height"])
        if box is None:
            dropped.append((f"annotation {ann['id']} (image_id {ann['image_id']}) box {ann['bbox']}", reason))
            continue
        if box != [x, y, x + w, y + h]:
            clipped += 1
            ann = {**ann, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
        if ann["id"] in used_ids:
            ann, next_id = {**ann, "id": next_id}, next_id + 1
        used_ids.add(ann["id"])
        kept.append(ann)
    if len(kept) != report.num_annotations or clipped or kept != report.annotations:
        coco_api.dataset["annotations"] = kept
        coco_api.createIndex()
    return dropped, clipped


class CheckedCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` over the ground truth training sees: boxes that are
    malformed, not finite, of zero size or outside their image are dropped (an object the
    detector is never taught would otherwise count as missed, and a zero-size box can never be
    matched), boxes partly outside are clipped (predictions are clipped to the image too), and
    annotations whose ``image_id`` names no image are left out (:func:`clean_ground_truth`); each
    is named in a warning, the first 20 of each kind. Building one makes ``COCOEvaluator`` use the fast
    COCOeval (:func:`install_fast_coco_eval`)."""

    def __init__(self, dataset_name: str, *args, **kwargs):
        install_fast_coco_eval()
        super().__init__(dataset_name, *args, **kwargs)
        dropped, clipped = clean_ground_truth(self._coco_api)
        logger = logging.getLogger("deqdet")
        kinds = Counter()
        for where, reason in dropped:
            kinds[reason] += 1
            if kinds[reason] <= _LOGGED:
                logger.warning(
                    f"evaluation of {dataset_name!r}: {reason}, dropped from the ground truth: {where}")
        if dropped or clipped:
            counts = ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common())
            changed = [f"{len(dropped)} ground-truth boxes dropped ({counts})"] if dropped else []
            changed += [f"{clipped} ground-truth boxes clipped"] if clipped else []
            logger.info(f"evaluation of {dataset_name!r}: {', '.join(changed)}, as in training")


class OutputKeyEvaluator(DatasetEvaluator):
    """Runs ``evaluator`` (which reads ``outputs[i]["instances"]``) on ``outputs[i][key]`` instead, and
    reports its tasks with ``prefix`` in front (``bbox`` -> ``dense_bbox``), so that two heads of one model
    are evaluated in one pass (``DenseQueryDetector`` with ``INFERENCE_SOURCE both`` returns its dense
    head's detections as ``dense_instances``). Outputs without ``key`` (a model that returns no such
    entry) are left out; ``evaluator`` then reports that it received no predictions."""

    def __init__(self, evaluator: DatasetEvaluator, key: str, prefix: str):
        self.evaluator, self.key, self.prefix = evaluator, key, prefix

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        pairs = [(i, {"instances": o[self.key]}) for i, o in zip(inputs, outputs) if self.key in o]
        if pairs:
            self.evaluator.process(*map(list, zip(*pairs)))

    def evaluate(self):
        results = self.evaluator.evaluate()
        return None if results is None else {self.prefix + task: value for task, value in results.items()}
