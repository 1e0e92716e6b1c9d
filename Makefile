# headct: every target a user needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.headct-setup
# torch goes in first, on its own: CPU build here (2.13.0 from the local wheel); a CUDA image overrides TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for the torch step only (e.g. `--index-url <PyTorch CPU wheel index>` in a CPU image).
TORCH_PIP_ARGS ?=
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help setup demo demo-quick test test-slow lint ui lock clean docker-cpu docker-cuda bench-train-step \
	bench-ingest bench-discovery bench-gpu-pretrain demo-slow evidence readme-figures slurm-dev-up slurm-dev-down slurm-ingest \
	slurm-pretrain slurm-tune

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## Build .venv: torch first, then pinned deps (constraints.txt), then the project (editable)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: setup ## Run the whole chain on the synthetic default with `dvc repro`, then print the results table
	@start=$$(date +%s); dvc repro; rc=$$?; \
	  echo "dvc repro finished in $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc
	@cat reports/report/results.md

demo-quick: setup ## The same chain on tiny parameters (params-quick.yaml) in a throw-away workspace, in a few minutes
	$(PY) scripts/workspace.py --params params-quick.yaml --dest build/demo-quick --fresh

demo-slow: setup ## The slow profile (params-slow.yaml) in build/demo-slow/, then the 3D ResNet baseline (hours on CPU)
	$(PY) scripts/workspace.py --params params-slow.yaml --dest build/demo-slow
	cd build/demo-slow && $(abspath $(VENV))/bin/headct finetune --set finetune.arch=resnet18 \
	  --set finetune.init=random --set finetune.out_dir=models/resnet18 \
	  --set finetune.report_dir=reports/finetune-resnet18 --set finetune.tuned_params=null

evidence: ## The evidence benchmark for SEED=N (params-evidence.yaml) -> benchmarks/evidence/seed-N.json
	@test -n "$(SEED)" || { echo "usage: make evidence SEED=N (declared evidence seeds: 11 and 12; EVIDENCE_ARGS=--quick for a check run)"; exit 2; }
	@$(MAKE) --no-print-directory setup
	$(PY) scripts/evidence.py --seed $(SEED) $(EVIDENCE_ARGS)

test: setup ## Run the test suite (fast set; `slow` excluded)
	$(PY) -m pytest

test-slow: setup ## Run only the tests marked slow
	$(PY) -m pytest -m slow

lint: setup ## ruff over the code
	$(PY) -m ruff check headct pipelines cli.py tests benchmarks scripts

ui: setup ## Serve the MLflow store (mlflow.db) on http://127.0.0.1:5000 and print the address of its runs
	$(PY) scripts/mlflow_ui.py serve --store $(CURDIR)/mlflow.db --artifacts $(CURDIR)/mlartifacts --port 5000

# The README's figures (docs/figures/): the report's radar and few-shot plots and the MLflow runs table, from a
# workspace after `dvc repro` (the repository after `make demo`, or e.g. WORKSPACE=build/demo-quick).
WORKSPACE ?= .
readme-figures: setup ## After `make demo` (or WORKSPACE=dir): docs/figures/ radar, few-shot, MLflow runs PNGs
	$(PY) scripts/mlflow_ui.py figures --workspace $(WORKSPACE) --out docs/figures

# Slurm (slurm/, docs/cluster.md). DRY=1 prints the sbatch commands only; SET='--set slurm.ingest.shards=16 ...'.
SLURM_STATE ?= /tmp/headct-slurm
slurm-dev-up: ## A one-node Slurm on this machine for trying the templates (needs slurm-wlm munge; then export SLURM_CONF)
	slurm/dev/start-cluster.sh $(SLURM_STATE)

slurm-dev-down: ## Stop the one-node Slurm of slurm-dev-up
	slurm/dev/stop-cluster.sh $(SLURM_STATE)

slurm-ingest: setup ## Submit ingest as a job array + dependent merge, resources from params.yaml's slurm section
	$(VENV)/bin/headct slurm ingest $(if $(DRY),--dry-run) $(SET)

slurm-pretrain: setup ## Submit multi-node pre-training (srun + torchrun, preemption-safe, requeues itself)
	$(VENV)/bin/headct slurm pretrain $(if $(DRY),--dry-run) $(SET)

slurm-tune: setup ## Submit a tuning sweep: an array of workers sharing one Optuna study (JournalStorage/PostgreSQL)
	$(VENV)/bin/headct slurm tune $(if $(DRY),--dry-run) $(SET)

lock: ## Re-pin every dependency into constraints.txt from the current .venv
	@{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^headct' | sed 's/+cpu$$//'; } \
	  > constraints.txt.new && mv constraints.txt.new constraints.txt

bench-train-step: setup ## Our ViT-B/12 training step vs MONAI's ViT, same config, side by side (CPU)
	$(PY) benchmarks/train_step.py

bench-gpu-pretrain: setup ## ViT-B/12 MAE + DINO steps on one GPU: volumes/s, step split, peak memory, MFU
	$(PY) benchmarks/gpu_pretrain.py --json build/bench/gpu_pretrain.json

bench-ingest: setup ## headct ingest vs the seed's MONAI chain and dcm2niix + MONAI, series/s, 1 thread each (CPU)
	$(PY) benchmarks/ingest.py $(BENCH_ARGS)

bench-discovery: setup ## Header discovery + labels CSV on a 100,000-slice flat RSNA-style folder: files/s, peak memory
	$(PY) benchmarks/discovery.py $(BENCH_ARGS)

docker-cpu: ## Build the CPU image (needs a Docker engine)
	docker build -f docker/Dockerfile.cpu -t headct:cpu .

docker-cuda: ## Build the CUDA image (needs a Docker engine)
	docker build -f docker/Dockerfile.cuda -t headct:cuda .

clean: ## Remove generated data, models, reports, MLflow store and caches (keeps .venv)
	rm -rf data/raw data/store data/splits models reports checkpoints private mlflow.db mlflow.db.lock mlartifacts build .dvc/cache .dvc/tmp
