"""The warnings of Detectron2's and fvcore's code that a user cannot act on, by their exact messages:

- fvcore and Detectron2 apply ``torch.jit.script`` to a few functions when imported, and PyTorch
  deprecates ``torch.jit.script`` with a FutureWarning per call;
- Detectron2's ``DefaultAnchorGenerator`` (ATSS, RetinaNet) calls ``torch.meshgrid`` without
  ``indexing``, meaning the "ij" indexing that PyTorch's warning says will stay the default.

Importing ``deqdet`` imports those modules with the warnings silenced for that import only
(:func:`known_warnings_silenced`) and leaves the process's warning filters as they were;
``train_net.py`` and the tools call :func:`silence_known_warnings` to keep them out of their runs. Only
the standard library is imported here, so that ``deqdet/__init__.py`` can use it before Detectron2.
"""

import contextlib
import warnings
from typing import Iterator

__all__ = ["KNOWN_WARNINGS", "known_warnings_silenced", "silence_known_warnings"]

#: (message regex, category) of each warning silenced.
KNOWN_WARNINGS = (
    (r"`torch\.jit\.script` is deprecated", FutureWarning),
    (r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument",
     UserWarning),
)


def silence_known_warnings() -> None:
    """Ignore the :data:`KNOWN_WARNINGS` for the rest of the process (the entry points)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Ignore the :data:`KNOWN_WARNINGS` inside the ``with`` block; the filters are restored after it."""
    with warnings.catch_warnings():
        silence_known_warnings()
        yield
