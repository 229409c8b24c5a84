# SiteBridge: the two commands of the README quick start.
#   make demo  - set up .venv, generate the synthetic federation, run the whole TGMA
#                pipeline as a local Flower simulation (`flwr run .`), print the result
#   make test  - set up .venv if needed, run the test suite (what CI runs)
#   make test-quick - the suite without the tests that run a whole pipeline (marker
#                `pipeline`): the loop while changing one module; `make test` before
#                pushing
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sitebridge-installed
SITES ?= 6
RUN_CONFIG ?=

.PHONY: demo test test-quick venv benchmark lint clean

venv: $(STAMP)

# torch 2.13.0 first, from the machine's local CPU wheel; the constraints file keeps
# every later resolution on it (no CUDA build is ever fetched).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: venv
	@echo "== generating the built-in synthetic federation (cached in data/)"
	$(BIN)/sitebridge builtin --cache-dir data
	@echo "== running the TGMA pipeline as a local Flower simulation ($(SITES) sites)"
	$(BIN)/python -m simulations.simulate --num-supernodes $(SITES) --run-config \
	'output.runs-dir="$(CURDIR)/runs" federation.cache-dir="$(CURDIR)/data" $(RUN_CONFIG)'
	@echo "== result"
	$(BIN)/sitebridge report runs

# One pytest worker per logical CPU (pytest-xdist); --dist loadfile keeps each test file
# on one worker, so a module's fixtures (the loopback deployment, the Flower
# simulation) are built once.
PYTEST_PARALLEL := -n logical --dist loadfile

test: venv
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) --durations=20

test-quick: venv
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow and not gpu and not pipeline"

benchmark: venv
	$(BIN)/python -m simulations.benchmark tgma --out benchmarks/tgma.json

lint: venv
	$(BIN)/ruff check core clients server simulations deploy tests
	for script in deploy/*.sh; do bash -n "$$script"; done
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .flwr-home runs data .pytest_cache .mypy_cache .ruff_cache
