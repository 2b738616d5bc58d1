# Every target is a thin wrapper over a Python / Hydra entry point.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# make pretrain: the method (default: pretrain.yaml's, or the preset's when ARGS names experiment=demo*).
METHOD ?=
BACKBONE ?=
ARGS ?=
# make sweep: one pretraining per combination, each followed by its fine-tune.
PROTOTYPES ?= 1000,2000,3000
EPOCHS ?= 100,200
# make report: the folder whose runs are collected.
DIR ?= multirun
# Torch threads: use every core unless told otherwise.
export OMP_NUM_THREADS ?= $(shell nproc)

.PHONY: install demo test test-full pretrain finetune semi pipeline sweep report bench bench-semi bench-accuracy \
	gpu-check gpu-wheels lint clean

install: $(STAMP)

# uv (not pip) installs torch: this machine's pip prefers a local CPU-only torch
# wheel whose ABI does not match torchvision's compiled ops. The registry's
# torch 2.13.0 runs fine on a CPU.
$(STAMP): setup.cfg
	bash scripts/ensure_venv.sh $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[dev,eval,export]'
	$(PY) -c "import torch, torchvision; b = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10]]); \
	k = torchvision.ops.nms(b, torch.tensor([0.9, 0.8]), 0.5); assert k.tolist() == [0], k; \
	print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'nms ok')"
	touch $(STAMP)

demo: install
	$(PY) scripts/demo.py $(ARGS)

# Test workers (pytest-xdist, one file per worker): up to 4; the CPU's threads are split among them
# (tests/conftest.py). Most of a test's time is one Python thread (imports, set-up), so 2 workers on
# 2 cores take 5 minutes where one takes 7.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: install
	$(VENV)/bin/pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-full: install
	$(VENV)/bin/pytest -q $(ARGS)

pretrain: install
	$(PY) -m pretrain $(if $(METHOD),method=$(METHOD)) $(ARGS)

finetune: install
	$(PY) -m finetune $(if $(BACKBONE),backbone.checkpoint=$(BACKBONE)) $(ARGS)

# Teacher-student training: SEMI=unbiased_teacher|mean_teacher|consistency|self_training;
# INIT=a fine-tuning checkpoint to start from (its burn-in done), or BACKBONE to start from a backbone.
SEMI ?= unbiased_teacher
INIT ?=
semi: install
	$(PY) -m finetune semi=$(SEMI) $(if $(BACKBONE),backbone.checkpoint=$(BACKBONE)) $(if $(INIT),init_from=$(INIT)) $(ARGS)

pipeline: install
	$(PY) scripts/pipeline.py $(ARGS)

sweep: install
	$(PY) -m finetune.sweep -m method=$(or $(METHOD),swav) method.num_prototypes=$(PROTOTYPES) \
		trainer.max_epochs=$(EPOCHS) $(ARGS)

report: install
	$(PY) scripts/report.py $(DIR) $(ARGS)

# Speed against plain loops and the machine's ceiling; writes this machine's section of BENCHMARKS.md.
bench: install
	$(PY) scripts/bench_report.py $(ARGS)

# Teacher-student against labeled-only, converge then continue (slow; resumable through
# benchmarks/semi/<dataset>.json): DATASET=chess, or your own COCO set with
# ARGS="--train t.json --val v.json --name mine". Writes its table into BENCHMARKS.md's semi section.
DATASET ?= chess
bench-semi: install
	$(PY) scripts/bench_semi.py $(if $(findstring --train,$(ARGS)),,--dataset $(DATASET)) --benchmarks BENCHMARKS.md $(ARGS)

# The accuracy benchmark (slow; resumable across sittings through benchmarks/accuracy/<dataset>.json):
# five arms (random, SSL, random + semi, SSL + semi, 100% labels) x 3 split seeds, 10% labels,
# DATASET=chess|bccd|synthetic. Writes the dataset's table into BENCHMARKS.md's accuracy section.
bench-accuracy: install
	$(PY) scripts/bench_accuracy.py --dataset $(DATASET) --benchmarks BENCHMARKS.md $(ARGS)

# The prepared GPU check (scripts/gpu_check.py; README "The GPU check"): on a lent GPU machine run
# `bash scripts/gpu_check.sh` itself (no network there for make install); here the CPU dry run is
# make gpu-check ARGS=--cpu-smoke. gpu-wheels: the packages the GPU machine lacks, into wheels/gpu/.
gpu-check: install
	bash scripts/gpu_check.sh $(ARGS)

gpu-wheels: install
	$(PY) scripts/gpu_wheels.py download

lint: install
	$(VENV)/bin/ruff check pretrain finetune scripts tests
	$(VENV)/bin/mypy

clean:
	rm -rf outputs multirun .pytest_cache
