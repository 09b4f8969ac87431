# ltbench — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LTB := $(VENV)/bin/ltbench
RESULTS ?= results
DEMO_STRATEGIES ?= ce,balanced_softmax,class_balanced_sampling
PYTEST_ARGS ?=
# TORCH=cpu installs PyTorch's CPU-only wheels (no CUDA libraries: about 0.8 GB instead of 5 GB) on machines without
# a GPU; empty (the default) installs PyTorch from PyPI as usual.
TORCH ?=
TORCH_INDEX_cpu := https://download.pytorch.org/whl/cpu

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast report reproduce lint format clean device-prep device-check

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q torch torchvision --index-url $(TORCH_INDEX_$(TORCH)))
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## create .venv and install ltbench with its test tools (editable); TORCH=cpu: CPU-only wheels

demo: install ## short real comparison on CIFAR-10-LT (ratio 100), then the report table (a few minutes on CPU)
	$(LTB) train --multirun experiment=demo strategy=$(DEMO_STRATEGIES) results_dir=$(RESULTS)/demo
	$(LTB) report $(RESULTS)/demo

test: install ## the whole test suite (real-data tests too when LTBENCH_DATA holds CIFAR-10)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install ## the test suite without the CLI subprocess tier
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

report: install ## comparison tables and plots of every run under results/ (RESULTS=dir for another)
	$(LTB) report $(RESULTS)

TABLE ?= cifar10lt_ldam
REPRODUCE_ARGS ?=
reproduce: install ## re-run a published table (TABLE=cifar10lt_ldam; REPRODUCE_ARGS="--resume --jobs 4 dataset.root=...")
	$(LTB) reproduce $(TABLE) $(REPRODUCE_ARGS)

# the folder holding cifar-10-batches-py/ (ltbench's default data root unless LTBENCH_DATA is set)
LTBENCH_DATA ?= data
DEVICE_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 hydra-joblib-launcher==1.2.0 \
	open_clip_torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth==0.2.13  # pure-Python wheels only (any device Python)
device-prep: install ## what a GPU machine's device check needs carried: CIFAR-10-LT packed (.device_data/), wheels (.whl/)
	test -f .device_data/pack/meta.json || $(PY) scripts/pack_cifar_lt.py pack --root $(LTBENCH_DATA) --ratio 100 --out .device_data/pack
	$(PY) -m pip wheel -q --no-deps -w .whl $(DEVICE_WHEELS)

DEVICE_OUT ?= results/device_check
device-check: install ## the device check (scripts/device_check.py); DRY=1: its CPU dry run; MINUTES=10
	bash scripts/device_check.sh --out $(DEVICE_OUT) --minutes $(or $(MINUTES),10) $(if $(DRY),--dry-run)

lint: install ## ruff check, and the type checker (mypy; its settings in pyproject.toml)
	$(VENV)/bin/ruff check ltbench tests scripts
	$(VENV)/bin/mypy

format: install ## ruff format + autofix
	$(VENV)/bin/ruff check --fix ltbench tests scripts
	$(VENV)/bin/ruff format ltbench tests scripts

clean: ## remove caches (keeps .venv, data and results)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
