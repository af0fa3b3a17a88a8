# graphpar: graph-parallel DimeNet++ and GemNet-T on OC20 (Sriram et al., ICLR 2022).
#
#   snakemake --cores all                       the whole pipeline for config/config.yaml
#   snakemake --cores all --configfile config/paper/gemnet-xl.yaml
#
# Where everything lands:
#
#   resources/<dataset>/            raw data (mini: generated; oc20: downloaded), see config/README.md
#     s2ef/<split>/                 *.extxyz.xz + *.txt.xz (OC20 test splits: LMDB shards)
#     is2re/<split>/data.lmdb       OC20's pickled-PyG IS2RE/IS2RS LMDBs
#     manifest.json                 mini only: systems, convergence and frame counts
#     lmdb/<task>/<split>/          graphs (+ triplets): data.NNNN.lmdb shards + metadata.json/.npz
#   resources/oc20/downloads/       verified archives (deleted after extraction unless kept)
#   resources/oc20/manual/          place archives downloaded by hand here
#   resources/checkpoints/<name>.pt published checkpoints as downloaded (config `published`)
#   results/<experiment>/           everything computed from the data
#     checkpoints/<run>/            final.pt, checkpoint.pt (resume), metrics.jsonl, train.log
#                                   (a published checkpoint's final.pt: converted, config `published`)
#     metrics/<run>/<task>_<split>.json   metrics with provenance
#     metrics/<run>/training.jsonl  the run's learning curve (a copy of its metrics.jsonl)
#     predictions/<run>/<task>_<split>.npz per-system predictions (OC20 submission format)
#     relaxations/<run>/<split>/<sid>.extxyz  ML-relaxed structures with energies and forces
#     submissions/<run>/<task>.npz  OC20 leaderboard files (all test splits), <task>.json what's in
#     scaling/<run>.json            the scaling study (config/paper/scaling.yaml)
#   results/tables/, results/figures/   the report: the paper's tables and figures with our rows
#   results/paper/, results/benchmarks/ tracked: the published numbers, benchmark measurements
#   logs/<rule>/...                 one log per job


# A --configfile given on the command line replaces the default instead of being merged into it
# (a paper config must not inherit the embedded run's models); missing keys take the schema's
# defaults.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# ---- data ---------------------------------------------------------------------------------------


include: "workflow/rules/data.smk"


# ---- preprocess ---------------------------------------------------------------------------------


include: "workflow/rules/preprocess.smk"


# ---- train --------------------------------------------------------------------------------------


include: "workflow/rules/train.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/convert.smk"


# ---- evaluate -----------------------------------------------------------------------------------


include: "workflow/rules/evaluate.smk"
include: "workflow/rules/relax.smk"
include: "workflow/rules/submission.smk"


# ---- report -------------------------------------------------------------------------------------
# Not part of `rule all`: the report is built from whatever results exist, after the pipeline
# (`snakemake --cores 1 report`, then `snakemake --report report.html all report`, the HTML
# report of the pipeline and the report; `make reproduce` runs all three).


report: "workflow/report/workflow.rst"


include: "workflow/rules/report.smk"


onstart:
    print(f"graphpar: experiment '{config['experiment']}' on the '{DATASET}' dataset")


onsuccess:
    print("graphpar: done. Raw data under resources/, results under results/, logs under logs/.")


onerror:
    print("graphpar: a job failed. Its log is under logs/<rule>/ (named in the error above).")


rule all:
    default_target: True
    input:
        all_targets(),
