# dl-uncertainty: the user's verbs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
OVERRIDES ?=
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 5001
MODEL_URI ?=
DATA ?=
KFP_HOST ?= http://localhost:8080
PIPELINE_FLAGS ?=
RUNNER ?= subprocess
VERBOSE ?=
MODELS ?= bnn,mc_dropout_dnn,deep_ensemble
TUNE_MODELS ?= bnn,mc_dropout_dnn
SEEDS ?=
FOLDS ?=
# torch comes first and alone: a wheel already on this machine (pip's find-links) wins, else this
# index. The CPU build is what a laptop wants; PyPI's default torch is a multi-GB CUDA build.
# On a GPU machine: TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# `make stack-up` leaves the stack's addresses here; run, train, tune and evaluate use them.
STACK_ENV := .stack/env
# DATA names a data config (digits, mnist, ...) or is a file or folder: .npz an NPZ archive, a folder
# image folders, any other file a table (CSV or Parquet). A variable the user set (command line or
# environment) is passed on; this file's defaults are the configs' own.
user_set = $(filter command line environment environment override override,$(origin $(1)))
data_file = $(if $(filter %.npz,$(1)),data=npz,$(if $(filter %/,$(1))$(wildcard $(1)/.),data=image_folder,data=csv)) "data.path=$(1)"
DATA_ARGS = $(if $(DATA),$(if $(findstring /,$(DATA))$(findstring .,$(DATA)),$(call data_file,$(DATA)),data=$(DATA)))
RUN_MODELS = $(if $(call user_set,MODELS),"pipeline.models=[$(MODELS)]")
# one line and a non-zero exit for a variable set to nothing, before any work
refuse_empty = $(if $(and $(call user_set,$(1)),$(if $(strip $($(1))),,empty)),echo "error: $(1) is empty; $(2)" >&2 && exit 2;)
comma := ,
FAMILIES := bnn$(comma) mc_dropout_dnn$(comma) deep_ensemble$(comma) swag or laplace
WITH_STACK = $(if $(wildcard $(STACK_ENV)),source $(STACK_ENV) && echo "using the local stack ($(STACK_ENV)): $$MLFLOW_TRACKING_URI" &&,)

.PHONY: help install test test-e2e lint format run results compile train tune evaluate serve mlflow-ui bench pipeline-upload \
        pipeline-run stack-up stack-down stack-status clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-20s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null \
	  || $(PY) -m pip install --quiet --no-deps --index-url $(TORCH_INDEX_URL) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e '.[dev]'  # torch's own dependencies come from PyPI here
	@touch $@

install: $(INSTALLED) ## create .venv and install the project with its dev tools

test: $(INSTALLED) ## run every test: unit, components, pipeline, integration, k8s
	$(PY) -m pytest -q

test-e2e: $(INSTALLED) ## build the image, run the whole pipeline in containers against the local stack (podman or Docker)
	$(PY) -m pytest -q -m e2e tests/e2e

lint: $(INSTALLED) ## ruff on the whole tree; the core's shape: no import cycle, no module over 400 lines
	$(VENV)/bin/ruff check src components pipelines tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_layout.py

run: $(INSTALLED) ## run the whole pipeline locally (kfp.local); MODELS=bnn,swag: these families; DATA=mnist or DATA=<file or folder>; SEEDS=3: every family with 3 model seeds; FOLDS=5: 5-fold cross-validation; RUNNER=docker: every task in the image; VERBOSE=1: every task's log
	@$(call refuse_empty,MODELS,name one or more of $(FAMILIES): MODELS=bnn$(comma)swag) \
	$(WITH_STACK) $(PY) -m pipelines run-local --runner $(RUNNER) $(if $(filter-out 0 false no,$(VERBOSE)),--verbose) $(RUN_MODELS) $(DATA_ARGS) $(OVERRIDES) $(if $(SEEDS),pipeline.seeds=$(SEEDS)) $(if $(FOLDS),pipeline.folds=$(FOLDS))

