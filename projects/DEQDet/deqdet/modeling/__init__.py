"""Models. Importing this package registers them in Detectron2's registries."""

from . import backbone  # noqa: F401
from . import meta_arch  # noqa: F401
from . import dyhead  # noqa: F401
from . import deq  # noqa: F401
from . import dense_query  # noqa: F401
