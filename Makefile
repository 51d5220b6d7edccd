# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv when needed.
PY := .venv/bin/python
DEMO_CONFIG ?= configs/shapes/demo.yaml
DEMO_OUTPUT ?= output/demo

.PHONY: setup demo test data bench clean

setup:
	@python3 tools/setup_env.py

data: setup
	$(PY) -m deqdet.data.prepare shapes_train shapes_val

demo: setup
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

test: setup
	$(PY) -m pytest -q tests

# Speed and memory side by side (benchmarks/run.py; BENCH_ARGS=--quick: under 10 minutes on 2 cores).
bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf output
