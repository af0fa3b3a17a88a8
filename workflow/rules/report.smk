# Report: the paper's tables (results/tables/) and figures (results/figures/) from cached results,
# with our experiments beside the published numbers. Inputs are the folders of metrics, learning
# curves and predictions that exist when the DAG is built, and the benchmark files (common.smk,
# report block), never a pipeline target: `snakemake --cores 1 report` rebuilds every table and
# figure without training, preprocessing or downloading, even when checkpoints and data are gone.
# `snakemake results/tables/table1.md` builds one table; then `snakemake --report report.html all
# report` gathers them all with the pipeline's jobs.


localrules:
    report,
    report_table,
    report_figure,
    report_config,


rule report:
    input:
        report_targets(),


rule report_table:
    input:
        unpack(report_table_inputs),
    output:
        md="results/tables/{table}.md",
        csv=report(
            "results/tables/{table}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
        tex="results/tables/{table}.tex",
    log:
        "logs/report/table/{table}.log",
    wildcard_constraints:
        table="|".join(ALL_TABLES),
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        paper=PAPER,
    shell:
        "python -m graphpar.report table {wildcards.table} --results results"
        " --paper {params.paper:q} --out-dir results/tables > {log} 2>&1"


rule report_figure:
    input:
        unpack(report_figure_inputs),
    output:
        png=report(
            "results/figures/{figure}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf="results/figures/{figure}.pdf",
        csv="results/figures/{figure}.csv",
    log:
        "logs/report/figure/{figure}.log",
    wildcard_constraints:
        figure="|".join(FIGURES),
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        paper=PAPER,
        benchmarks=REPORT_BENCHMARKS,
    shell:
        "python -m graphpar.report figure {wildcards.figure} --results results"
        " --paper {params.paper:q} --benchmarks {params.benchmarks:q}"
        " --out-dir results/figures > {log} 2>&1"


rule report_config:
    input:
        workflow.configfiles,
    output:
        report(
            report_config_path(),
            caption="../report/config.rst",
            category="Configuration",
        ),
    log:
        f"logs/report/config/{EXPERIMENT}.log",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        config=json.dumps(config),
    shell:
        "python -m graphpar.report config --config-json {params.config:q} --out {output} > {log} 2>&1"
