# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv when needed.
PY := .venv/bin/python
DEMO_CONFIG ?= configs/shapes/demo.yaml
DEMO_OUTPUT ?= output/demo

.PHONY: help setup demo test data bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /  make \1\t/' | expand -t 16

setup:  ## create .venv (pinned requirements, detectron2, deqdet editable); skipped when up to date
	@python3 tools/setup_env.py

data: setup  ## generate the embedded `shapes` dataset into the cache
	$(PY) -m deqdet.data.prepare shapes_train shapes_val

demo: setup  ## train + evaluate the demo detector on `shapes`, draw its predictions
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

test: setup  ## lint (the pinned ruff, configured in pyproject.toml), then run the test suite
	.venv/bin/ruff check .
	$(PY) -m pytest -q tests

bench: setup  ## speed and memory side by side (benchmarks/run.py; BENCH_ARGS=--quick for the short run)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:  ## remove output/
	rm -rf output
