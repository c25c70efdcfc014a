# Two commands for a fresh machine:
#   make serve   install into .venv and start the daemon on its embedded defaults
#   make test    install into .venv (with test extras) and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test install install-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm not found: the JavaScript SDK interop tests (tests/test_js_sdk.py) will be skipped"; \
	elif [ tests/js/node_modules/.package-lock.json -nt tests/js/package-lock.json ]; then \
		:; \
	else \
		echo "npm ci --prefix tests/js"; \
		npm ci --prefix tests/js --no-audit --no-fund --loglevel=error; \
	fi
	@if command -v alertmanager >/dev/null 2>&1 || command -v prometheus-alertmanager >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "alertmanager not found (as root on Debian/Ubuntu, make install-test installs prometheus-alertmanager):" \
			"the real-Alertmanager tests (tests/test_alertmanager_real.py) will be skipped"; \
	else \
		echo "apt-get install -y --no-install-recommends prometheus-alertmanager"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null; } \
		|| echo "could not install prometheus-alertmanager: the real-Alertmanager tests" \
			"(tests/test_alertmanager_real.py) will be skipped"; \
	fi

serve: install
	$(BIN)/otel-evaluator serve $(ARGS)

test: install-test
	$(BIN)/ruff check evaluator tests bench examples
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/rules.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/eval_speed.py
	$(BIN)/python bench/baseline_noise.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
