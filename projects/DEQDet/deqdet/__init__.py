"""DEQDet, AdaMixer and Dynamic Head for Detectron2.

Importing ``deqdet`` registers everything the package adds to Detectron2's registries and
catalogs (the ``shapes`` datasets; models as they land) and changes nothing else in the process: the
entry points silence the warnings a user cannot act on (:func:`deqdet.quiet.silence_known_warnings`)
and Detectron2's ``COCOEvaluator`` gets the fast COCOeval where this project sets up a run or builds
an evaluator (:func:`deqdet.evaluation.install_fast_coco_eval`).
"""

from .quiet import known_warnings_silenced

# Detectron2's and fvcore's modules warn when imported (deqdet.quiet); that import happens here.
with known_warnings_silenced():
    from . import checkpoint, data, modeling  # noqa: F401  (registers datasets, models, converters)
    from .config import add_deqdet_config

__all__ = ["add_deqdet_config"]
