"""The paper's tables and figures from cached results, beside the published numbers.

Everything here reads files only: metrics JSON, learning curves and predictions under
`results/<experiment>/`, benchmark JSON under `results/benchmarks/` and the published numbers
under `results/paper/`. Nothing loads a checkpoint or a dataset, so the report regenerates after
checkpoints and data are gone (see workflow/rules/report.smk).

- `graphpar.report.sources`: find and read those files.
- `graphpar.report.tables`: Tables 1-3 and 5-7 as Markdown, CSV and LaTeX, the `published`
  table (published checkpoints evaluated here beside the numbers published for them), and the
  model tables `scaling_model` (Fig. 2a's efficiencies predicted beside the paper's) and
  `memory_model` (Table 4: the smallest G that fits a 32 GB V100, predicted and the paper's).
- `graphpar.report.figures`: learning curves, parity plots, DwT/FbT curves, Fig. 2 (memory and
  throughput per rank against G), force MAE against parameters, the scaling and memory models
  (`graphpar.scaling_model`); PNG + PDF + the plotted CSV.
- `graphpar.report.bundle`: export a metrics bundle (tar) and import one into `results/`.

Command line: `python -m graphpar.report --help`.
"""

TABLES = ("table1", "table2", "table3", "table5", "table6", "table7")  # the paper's
# Ours only: published checkpoints (config `published`) beside the numbers published for them.
PUBLISHED_TABLE = "published"
# Ours only, from committed model predictions (bench/scaling_model.py): Fig. 2a and Table 4.
MODEL_TABLES = ("scaling_model", "memory_model")
ALL_TABLES = (*TABLES, PUBLISHED_TABLE, *MODEL_TABLES)
FIGURES = (
    "learning_curves",
    "parity",
    "threshold_curves",
    "gp_scaling",
    "gp_learning_curves",
    "mae_vs_params",
    "scaling_model",
    "memory_model",
)
