"""Generate ``shapes`` splits ahead of time: ``python -m deqdet.data.prepare [SPLIT ...]``."""

import argparse
import time

from .datasets import ensure_shapes
from .shapes import SPLITS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("splits", nargs="*", default=["shapes_train", "shapes_val"], choices=sorted(SPLITS))
    args = parser.parse_args()
    for name in args.splits:
        start = time.perf_counter()
        path = ensure_shapes(name)
        print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
