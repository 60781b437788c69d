# make run: the whole PRISM study on the embedded default (PRESET=tiny for a fast one). make test: the suite.
VENV ?= .venv
PYTHON ?= python3
# The CPU build lying on this machine's disk; GPU users: make setup TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
PRESET ?= smollm2
BIN := $(VENV)/bin

.PHONY: setup run test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup
	$(BIN)/prism pipeline --preset $(PRESET)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf logs/run-* logs/bench
