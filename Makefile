# Malaria Detect — the two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_DEVICE := $(VENV)/.device-installed
STAMP_ALL    := $(VENV)/.all-installed

.PHONY: demo test lint system-deps clean bench

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 (Debian 12: apt-get install python3 python3-venv)"; exit 1; }
	@# a failed attempt (Debian without python3-venv) leaves a venv without pip behind: removed, so the next try starts clean
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "could not make $(VENV) (Debian 12: apt-get install python3-venv)"; exit 1; }
	$(PIP) install --quiet --upgrade pip || { rm -rf $(VENV); exit 1; }

$(STAMP_DEVICE): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e '.[device]'
	touch $@

$(STAMP_ALL): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e '.[device,train,dev]'
	touch $@ $(STAMP_DEVICE)

## demo: run the device service on the bundled sample slides, page at http://127.0.0.1:8080
demo: $(STAMP_DEVICE)
	$(PY) -m device serve

## system-deps: Debian packages the tests need (Chromium for page tests, shellcheck, systemd-analyze)
system-deps:
	@missing=""; \
	for b in chromium:chromium shellcheck:shellcheck systemd-analyze:systemd; do \
	  command -v $${b%%:*} >/dev/null 2>&1 || missing="$$missing $${b##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; fi

lint: $(STAMP_ALL)
	$(PY) -m ruff check .

## test: install everything, lint, run the whole suite
test: system-deps $(STAMP_ALL)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP_ALL)
	$(PY) tests/benchmarks/bench_model.py
	$(PY) tests/benchmarks/bench_field.py
	$(PY) tests/benchmarks/bench_service.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
