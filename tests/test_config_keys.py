"""docs/config_keys.md lists exactly the keys ``add_deqdet_config`` adds to Detectron2's defaults."""

import os
import re

from detectron2.config import get_cfg

from deqdet.config import add_deqdet_config
from tests.helpers import ROOT


def _flat(node, prefix=""):
    keys = set()
    for name, value in node.items():
        keys |= _flat(value, f"{prefix}{name}.") if hasattr(value, "items") else {prefix + name}
    return keys


def test_docs_table_lists_every_added_key():
    added = _flat(add_deqdet_config(get_cfg())) - _flat(get_cfg())
    with open(os.path.join(ROOT, "docs", "config_keys.md")) as f:
        documented = set(re.findall(r"^\| `([A-Z0-9_.]+)` \|", f.read(), flags=re.M))
    assert documented == added
