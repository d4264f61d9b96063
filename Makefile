# The two commands of the README:
#   make repro   set up .venv from nothing and run the whole pipeline on the embedded demo (dvc repro)
#   make test    set up .venv from nothing and run the test suite
# Every install resolves the exact versions in constraints.txt.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup repro test test-all lint snakemake-demo clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# wilds' pip metadata pulls ogb and more; its image datasets need only what is installed above
	$(PY) -m pip install --quiet -c constraints.txt --no-deps "wilds==2.0.0"
	touch $(STAMP)

# dvc.yaml's first stage, `check`, stops the run when params.yaml is invalid or incomplete, or dvc.yaml
# is not its stage table (`xtra dag` rewrites it). The run writes only git-ignored outputs (data/,
# models/, results/, .dvc/cache) and dvc.lock: no tracked file changes.
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the house style: ruff's formatter and linter (configured in pyproject.toml); `ruff format .` fixes the layout
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# the default suite plus the slow and demo-pipeline tests (what CI runs when its budget allows)
test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

snakemake-demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake --profile workflow/profiles/default

# prepared data and results; the trained models (models/: checkpoints, model files) only with ALL=1
clean-outputs:
	rm -rf data/prepared results
ifeq ($(ALL),1)
	rm -rf models
else
	@if [ -d models ]; then echo "kept models/ (trained checkpoints and model files): 'make clean-outputs ALL=1' removes them too"; fi
endif
