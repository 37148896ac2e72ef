# Developer entry points. `make test` is the one command that installs everything and tests it.
PYTHON ?= python3.11
VENV ?= .venv
TF_EXTRA ?= cpu
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
# The MNIST files (tests, make train): $MNIST_DIR, else ../shared/data/mnist beside the checkout,
# else a checksum-verified download into ~/.cache/rnn-serving/mnist (training/mnist_data.py).

.PHONY: install lint browser test test-fast test-upgrade screenshots serve train bench soak chaos clean

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

# The fast tier: every test not marked slow (no server, browser or training run; tests/conftest.py
# refuses a process start in it). Under a minute.
test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

# The edge, WebSocket and hostile-client tests against the newest uvicorn, Starlette, FastAPI,
# websockets and httptools (installed into .upgrade/, ahead of the pinned ones on the path), since
# app/core/uvicorn_protocols.py uses uvicorn's internals: an upgrade is this one command.
UPGRADE_PACKAGES := uvicorn[standard] starlette fastapi websockets httptools
UPGRADE_TESTS := tests/test_hostile_http.py tests/test_hostile_echo.py tests/test_api_echo.py \
	tests/test_echo_route.py tests/test_hostile_parsing.py tests/test_hostile_round2.py \
	tests/test_edge_lifetimes.py
test-upgrade: install
	rm -rf .upgrade
	$(PY) -m pip install --quiet --upgrade --target .upgrade $(UPGRADE_PACKAGES)
	PYTHONPATH=$(abspath .upgrade) $(PY) -c 'import uvicorn, starlette, fastapi, websockets, \
	httptools; print("newest:", *(f"{m.__name__} {m.__version__}" for m in (uvicorn, \
	starlette, fastapi, websockets, httptools)))'
	PYTHONPATH=$(abspath .upgrade) $(VENV)/bin/pytest -q $(UPGRADE_TESTS)

# Screenshots of the demo page for the README (docs/screenshots/); tests never write there.
screenshots: install browser
	$(PY) -m tests.screenshots

serve: install
	$(PY) -m app

train: install
	$(PY) -m training.train_digits $(if $(MNIST_DIR),--data-dir "$(MNIST_DIR)")
	$(PY) -m training.train_echo

bench: install
	$(PY) -m bench.run

# Hostile /echo clients against the real server for SOAK_SECONDS (default 1800); RSS/fds flat.
SOAK_SECONDS ?= 1800
soak: install
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS)

# The chaos test (bench/chaos.py; needs Docker): the scale stack (compose.scale.yaml) built and
# started as compose project rnn-serving-chaos, 40 echo streams through nginx while an API
# replica is SIGKILLed, the Redis primary SIGKILLed, then stalled, and nginx restarted; every
# reply exactly once, recovery times per fault; always taken down. More: CHAOS_ARGS, e.g.
# --out bench/results to record a run (chaos.json, chaos.md), --port, --streams, --faults.
CHAOS_ARGS ?=
chaos: install
	$(PY) -m bench.chaos --build $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
