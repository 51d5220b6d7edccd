"""A fast COCOeval for Detectron2's ``COCOEvaluator`` when detectron2's own is not compiled.

``COCOEvaluator(use_fast_impl=True)`` (its default) uses ``COCOeval_opt`` from detectron2's C++
extension; without ``detectron2._C`` it falls back to pycocotools' pure-Python COCOeval, which
is slow. :func:`install_fast_coco_eval` puts ``faster_coco_eval.COCOeval_faster`` (PyPI
``faster-coco-eval``, a C++ port of the same algorithm) in its place, so every
``COCOEvaluator`` in the process, built by this project or by the user, evaluates fast.
Nothing changes when detectron2's own fast COCOeval is built or ``faster-coco-eval`` is missing.
"""

from __future__ import annotations

from detectron2.evaluation import coco_evaluation
from pycocotools.cocoeval import COCOeval

__all__ = ["install_fast_coco_eval", "coco_eval_backend"]


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
