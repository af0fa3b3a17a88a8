# Preprocessing: raw structures -> radius graphs and triplets in sharded LMDB, under
# resources/<dataset>/lmdb/<task>/<split>/ (layout in config/README.md).
#
# An S2EF split is scattered and gathered: the checkpoint preprocess_plan cuts it into shards of
# whole input files (preprocess.shard_frames), each shard is its own job (many at once on a
# cluster; a killed job redoes only its shard, a rerun skips the finished ones), and
# preprocess_s2ef links them into the dataset directory with its metadata. Shards wait in
# <split>.shards/ until then. An IS2RE/IS2RS split (one LMDB, at most 460k systems) is one job.


# The plan and the gather only list and link files: they run where Snakemake runs.
localrules:
    preprocess_plan,
    preprocess_s2ef,


checkpoint preprocess_plan:
    input:
        f"{RAW}/s2ef/{{split}}",
    output:
        f"{RAW}/lmdb/s2ef/{{split}}.shards/plan.json",
    log:
        f"logs/preprocess_plan/{DATASET_NAME}/{{split}}.log",
    wildcard_constraints:
        split="|".join(s2ef_splits()),
    conda:
        "../../envs/data.yaml"
    threads: 1
    params:
        options=preprocess_options(ref_energy=PREPROCESS["ref_energy"]),
    shell:
        "python -m graphpar.preprocess plan --input {input} --out {output} {params.options}"
        " > {log} 2>&1"


rule preprocess_shard:
    input:
        f"{RAW}/lmdb/s2ef/{{split}}.shards/plan.json",
    output:
        shard=temp(f"{RAW}/lmdb/s2ef/{{split}}.shards/data.{{index}}.lmdb"),
        rows=temp(f"{RAW}/lmdb/s2ef/{{split}}.shards/data.{{index}}.npz"),
    log:
        f"logs/preprocess_shard/{DATASET_NAME}/{{split}}/{{index}}.log",
    wildcard_constraints:
        split="|".join(s2ef_splits()),
        index=r"\d\d\d\d+",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=4 * 60,
    shell:
        "python -m graphpar.preprocess shard --plan {input} --index {wildcards.index}"
        " --out $(dirname {output.shard}) > {log} 2>&1"


rule preprocess_s2ef:
    input:
        plan=f"{RAW}/lmdb/s2ef/{{split}}.shards/plan.json",
        shards=preprocess_shards,
    output:
        directory(f"{RAW}/lmdb/s2ef/{{split}}"),
    log:
        f"logs/preprocess_s2ef/{DATASET_NAME}/{{split}}.log",
    wildcard_constraints:
        split="|".join(s2ef_splits()),
    conda:
        "../../envs/data.yaml"
    threads: 1
    shell:
        "python -m graphpar.preprocess gather --plan {input.plan} --shards $(dirname {input.plan})"
        " --out {output} > {log} 2>&1"


rule preprocess_is2re:
    input:
        f"{RAW}/is2re/{{split}}/data.lmdb",
    output:
        directory(f"{RAW}/lmdb/is2re/{{split}}"),
    log:
        f"logs/preprocess_is2re/{DATASET_NAME}/{{split}}.log",
    wildcard_constraints:
        split="|".join(is2re_splits()),
    conda:
        "../../envs/data.yaml"
    threads: 8
    resources:
        mem_mb=4000,
        runtime=12 * 60,
    params:
        # IS2RE LMDBs already hold adsorption energies: no reference to subtract.
        options=preprocess_options(ref_energy=False),
    shell:
        "python -m graphpar.preprocess --input {input} --out {output} --workers {threads}"
        " {params.options} > {log} 2>&1"
