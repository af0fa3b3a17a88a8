# make install    .venv/ with torch==2.13.0 (CPU build) first, then graphpar and its test tools
# make test       lint + the whole test suite (what CI runs)
# make reproduce  the default pipeline on config/config.yaml, then its tables, figures and
#                 report.html (results/tables/, results/figures/)

VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Rules call `python -m graphpar...`: the venv's python must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install lint format test reproduce clean

install: $(INSTALLED)

# Re-runs only when pyproject.toml changes; torch goes first and pinned, because an unpinned or
# transitive torch pulls a multi-GB CUDA build.
$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

lint: install
	ruff check .
	ruff format --check .
	snakefmt --check Snakefile workflow
	snakemake --lint

format: install
	ruff check --fix .
	ruff format .
	snakefmt Snakefile workflow

test: lint
	pytest

# The report reads whatever results exist, so it runs after the pipeline, never inside it.
reproduce: install
	snakemake --cores all
	snakemake --cores all report
	snakemake report --report report.html

clean:
	rm -rf .snakemake logs
