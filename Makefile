# Developer entry points. `make test` is the one command that installs everything and tests it.
PYTHON ?= python3.11
VENV ?= .venv
TF_EXTRA ?= cpu
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
# The MNIST files: this checkout's ../shared/data/mnist unless MNIST_DIR says otherwise.
export MNIST_DIR ?= $(abspath ../shared/data/mnist)

FAST_TESTS := tests/test_batching.py tests/test_batching_core.py tests/test_digit_contract.py \
	tests/test_errors.py tests/test_echo_core.py tests/test_readme.py tests/test_bench_digest.py

.PHONY: install lint browser test test-fast screenshots serve train bench soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(TF_EXTRA),dev,bench]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A Chromium for the page tests (tests/browser.py): finds one, else tries to get one.
browser: install
	$(PY) -m tests.browser --install

test: lint browser
	$(VENV)/bin/pytest

# In-process tests only (no server, no training; under a minute): parsers, the batching core,
# the echo adapter and session store, the error table.
test-fast: install
	$(VENV)/bin/pytest -q $(FAST_TESTS)

# Screenshots of the demo page for the README (docs/screenshots/); tests never write there.
screenshots: install browser
	$(PY) -m tests.screenshots

serve: install
	$(PY) -m app

train: install
	$(PY) -m training.train_digits --data-dir "$(MNIST_DIR)"
	$(PY) -m training.train_echo

bench: install
	$(PY) -m bench.run

# Hostile /echo clients against the real server for SOAK_SECONDS (default 1800); RSS/fds flat.
SOAK_SECONDS ?= 1800
soak: install
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
