# make install    .venv/ with torch==2.13.0 (CPU build) first, then graphpar and its test tools
# make test       lint + the whole test suite (what CI runs)
# make reproduce  the default pipeline on config/config.yaml, then its tables, figures and
#                 report.html (results/tables/, results/figures/)
# make size-ladder  config/experiments/size-ladder.yaml (four GemNet widths x two seeds on a
#                 larger embedded dataset; 47 minutes on 2 cores), then the report

VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The recipes call the venv's tools by name (ruff, snakefmt, snakemake, pytest). The rules need
# no PATH: they run the interpreter Snakemake runs in (workflow/rules/common.smk).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install lint format test reproduce size-ladder clean

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

# --durations: the slowest tests in CI's output, so the suite's cost stays visible.
test: lint
	pytest --durations=25

# The report reads whatever results exist, so it runs after the pipeline, never inside it.
# report.html is built for both targets, so that its rule graph and runtimes hold the pipeline's
# jobs (data, preprocessing, training, evaluation) beside the report's.
reproduce: install
	snakemake --cores all
	snakemake --cores all report
	snakemake --report report.html all report

# The report reads every experiment's results: its mae_vs_params figure plots the ladder.
size-ladder: install
	snakemake --cores all --configfile config/experiments/size-ladder.yaml
	snakemake --cores all report --configfile config/experiments/size-ladder.yaml

clean:
	rm -rf .snakemake logs
