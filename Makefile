# dinoflow: the two commands a new user runs are `make demo` and `make test` (see README.md).
# Everything runs inside a local virtual environment (.venv) created on first use; pip uses the machine's own
# index configuration. CORES defaults to all cores.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
PYTEST_ARGS ?=

.PHONY: setup demo methods test dag dvc-yaml bench clean-outputs

$(BIN)/dinoflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

setup: $(BIN)/dinoflow  ## create .venv and install dinoflow with its test extras

demo: setup  ## build the demo collection and run the whole DAG with Snakemake
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --profile workflow/profiles/default
	@echo "Report: $(CURDIR)/reports/index.html"

# The method comparison: params.yaml + workflow/profiles/methods/params.yaml in its own run folder (the demo's
# outputs are untouched). METHODS_SET: extra overrides, e.g. METHODS_SET="demo.limit=300 train.max_steps_per_epoch=3".
METHODS_DIR ?= runs/methods
METHODS_SET ?=

methods: setup  ## compare one model per SSL method on the demo collection (report: $(METHODS_DIR)/reports/index.html)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dinoflow prepare-run --overlay workflow/profiles/methods/params.yaml \
		--dir $(METHODS_DIR) $(foreach s,$(METHODS_SET),--set $(s))
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --profile workflow/profiles/default \
		--snakefile $(CURDIR)/Snakefile --directory $(METHODS_DIR)
	@echo "Report: $(CURDIR)/$(METHODS_DIR)/reports/index.html"

test: setup  ## run the whole test suite (unit, end-to-end, SLURM when available)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

dag: setup  ## draw the DAG
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --rulegraph | dot -Tsvg > reports/dag.svg

dvc-yaml: setup  ## regenerate dvc.yaml from the Snakemake DAG
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dinoflow export-dvc

bench: setup  ## run every benchmark in quick mode (see benchmarks/README.md)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/run_all.py --quick
