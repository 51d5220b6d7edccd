"""Registration of the ``shapes`` splits in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Images are generated on first use into ``$DEQDET_DATA/shapes-v<generator version>/<split>``
(``DEQDET_DATA`` defaults to ``~/.cache/deqdet``), so a changed generator never reuses stale files.
"""

from __future__ import annotations

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from filelock import FileLock

from .shapes import CLASSES, GENERATOR_VERSION, SPLITS, generate_split

__all__ = ["shapes_root", "ensure_shapes", "register_shapes"]


def shapes_root() -> Path:
    """Folder holding all generated splits of the current generator version."""
    base = os.environ.get("DEQDET_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "deqdet")
    return Path(base) / f"shapes-v{GENERATOR_VERSION}"


def ensure_shapes(name: str) -> Path:
    """Generate split ``name`` unless it is complete on disk; returns its COCO JSON path.

    Safe to call from several processes at once (one generates, the others wait).
    """
    if name not in SPLITS:
        raise KeyError(f"unknown shapes split {name!r}; known: {sorted(SPLITS)}")
    root = shapes_root()
    json_path = root / name / "annotations.json"
    if json_path.exists():
        return json_path
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if not json_path.exists():
            print(f"[deqdet] generating {name} ({SPLITS[name].num_images} images) into {root / name}",
                  flush=True)
            generate_split(name, SPLITS[name], root)
    return json_path


def _load(name: str) -> list[dict]:
    json_path = ensure_shapes(name)
    return load_coco_json(str(json_path), str(json_path.parent), name)


def register_shapes() -> None:
    """Register every split of :data:`SPLITS` (idempotent)."""
    for name in SPLITS:
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: _load(name))
        MetadataCatalog.get(name).set(
            thing_classes=list(CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASSES))},
            json_file=str(shapes_root() / name / "annotations.json"),
            image_root=str(shapes_root() / name),
            evaluator_type="coco",
        )
