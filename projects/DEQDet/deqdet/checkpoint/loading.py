"""Loading checkpoints with one-line errors naming the file (``MODEL.WEIGHTS`` or the one that
``OUTPUT_DIR/last_checkpoint`` names) instead of fvcore's assertion or PyTorch's zip-reader traceback.

Weights whose shapes differ from the model's (fvcore skips them, one warning per parameter) are
refused for inference: a model evaluated or run with a classifier it never learnt gives random
labels, so the error names the checkpoint's and the model's class counts and the ``NUM_CLASSES``
keys to set. When fine-tuning from ``MODEL.WEIGHTS`` (another dataset's detector) the layers of other
shapes start fresh, named in one log line."""

from __future__ import annotations

import logging
import os
import pickle
import re
from contextlib import contextmanager, nullcontext
from typing import List, Optional, Sequence, Tuple

from ..data.loading import NUM_CLASSES_KEYS
from ..errors import UserInputError
from .classes import CHECKPOINT_KEY as CLASSES_KEY
from .classes import model_num_classes

__all__ = ["readable_checkpoint_errors", "shapes_checked"]

logger = logging.getLogger("deqdet")

# fvcore's record of a parameter of another shape: (name, shape in the checkpoint, shape in the model).
_Mismatch = Tuple[str, Tuple[int, ...], Tuple[int, ...]]

# The classifier weights by name, whose rows score the classes (times the anchors per location of a
# dense head), with the rows that score no class (Faster R-CNN's background); the first match counts.
_CLASSIFIERS = (
    (re.compile(r"(.+\.)?roi_heads\.box_predictor\.cls_score\.weight"), 1),
    (re.compile(r"(.+\.)?(fc_cls|cls_logits|cls_score)\.weight"), 0),
)
_NAMED_MISMATCHES = 3  # parameters of another shape named in the error
_NAMED_CLASSES = 5  # class names of the checkpoint quoted in the error


@contextmanager
def readable_checkpoint_errors(checkpointer, weights: str, *, resume: bool, inference_cfg=None):
    """Wrap ``checkpointer.resume_or_load(weights, resume=resume)`` (a Detectron2 / fvcore
    ``Checkpointer``): the file it is about to load must exist, and a file that cannot be loaded
    (empty, partly written, not a checkpoint, another detector's optimizer state) becomes a
    ``UserInputError`` naming it.

    Args:
        inference_cfg: the model's config when it is loaded for inference (``--eval-only``): weights
            of other shapes are refused (:func:`shapes_checked`). Without it (training), the layers of
            ``weights`` whose shapes differ start fresh, named in one log line; a resumed run's own
            checkpoint loads as fvcore loads it.

    Raises:
        UserInputError: the file is missing or cannot be loaded; for inference, its weights do not fit
            the model.
    """
    resuming = resume and checkpointer.has_checkpoint()
    if resuming:
        path = checkpointer.get_checkpoint_file()
        named_by = os.path.join(checkpointer.save_dir, "last_checkpoint")
    else:
        path, named_by = weights, "MODEL.WEIGHTS"
    if path and "://" not in path and not os.path.isfile(path):
        raise UserInputError(f"checkpoint not found: {path} (named by {named_by})")
    if path and "://" not in path and os.path.getsize(path) == 0:
        raise UserInputError(f"checkpoint is an empty file: {path} (named by {named_by})")
    checked = (
        nullcontext() if resuming and inference_cfg is None
        else shapes_checked(checkpointer, path, inference_cfg=inference_cfg, named_by=named_by)
    )
    try:
        with checked:
            yield
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(f"cannot load checkpoint {path} (named by {named_by}): {reason}") from e


