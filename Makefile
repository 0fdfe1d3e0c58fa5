# dl-uncertainty: the user's verbs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
OVERRIDES ?=
MLFLOW_PORT ?= 5000
KFP_HOST ?= http://localhost:8080
PIPELINE_FLAGS ?=

.PHONY: help install test lint format run compile train evaluate mlflow-ui bench pipeline-upload \
        pipeline-run clean tune

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-20s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0  # the CPU wheel first: an unpinned torch pulls CUDA
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(INSTALLED) ## create .venv and install the project with its dev tools

test: $(INSTALLED) ## run every test: unit, components, pipeline, integration, k8s
	$(PY) -m pytest -q

lint: $(INSTALLED) ## ruff on the whole tree
	$(VENV)/bin/ruff check src components pipelines tests benchmarks

run: $(INSTALLED) ## run the whole pipeline locally (kfp.local), MLflow in ./mlflow.db
	$(PY) -m pipelines run-local $(OVERRIDES)

compile: $(INSTALLED) ## compile the pipeline to build/uncertainty_pipeline.yaml
	$(PY) -m pipelines compile $(PIPELINE_FLAGS) $(OVERRIDES)

train: $(INSTALLED) ## train both models with plain Hydra (no KFP), logged to MLflow
	$(PY) -m dl_uncertainty.train --multirun model=bnn,mc_dropout_dnn $(OVERRIDES)

tune: $(INSTALLED) ## Optuna sweep of bnn and mc_dropout_dnn; best configs in configs/tuned/ (+tuned=<model>)
	$(PY) -m dl_uncertainty.tune model=bnn,mc_dropout_dnn $(OVERRIDES)

evaluate: $(INSTALLED) ## re-evaluate a logged model: make evaluate RUN_ID=<id>
	$(PY) -m dl_uncertainty.evaluate run_id=$(RUN_ID) $(OVERRIDES)

mlflow-ui: $(INSTALLED) ## MLflow UI on the local store at http://127.0.0.1:$(MLFLOW_PORT)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--default-artifact-root ./mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

bench: $(INSTALLED) ## speed benchmarks, a few minutes each (see BENCHMARKS.md)
	$(PY) benchmarks/mc_inference.py --quick
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/pipeline.py

pipeline-upload: $(INSTALLED) ## compile and upload to KFP_HOST (new version if the pipeline exists)
	$(PY) -m pipelines upload --host $(KFP_HOST) $(PIPELINE_FLAGS) $(OVERRIDES)

pipeline-run: $(INSTALLED) ## start a run of the latest version, wait for it: make pipeline-run OVERRIDES="train.epochs=5"
	$(PY) -m pipelines run --host $(KFP_HOST) $(PIPELINE_FLAGS) $(OVERRIDES)

clean: ## remove local outputs (keeps mlflow.db and mlartifacts)
	rm -rf local_outputs build outputs multirun checkpoints .pytest_cache

include mk/cluster.mk