results: $(INSTALLED) ## regenerate the results tables in README.md and BENCHMARKS.md (3 seeds on digits, a few minutes)
	$(PY) benchmarks/results.py

compile: $(INSTALLED) ## compile the pipeline to build/uncertainty_pipeline.yaml
	$(PY) -m pipelines compile $(PIPELINE_FLAGS) $(OVERRIDES)

train: $(INSTALLED) ## train bnn, mc_dropout_dnn and deep_ensemble with plain Hydra (no KFP), logged to MLflow (MODELS=..., DATA=...)
	@$(call refuse_empty,MODELS,name one or more of $(FAMILIES): MODELS=bnn$(comma)swag) \
	$(WITH_STACK) $(PY) -m dl_uncertainty.train --multirun model=$(MODELS) $(DATA_ARGS) $(OVERRIDES)

tune: $(INSTALLED) ## Optuna sweep per family (TUNE_MODELS=bnn,mc_dropout_dnn; any of families/registry.py); best configs in configs/tuned/ (+tuned=<model>)
	@$(call refuse_empty,TUNE_MODELS,name one or more of $(FAMILIES): TUNE_MODELS=bnn) \
	$(WITH_STACK) $(PY) -m dl_uncertainty.tune model=$(TUNE_MODELS) $(DATA_ARGS) $(OVERRIDES)

evaluate: $(INSTALLED) ## re-evaluate a logged model: make evaluate RUN_ID=<id>
	@$(WITH_STACK) $(PY) -m dl_uncertainty.evaluate run_id=$(RUN_ID) $(OVERRIDES)

serve: $(INSTALLED) ## serve a champion on http://127.0.0.1:5001: DATA=digits (default: the data registered last), or MODEL_URI=..., SERVE_PORT=...
	@$(call refuse_empty,SERVE_PORT,set SERVE_PORT=5001 or another free port) \
	$(WITH_STACK) $(PY) -m dl_uncertainty.serve $(if $(MODEL_URI),--model "$(MODEL_URI)") $(if $(DATA),--data "$(DATA)") --port $(SERVE_PORT)

mlflow-ui: $(INSTALLED) ## MLflow UI on the local store at http://127.0.0.1:5000 (MLFLOW_PORT=...)
	@$(PY) -c "from dl_uncertainty.store import runs_url; print('runs:', runs_url('http://127.0.0.1:$(MLFLOW_PORT)'))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--default-artifact-root ./mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

bench: $(INSTALLED) ## speed benchmarks, a few minutes each (see BENCHMARKS.md)
	$(PY) benchmarks/mc_inference.py --quick
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/image_throughput.py
	$(PY) benchmarks/pipeline.py

pipeline-upload: $(INSTALLED) ## compile and upload to KFP_HOST (new version if the pipeline exists)
	$(PY) -m pipelines upload --host $(KFP_HOST) $(PIPELINE_FLAGS) $(OVERRIDES)

pipeline-run: $(INSTALLED) ## start a run of the latest version, wait for it: make pipeline-run OVERRIDES="train.epochs=5"
	$(PY) -m pipelines run --host $(KFP_HOST) $(PIPELINE_FLAGS) $(OVERRIDES)

stack-up: $(INSTALLED) ## start the cluster's services here: PostgreSQL + S3 (moto) + MLflow, as k8s/ runs them
	VENV=$(VENV) k8s/scripts/local-stack.sh up

stack-down: ## stop the local stack and delete its data (.stack/)
	VENV=$(VENV) k8s/scripts/local-stack.sh down

stack-status: ## say which services of the local stack are running
	@VENV=$(VENV) k8s/scripts/local-stack.sh status

clean: ## remove local outputs (keeps mlflow.db and mlartifacts)
	rm -rf local_outputs build outputs multirun checkpoints .pytest_cache

include mk/cluster.mk
