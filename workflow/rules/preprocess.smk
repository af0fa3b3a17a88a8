# Preprocessing: raw structures -> radius graphs and triplets in sharded LMDB, under
# resources/<dataset>/lmdb/<task>/<split>/ (layout in config/README.md).


rule preprocess_s2ef:
    input:
        f"resources/{DATASET}/s2ef/{{split}}",
    output:
        directory(f"resources/{DATASET}/lmdb/s2ef/{{split}}"),
    log:
        "logs/preprocess_s2ef/{split}.log",
    wildcard_constraints:
        split="|".join(s2ef_splits()),
    conda:
        "../../envs/data.yaml"
    threads: 8
    resources:
        mem_mb=4000,
        runtime=24 * 60,
    params:
        options=preprocess_options(ref_energy=PREPROCESS["ref_energy"]),
        convention=PREPROCESS["graph_convention"],
    shell:
        "python -m graphpar.preprocess --input {input} --out {output} --workers {threads}"
        " {params.options} --graph-convention {params.convention} > {log} 2>&1"


rule preprocess_is2re:
    input:
        f"resources/{DATASET}/is2re/{{split}}/data.lmdb",
    output:
        directory(f"resources/{DATASET}/lmdb/is2re/{{split}}"),
    log:
        "logs/preprocess_is2re/{split}.log",
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
        convention=PREPROCESS["graph_convention"],
    shell:
        "python -m graphpar.preprocess --input {input} --out {output} --workers {threads}"
        " {params.options} --graph-convention {params.convention} > {log} 2>&1"
