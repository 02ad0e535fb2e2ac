# Two entry points: `make demo` (the offline demo) and `make test` (the test suite).
# Both build .venv on first use and install keepgym into it (editable, with the test extras), pinned to
# the tested versions in requirements.lock. `make lock` regenerates the lock from setup.cfg's ranges;
# `make test-lowest` runs the suite against the lowest versions setup.cfg allows (requirements-lowest.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK ?= requirements.lock
EXTRAS ?= test,ray,export,timm

.PHONY: demo test lint bench lock test-lowest test-lowest-pruning wheel-check clean

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m keepgym demo --out runs/demo --force

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check keepgym envs agents models experiments tests

bench: $(VENV)/.installed
	$(PY) -m keepgym bench all --out bench/

# The lock: resolve setup.cfg's ranges (with every extra the tests use) in a throw-away venv, freeze it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q ".[$(EXTRAS)]"
	( echo "# Tested environment of keepgym (pip constraints). Regenerate with: make lock"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude keepgym ) > $(LOCK)
	rm -rf .venv-lock

# The suite against the lowest supported versions (the optional extras are left out: their tests skip).
test-lowest:
	test -x .venv-lowest/bin/python || $(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lowest/bin/python -m pip install -q -c requirements-lowest.txt -e ".[test]"
	.venv-lowest/bin/python -m pytest -q

# Torch-Pruning's lower bound with everything else locked, cheap enough for CI: the package is pure Python,
# so the lowest version goes alone into build/tp-lowest, put ahead of .venv's copy on PYTHONPATH (no second
# torch). The top of the range is what requirements.lock pins, tested by `make test`.
TP_LOWEST = $(shell sed -n 's/^torch-pruning==//p' requirements-lowest.txt)
test-lowest-pruning: $(VENV)/.installed
	rm -rf build/tp-lowest
	$(PY) -m pip install -q --no-deps --target build/tp-lowest "torch-pruning==$(TP_LOWEST)"
	PYTHONPATH=build/tp-lowest $(PY) -c "from importlib.metadata import version as v; \
	  assert v('torch-pruning') == '$(TP_LOWEST)', v('torch-pruning'); print('torch-pruning', v('torch-pruning'))"
	PYTHONPATH=build/tp-lowest $(PY) -m pytest -q tests/envs/test_pruning.py tests/envs/test_prune_env.py \
	  tests/envs/test_compute_target.py tests/envs/test_candidate_path.py tests/models/test_export.py \
	  tests/models/test_serialization.py

clean:
	rm -rf $(VENV) .venv-lowest .venv-lock runs/demo .pytest_cache
