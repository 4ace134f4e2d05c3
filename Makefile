.PHONY: setup services main test test-unit lint airflow benchmarks bench-preprocess bench-quality bench-neighbours bench-publish bench-dag bench-fewshot bench-memory

setup:
	scripts/setup.sh

services: setup
	scripts/services.sh start

main:
	scripts/run_main.sh

test:
	scripts/run_tests.sh

# the fast tier: no services, no DAG runs (markers in pyproject.toml)
test-unit: setup
	.venv/bin/python -m pytest -q -m unit

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

airflow: services
	scripts/airflow_local.sh


benchmarks: bench-preprocess bench-quality bench-neighbours bench-publish bench-dag bench-fewshot bench-memory

bench-publish: services
	.venv/bin/python -m benchmarks.publish

# Benchmarks on the full ../shared fashion catalogue: seed it into its own indices, dump and
# preprocess it once under .prodcat/bench, then measure.
CATALOGUE ?= ../shared/data/fashion
BENCH_ROOT := .prodcat/bench/data
BENCH_RUN := $(BENCH_ROOT)/runs/prodcat_categorise/bench
PRODCAT := .venv/bin/prodcat --products-index bench-products --categories-index bench-categories

$(BENCH_RUN)/dump/_SUCCESS: | services
	$(PRODCAT) seed --catalogue $(CATALOGUE) --image-base-url file://$(abspath $(CATALOGUE))/images
	$(PRODCAT) stage dump --data-root $(BENCH_ROOT) --run-id bench --version 1

$(BENCH_RUN)/preprocess/_SUCCESS: $(BENCH_RUN)/dump/_SUCCESS
	$(PRODCAT) stage preprocess $(BENCH_RUN)/dump --data-root $(BENCH_ROOT) --run-id bench --version 1

bench-preprocess: $(BENCH_RUN)/dump/_SUCCESS
	.venv/bin/python -m benchmarks.preprocess --dump-dir $(BENCH_RUN)/dump --images $(CATALOGUE)/images

bench-quality: $(BENCH_RUN)/preprocess/_SUCCESS
	.venv/bin/python -m benchmarks.quality --preprocess-dir $(BENCH_RUN)/preprocess

# K = 1, 5, 20 simulated human labels per level-3 category no rule emits; one training run, no retraining
bench-fewshot: $(BENCH_RUN)/preprocess/_SUCCESS
	.venv/bin/python -m benchmarks.fewshot --preprocess-dir $(BENCH_RUN)/preprocess

bench-neighbours: $(BENCH_RUN)/preprocess/_SUCCESS
	.venv/bin/python -m benchmarks.neighbours --real $(BENCH_RUN)/preprocess/clean --sizes 10000 100000 1000000

# both DAGs with a consumer, cold and warm embedding cache, then a 3x catalogue; on a private
# stand-in and data root under .prodcat/bench-dag (SCALING=0: no 3x run)
SCALING ?= 3
bench-dag: services
	.venv/bin/python -m benchmarks.dag --catalogue $(CATALOGUE) --scaling-factor $(SCALING)

# preprocess and train each alone in a fresh process, peak RSS and time at 1x and 3x the catalogue
bench-memory:
	.venv/bin/python -m benchmarks.memory --catalogue $(CATALOGUE) --factor $(SCALING)
