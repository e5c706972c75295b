# The two set-up commands of the README live here: `make serve` and `make test`.
# Each creates the virtual environment and installs what it needs from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test test-fast lint bento lock install-serve install-dev demo-sample clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Serving needs no PyTorch: onnxruntime, BentoML, FAISS, Pillow, NumPy.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[serve]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.serve-installed

install-serve: $(VENV)/.serve-installed
install-dev: $(VENV)/.dev-installed

# `corinfomax serve` reads PORT itself (default 3000): `PORT=8080 make serve` and `PORT=8080 corinfomax serve` agree.
serve: $(VENV)/.serve-installed
	$(BIN)/corinfomax serve

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

# The quick lane: no subprocesses, servers, DDP jobs or model exports. CI runs the full `make test`.
test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/mypy corinfomax tests bench scripts

# The Bento's pinned serving install, from the versions installed here (no index needed); commit the result.
lock: $(VENV)/.serve-installed
	$(BIN)/python scripts/lock_serve.py

# The Bento installs the project's wheel (bentofile.yaml), so build it first. No network needed.
bento: $(VENV)/.serve-installed
	rm -rf dist
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w dist .
	$(BIN)/bentoml build

# The demo collection the service indexes on its first start (demo/images, committed): a few CIFAR-10 test JPEGs
# per class from ../shared/datasets. Needs only the standard library.
demo-sample:
	$(PYTHON) scripts/make_demo_sample.py

clean:
	rm -rf $(VENV) .pytest_cache dist build
