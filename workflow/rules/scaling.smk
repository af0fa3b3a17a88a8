# The paper's scaling study (Table 4, Fig. 2) as a cluster experiment: for each run of
# config["scaling"]["runs"] (config/paper/scaling.yaml) one torchrun job of G x D processes,
# shaped like a training job (common.smk, "cluster"), measures samples/s, peak memory per GPU and
# TFLOP/s per GPU (python -m graphpar.scaling) into results/<experiment>/scaling/<run>.json, which
# the report's Fig. 2 reads. `snakemake scaling_study` runs them all.


rule scaling_study:
    input:
        scaling_targets(),


rule scaling:
    input:
        lambda wildcards: SCALING_RUNS[wildcards.run]["train"],
    output:
        f"{RESULTS}/scaling/{{run}}.json",
    log:
        f"logs/scaling/{EXPERIMENT}/{{run}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, SCALING_RUNS)) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: lambda wildcards: cpus_per_node(SCALING_SHAPES[wildcards.run])
    resources:
        mem_mb=8000,
        runtime=60,
        # As the train rule's: per node GPUs and CPUs, one task per node.
        nodes=lambda wildcards: SCALING_SHAPES[wildcards.run]["nodes"],
        tasks=lambda wildcards: SCALING_SHAPES[wildcards.run]["nodes"],
        gres=lambda wildcards: gres(SCALING_SHAPES[wildcards.run]),
        tasks_per_gpu=0,  # see the train rule: no --ntasks-per-gpu
        mpi=lambda wildcards: mpi_launcher(SCALING_SHAPES[wildcards.run]),
    params:
        config=lambda wildcards: json.dumps(SCALING_RUNS[wildcards.run]),
        srun=lambda wildcards: srun_options(SCALING_SHAPES[wildcards.run]),
        torchrun=lambda wildcards: torchrun_options(SCALING_SHAPES[wildcards.run]),
        requires_slurm=lambda wildcards: requires_slurm(SCALING_SHAPES[wildcards.run]),
        warmup=SCALING["warmup"],
        steps=SCALING["steps"],
    shell:
        "{params.requires_slurm}{resources.mpi} {params.srun}torchrun {params.torchrun}"
        " -m graphpar.scaling --config-json {params.config:q} --out {output}"
        " --warmup {params.warmup} --steps {params.steps} > {log} 2>&1"
