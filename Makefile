# The two commands a fresh clone needs: `make demo` and `make test`. Both build .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,train,bench
comma := ,

# First Python >= 3.12 found: an explicit PYTHON, then PATH, then pyenv's installs.
PYTHON ?= $(shell for p in python3.13 python3.12 python3 \
	$$HOME/.pyenv/versions/3.13*/bin/python3 $$HOME/.pyenv/versions/3.12*/bin/python3; do \
	  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
	    2>/dev/null && { command -v $$p; break; }; done)

.PHONY: venv demo nsa-demo test test-fast lint clean

$(VENV)/.installed-$(subst $(comma),_,$(EXTRAS)): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: need Python >= 3.12 (set PYTHON=...)"; exit 1; }
	@echo "creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

venv: $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))

# The main job: a tiny NSA LM trained on the embedded default corpus (this Python's stdlib).
demo: train

# A first look at the layer itself: fwd+bwd at T=8192, the selected blocks, keys visited.
nsa-demo: venv
	$(PY) -m nsa_jax.demo

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(PY) -m pip install -q ruff && $(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache

# Train the tiny NSA model on the Python standard library (CPU, a few minutes). Extra
# overrides: make train ARGS="--set train.steps=100".
.PHONY: train
train: venv
	$(PY) -m train --config tiny $(ARGS)
