# Two entry points: `make demo` (the offline demo) and `make test` (the test suite).
# Both build .venv on first use and install keepgym into it (editable, with the test extra).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments demo --out runs/demo --force

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check envs agents models experiments tests

bench: $(VENV)/.installed
	$(PY) -m experiments bench all --out bench/

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
