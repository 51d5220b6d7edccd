"""Models. Importing this package registers them in Detectron2's registries."""

from . import backbone, dense_query, deq, dyhead, meta_arch  # noqa: F401
