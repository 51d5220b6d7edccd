"""Cheap checks of one dataset record: its image file (header only) and its boxes.

Nothing here decodes pixels: :func:`image_problem` opens the file's header with PIL (size, mode,
EXIF orientation), which costs a few kilobytes of reading per image. A truncated pixel stream
passes it; the data loader's :class:`~deqdet.data.mapper.CheckedDatasetMapper` catches that later.
"""

from __future__ import annotations

import math
import os

from detectron2.structures import BoxMode
from PIL import Image, UnidentifiedImageError

__all__ = ["MIN_BOX_SIZE", "clean_box", "clean_record_boxes", "image_problem"]

# Boxes narrower or lower than this (pixels, after clipping to the image) are dropped. Training
# already drops boxes that end up empty after augmentation (detectron2's filter_empty_instances,
# 1e-5 px after resizing); this threshold sits above that so that training and evaluation drop
# the same boxes whatever the resize factor.
MIN_BOX_SIZE = 1e-3

# EXIF orientations that rotate the picture by 90 or 270 degrees (detectron2's read_image applies them).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
# PIL modes that detectron2's read_image converts to 8-bit RGB by clipping at 255 (a 16-bit
# picture comes out almost white): refused rather than trained on.
_CLIPPED_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation found in the header (1 when none). A PNG's EXIF chunk may follow the
    pixels, and PIL then decodes the whole image to find it: only one before the pixels is read
    here (one after them is caught as a size mismatch when the image is decoded)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: detectron2's read_image ignores it too
        return 1


def image_problem(record: dict) -> str | None:
    """What makes ``record``'s image unusable (``"<kind>: <detail>"`` or ``"<kind>"``), or ``None``
    when its header reads fine and its size (after EXIF rotation) is the annotation's
    ``width`` x ``height``."""
    file_name = record["file_name"]
    if not os.path.isfile(file_name):
        return "image not found"
    if os.path.getsize(file_name) == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(file_name) as image:
            width, height = image.size
            mode = image.mode
            orientation = _exif_orientation(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable: {e}"
    if mode in _CLIPPED_MODES:
        return f"16/32-bit image: mode {mode} would be clipped to 8 bits, convert it to 8-bit RGB"
    rotated = orientation in _TRANSPOSING_ORIENTATIONS
    if rotated:
        width, height = height, width
    expected = (record.get("width", width), record.get("height", height))
    if expected != (width, height):
        note = " after its EXIF rotation" if rotated else ""
        return f"size mismatch: annotation says {expected[0]}x{expected[1]}, image is {width}x{height}{note}"
    return None


def clean_box(xyxy, width: float, height: float) -> tuple[list[float] | None, str | None]:
    """A box clipped to the ``width`` x ``height`` image, or ``None`` and why it cannot be used.

    Returns:
        (box, None) for a usable box (XYXY, clipped); (None, reason) for a non-finite box, one
        of zero or negative size, or one with nothing left inside the image.
    """
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, "non-finite box"
    if x1 - x0 < MIN_BOX_SIZE or y1 - y0 < MIN_BOX_SIZE:
        return None, "zero or negative size"
    clipped = [
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    ]
    if clipped[2] - clipped[0] < MIN_BOX_SIZE or clipped[3] - clipped[1] < MIN_BOX_SIZE:
        return None, "outside the image"
    return clipped, None


def clean_record_boxes(record: dict) -> tuple[list[tuple[list, str]], int]:
    """Drop ``record``'s unusable boxes and clip the others to the image, in place.

    Returns:
        dropped: ``(bbox as annotated, reason)`` per dropped annotation.
        clipped: how many boxes were clipped.
    """
    kept, dropped, clipped = [], [], 0
    for ann in record.get("annotations", []):
        mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
        try:
            xyxy = BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS)
        except (KeyError, TypeError, ValueError, AssertionError):  # AssertionError: a relative box mode
            dropped.append((ann.get("bbox"), "malformed box"))
            continue
        box, reason = clean_box(xyxy, record.get("width", math.inf), record.get("height", math.inf))
        if box is None:
            dropped.append((ann["bbox"], reason))
            continue
        if box != [float(v) for v in xyxy]:
            clipped += 1
            ann = {**ann, "bbox": BoxMode.convert(box, BoxMode.XYXY_ABS, mode)}
        kept.append(ann)
    if "annotations" in record:
        record["annotations"] = kept
    return dropped, clipped

