# Training: one torchrun job per run of config["train"], G x D processes. On one node (the
# default, and any job that fits one) the job is one task running `torchrun --standalone`; a job
# larger than a node (G x D / site.gpus_per_node nodes, SLURM only) is one task per node, each a
# torchrun agent, meeting at a c10d rendezvous on the first node (shapes and the SLURM requests
# in config/README.md). The run folder keeps checkpoint.pt, so a failed or
# killed job resumes where it stopped when Snakemake runs it again.


rule train:
    input:
        train_inputs,
        # A GemNet run naming no scale_factors file: the one fit_scale_factors writes (below).
        lambda wildcards: scale_factor_inputs(wildcards.run),
    output:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/final.pt",
        # The learning curve beside the metrics, so the report never needs the checkpoints.
        curve=f"{RESULTS}/metrics/{{run}}/training.jsonl",
    log:
        f"logs/train/{EXPERIMENT}/{{run}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, TRAIN)) or "(?!)",
    # Resubmissions after a failure, timeout or preemption (the trainer exits nonzero with
    # checkpoint.pt written; each retry resumes): sized by the longest run's gpu_days for jobs
    # of site.job_hours (common.smk, TRAIN_RETRIES; GemNet-XL's 1,962 GPU-days on 256 GPUs are
    # 4 jobs of 48 h, so 4: three to finish and a spare).
    retries: TRAIN_RETRIES
    conda:
        "../../envs/data.yaml"
    threads: lambda wildcards: cpus_per_node(TRAIN_SHAPES[wildcards.run])
    resources:
        mem_mb=8000,
        runtime=round(JOB_HOURS * 60),  # minutes
        # SLURM (local runs ignore these): per node GPUs and CPUs, one task per node.
        nodes=lambda wildcards: TRAIN_SHAPES[wildcards.run]["nodes"],
        tasks=lambda wildcards: TRAIN_SHAPES[wildcards.run]["nodes"],
        gres=lambda wildcards: gres(TRAIN_SHAPES[wildcards.run]),
        # The slurm plugin (2.8) turns `tasks` of a GPU job into --ntasks-per-gpu, which would
        # start the script once per GPU; 0 keeps it out of the sbatch line.
        tasks_per_gpu=0,
        mpi=lambda wildcards: mpi_launcher(TRAIN_SHAPES[wildcards.run]),
    params:
        config=lambda wildcards: json.dumps(TRAIN[wildcards.run]),
        srun=lambda wildcards: srun_options(TRAIN_SHAPES[wildcards.run]),
        torchrun=lambda wildcards: torchrun_options(TRAIN_SHAPES[wildcards.run], preemptible=True),
        requires_slurm=lambda wildcards: requires_slurm(TRAIN_SHAPES[wildcards.run]),
        out=lambda wildcards: f"{RESULTS}/checkpoints/{wildcards.run}",
    shell:
        "{params.requires_slurm}{resources.mpi} {params.srun}torchrun {params.torchrun}"
        " -m graphpar.training.train --config-json {params.config:q} --out {params.out} > {log} 2>&1"
        " && cp {params.out}/metrics.jsonl {output.curve}"


# GemNet's scale factors, fitted before training as the reference does (fairchem fit_scaling;
# graphpar.fit_scale_factors) for the runs of FIT_SCALE_FACTORS (common.smk): one process on the
# run's training data; the JSON (fairchem's scale-file format, provenance in its "comment") goes
# to the between-workflow cache with --cache.
rule fit_scale_factors:
    input:
        lambda wildcards: FIT_SCALE_FACTORS[wildcards.run]["train"],
    output:
        f"{RESULTS}/scale_factors/{{run}}.json",
    log:
        f"logs/fit_scale_factors/{EXPERIMENT}/{{run}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, FIT_SCALE_FACTORS)) or "(?!)",
    cache: "omit-software"
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=16000,
        runtime=12 * 60,
    params:
        config=lambda wildcards: json.dumps(FIT_SCALE_FACTORS[wildcards.run]),
    shell:
        "python -m graphpar.fit_scale_factors --config-json {params.config:q} --out {output}"
        " --batches 16 > {log} 2>&1"
