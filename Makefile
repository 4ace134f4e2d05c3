.PHONY: setup services main test benchmarks bench-preprocess bench-quality bench-neighbours bench-publish

setup:
	scripts/setup.sh

services: setup
	scripts/services.sh start

main:
	scripts/run_main.sh

test:
	scripts/run_tests.sh

airflow: services
	scripts/airflow_local.sh

bench-neighbours: setup
	.venv/bin/python -m benchmarks.neighbours

benchmarks: bench-neighbours
