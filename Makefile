# Both targets start from nothing: they create .venv, install, and run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean proto

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls the CUDA one.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m server.demo

# One pytest process: tests/conftest.py says why it once took four (a crash, its cause found).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=12 tests

# ruff check only: the code wraps its lines by hand, aligned with the open bracket, which
# `ruff format` would rewrite in 146 files; no formatter is enforced.
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

# Regenerates the checked-in gRPC stubs from server/proto/coserve.proto.
proto: $(STAMP)
	$(BIN)/python -m server.proto.generate

clean:
	rm -rf $(VENV) .pytest_cache
