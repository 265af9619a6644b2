# Two commands for a newcomer (each installs what it needs into .venv from nothing):
#   make demo   — export the shipped demo checkpoint for every target, INT8, verified on its val set
#   make test   — the fast test suite (slow tests: make test-all)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: this takes the CPU build; letting a dependency pull torch fetches a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[all,dev]"
	# The device tests run a loopback OpenSSH server; they skip (with the reason) when sshd is absent.
	command -v /usr/sbin/sshd >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server) || echo "openssh-server not installed: device tests will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/castling-deploy export --target all --int8

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scaling.py
	$(BIN)/python benchmarks/bench_int8.py

clean:
	rm -rf $(VENV) exports/*/ .pytest_cache