@contextmanager
def shapes_checked(checkpointer, path: str, *, inference_cfg=None, named_by: str = "MODEL.WEIGHTS"):
    """While ``checkpointer`` (a Detectron2 / fvcore ``Checkpointer``) loads ``path``: parameters whose
    shapes differ between the checkpoint and the model are refused when the model is loaded for
    inference (``inference_cfg``: its config); otherwise they start fresh and one warning names their
    layers, instead of fvcore's warning per parameter and its list of them among the missing keys.
    Other missing keys and unexpected keys are logged by fvcore as usual.

    Raises:
        UserInputError: for inference, a parameter's shape differs. For a classifier of another class
            count the message names both counts (and the checkpoint's class names, when it holds
            them) and the ``NUM_CLASSES`` keys to set; otherwise the first parameters and shapes.
    """
    load_model = checkpointer._load_model

    def load_checked(checkpoint):
        incompatible = load_model(checkpoint)  # leaves in ``checkpoint`` what it holds besides the model
        mismatches = incompatible.incorrect_shapes
        if not mismatches:
            return incompatible
        source = f"checkpoint {path} (named by {named_by})"
        if inference_cfg is not None:
            raise UserInputError(_refusal(source, mismatches, inference_cfg, checkpoint.get(CLASSES_KEY)))
        fresh = {name for name, _, _ in mismatches}
        layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name, _, _ in mismatches))
        logger.warning(f"{source}: layers of other shapes start fresh: {', '.join(layers)}")
        missing = [k for k in incompatible.missing_keys if k not in fresh]
        return incompatible._replace(missing_keys=missing, incorrect_shapes=[])

    checkpointer._load_model = load_checked
    try:
        yield
    finally:
        del checkpointer._load_model


def _refusal(source: str, mismatches: Sequence[_Mismatch], cfg, classes_entry: Optional[dict]) -> str:
    """The one-line reason why the weights of ``source`` do not fit the model of ``cfg``."""
    model_classes = model_num_classes(cfg)
    classes = _checkpoint_num_classes(mismatches, model_classes) if model_classes else None
    if classes is None:
        return f"{source} does not fit the model of this config, shapes differ: {_shapes(mismatches)}"
    names = (classes_entry or {}).get("names") or []
    quoted = ", ".join(names[:_NAMED_CLASSES]) + (", ..." if len(names) > _NAMED_CLASSES else "")
    keys = " and ".join(f"{key} {classes}" for key in _num_classes_keys(cfg))
    message = (f"{source} has {classes} classes{f' ({quoted})' if names else ''} but the model has "
               f"{model_classes}: set {keys}")
    others = [m for m in mismatches if not _scales_with_classes(m, model_classes, classes)]
    if others:
        message += f"; other parameters differ in shape too: {_shapes(others)}"
    return message


def _checkpoint_num_classes(mismatches: Sequence[_Mismatch], model_classes: int) -> Optional[int]:
    """The class count of the checkpoint's classifier, the first of ``mismatches`` that is one
    (:data:`_CLASSIFIERS`); None when none is."""
    for name, in_checkpoint, in_model in mismatches:
        background = next((rows for pattern, rows in _CLASSIFIERS if pattern.fullmatch(name)), None)
        if background is None or in_checkpoint[1:] != in_model[1:]:
            continue
        per_class, rest = divmod(in_model[0] - background, model_classes)
        if rest == 0 and per_class > 0 and (in_checkpoint[0] - background) % per_class == 0:
            return (in_checkpoint[0] - background) // per_class
    return None


def _scales_with_classes(mismatch: _Mismatch, model_classes: int, classes: int) -> bool:
    """Whether the first dimension alone differs, in proportion to the class count (a classifier's
    weight or bias, Faster R-CNN's class-specific box deltas; with or without a background row)."""
    _, in_checkpoint, in_model = mismatch
    if not in_model or in_checkpoint[1:] != in_model[1:]:
        return False
    return any((in_model[0] - extra) * classes == (in_checkpoint[0] - extra) * model_classes
               for extra in (0, 1))


def _shapes(mismatches: Sequence[_Mismatch]) -> str:
    """The first :data:`_NAMED_MISMATCHES` of ``mismatches`` with their shapes, and how many there are."""
    def shape(dims):
        return "x".join(map(str, dims)) or "scalar"

    named = [f"{name} {shape(c)} in the checkpoint, {shape(m)} in the model"
             for name, c, m in mismatches[:_NAMED_MISMATCHES]]
    more = len(mismatches) > _NAMED_MISMATCHES
    return "; ".join(named) + (f"; ... ({len(mismatches)} parameters)" if more else "")


def _num_classes_keys(cfg) -> List[str]:
    """The config keys that hold the class count of the model of ``cfg``, the combined detector's
    dense detector's included."""
    keys = list(NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ()))
    if cfg.MODEL.META_ARCHITECTURE == "DenseQueryDetector":
        keys += NUM_CLASSES_KEYS.get(cfg.MODEL.DENSE_QUERY.DENSE_DETECTOR, ())
    return keys
