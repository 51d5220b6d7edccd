"""One pass over a COCO annotation file (its parsed JSON) that finds every annotation training and
evaluation cannot use as it is, shared by both so that they treat the same annotations alike.

=========================  ==================================================================
problem                    outcome
=========================  ==================================================================
malformed box              ``bbox`` missing or not four numbers: the annotation is dropped
orphan annotation          ``image_id`` names no image of the file: dropped
duplicate annotation id    kept; evaluation renumbers the later ones (COCOeval finds boxes by id)
unknown category           ``category_id`` not in ``categories``: error
duplicate image id         two images share an ``id`` (whose objects are whose?): error
malformed annotation       not an object, or without ``id``, ``image_id`` or ``category_id``: error
malformed image/category   an image without ``id``, ``file_name`` or a positive ``width`` and
                           ``height``; a category without ``id`` or ``name``: error
=========================  ==================================================================

Boxes that are well formed but unusable (zero size, not finite, outside the image) are the
record-level checks' business (:mod:`deqdet.data.checks`).
"""

from __future__ import annotations

import logging
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Tuple

__all__ = ["DROPPED", "FATAL", "AnnotationFileReport", "check_coco_dict", "log_report"]

DROPPED = ("malformed box", "orphan annotation")
RENUMBERED = "duplicate annotation id"
FATAL = (
    "malformed image", "malformed category", "malformed annotation", "duplicate image id", "unknown category",
)
_LOGGED_PER_KIND = 20
_NAMED_IN_ERROR = 3


@dataclass
class AnnotationFileReport:
    """What :func:`check_coco_dict` found.

    Attributes:
        annotations: the usable annotations, in file order (``id`` as in the file).
        problems: ``(kind, detail)`` per problem, in file order; ``kind`` one of
            :data:`DROPPED`, ``"duplicate annotation id"`` or :data:`FATAL`.
        num_annotations: annotations in the file.
    """

    annotations: List[dict] = field(default_factory=list)
    problems: List[Tuple[str, str]] = field(default_factory=list)
    num_annotations: int = 0

    def counts(self, kinds) -> Counter:
        return Counter(kind for kind, _ in self.problems if kind in kinds)

    def error(self, source: str) -> str | None:
        """One line naming the fatal problems (count per kind, the first few of each), or None."""
        parts = []
        for kind, n in self.counts(FATAL).items():
            named = [detail for k, detail in self.problems if k == kind][:_NAMED_IN_ERROR]
            more = f" and {n - len(named)} more" if n > len(named) else ""
            parts.append(f"{n} x {kind} ({'; '.join(named)}{more})")
        return f"{source}: {'; '.join(parts)}" if parts else None


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_id(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _image_problem(image) -> str | None:
    if not isinstance(image, dict):
        return f"{str(image)[:60]} is not an object"
    for key in ("id", "file_name", "width", "height"):
        if key not in image:
            return f"image {image.get('id', '?')} has no {key}"
    if not _is_id(image["id"]):
        return f"image id {image['id']!r} is not a number or a string"
    if not all(_is_number(image[k]) and image[k] > 0 for k in ("width", "height")):
        return (f"image {image['id']}: width {image['width']!r} and height {image['height']!r} "
                "must be positive")
    return None


def check_coco_dict(coco: dict) -> AnnotationFileReport:
    """Check the ``images``, ``categories`` and ``annotations`` of a parsed COCO file (not changed)."""
    report = AnnotationFileReport()
    images, categories = coco.get("images", []), coco.get("categories", [])
    image_ids = Counter()
    for image in images:
        problem = _image_problem(image)
        if problem:
            report.problems.append(("malformed image", problem))
        else:
            image_ids[image["id"]] += 1
    report.problems += [
        ("duplicate image id", f"image id {i} is used {n} times") for i, n in image_ids.items() if n > 1]
    category_ids = set()
    for category in categories:
        if not isinstance(category, dict) or not _is_id(category.get("id")) or "name" not in category:
            report.problems.append(("malformed category", f"{str(category)[:60]} needs an id and a name"))
        else:
            category_ids.add(category["id"])

    annotation_ids = Counter()
    annotations = coco.get("annotations", [])
    report.num_annotations = len(annotations)
    for n, ann in enumerate(annotations):
        missing = [k for k in ("id", "image_id", "category_id") if not _is_id(ann.get(k))] \
            if isinstance(ann, dict) else None
        if missing is None or missing:
            what = ("is not an object" if missing is None
                    else f"has no (number or string) {', '.join(missing)}")
            report.problems.append(("malformed annotation", f"annotations[{n}] {what}"))
            continue
        where = f"annotation {ann['id']} (image_id {ann['image_id']})"
        annotation_ids[ann["id"]] += 1
        if ann["category_id"] not in category_ids:
            report.problems.append(("unknown category", f"{where} category_id {ann['category_id']!r}"))
        elif ann["image_id"] not in image_ids:
            report.problems.append(("orphan annotation", f"{where}: no image has this id"))
        elif not (isinstance(ann.get("bbox"), (list, tuple)) and len(ann["bbox"]) == 4
                  and all(_is_number(v) for v in ann["bbox"])):
            report.problems.append(
                ("malformed box", f"{where} box {ann.get('bbox')!r} is not [x, y, width, height]"))
        else:
            report.annotations.append(ann)
    report.problems += [
        (RENUMBERED, f"annotation id {i} is used {n} times") for i, n in annotation_ids.items() if n > 1]
    return report


def log_report(source: str, report: AnnotationFileReport, logger: logging.Logger) -> None:
    """Log every problem (the first few of each kind) and one summary line; nothing when none."""
    if not report.problems:
        return
    logged = Counter()
    for kind, detail in report.problems:
        logged[kind] += 1
        if logged[kind] <= _LOGGED_PER_KIND:
            outcome = "dropped" if kind in DROPPED else "kept" if kind == RENUMBERED else "error"
            logger.warning(f"{source}: {kind} ({outcome}): {detail}")
    summary = [f"{report.num_annotations} annotations"]
    dropped = report.counts(DROPPED)
    if dropped:
        kinds = ", ".join(f"{k}: {n}" for k, n in dropped.items())
        summary.append(f"{sum(dropped.values())} dropped ({kinds})")
    duplicates = report.counts((RENUMBERED,))
    if duplicates:
        summary.append(f"{duplicates[RENUMBERED]} annotation ids used more than once (kept)")
    logger.warning(f"{source}: " + "; ".join(summary))
