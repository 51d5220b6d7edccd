"""Loading checkpoints with one-line errors naming the file (``MODEL.WEIGHTS`` or the one that
``OUTPUT_DIR/last_checkpoint`` names) instead of fvcore's assertion or PyTorch's zip-reader traceback."""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager

from ..errors import UserInputError

__all__ = ["readable_checkpoint_errors"]


@contextmanager
def readable_checkpoint_errors(checkpointer, weights: str, *, resume: bool):
    """Wrap ``checkpointer.resume_or_load(weights, resume=resume)`` (a Detectron2 / fvcore
    ``Checkpointer``): the file it is about to load must exist, and a file that cannot be loaded
    (empty, partly written, not a checkpoint, another detector's optimizer state) becomes a
    ``UserInputError`` naming it.

    Raises:
        UserInputError: the file is missing or cannot be loaded.
    """
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
        named_by = os.path.join(checkpointer.save_dir, "last_checkpoint")
    else:
        path, named_by = weights, "MODEL.WEIGHTS"
    if path and "://" not in path and not os.path.isfile(path):
        raise UserInputError(f"checkpoint not found: {path} (named by {named_by})")
    if path and "://" not in path and os.path.getsize(path) == 0:
        raise UserInputError(f"checkpoint is an empty file: {path} (named by {named_by})")
    try:
        yield
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(f"cannot load checkpoint {path} (named by {named_by}): {reason}") from e
