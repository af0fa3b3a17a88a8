# Training: one torchrun job per run of config["train"], G x D processes. On one node (the
# default) the job is one task running `torchrun --standalone`; with `nodes: N` (SLURM only) it is
# N tasks, one torchrun agent per node, meeting at a c10d rendezvous on the first node (shapes
# and the SLURM requests in config/README.md). The run folder keeps checkpoint.pt, so a failed or
# killed job resumes where it stopped when Snakemake runs it again.


rule train:
    input:
        train_inputs,
    output:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/final.pt",
        # The learning curve beside the metrics, so the report never needs the checkpoints.
        curve=f"{RESULTS}/metrics/{{run}}/training.jsonl",
    log:
        f"logs/train/{EXPERIMENT}/{{run}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, TRAIN)) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: lambda wildcards: cpus_per_node(TRAIN[wildcards.run])
    resources:
        mem_mb=8000,
        runtime=7 * 24 * 60,
        # SLURM (local runs ignore these): per node GPUs and CPUs, one task per node.
        nodes=lambda wildcards: TRAIN[wildcards.run]["nodes"],
        tasks=lambda wildcards: TRAIN[wildcards.run]["nodes"],
        gres=lambda wildcards: gpus_per_node(TRAIN[wildcards.run]),
        # The slurm plugin (2.8) turns `tasks` of a GPU job into --ntasks-per-gpu, which would
        # start the script once per GPU; 0 keeps it out of the sbatch line.
        tasks_per_gpu=0,
        mpi=lambda wildcards: mpi_launcher(TRAIN[wildcards.run]),
    params:
        config=lambda wildcards: json.dumps(TRAIN[wildcards.run]),
        srun=lambda wildcards: srun_options(TRAIN[wildcards.run]),
        torchrun=lambda wildcards: torchrun_options(TRAIN[wildcards.run]),
        requires_slurm=lambda wildcards: requires_slurm(
            f"train.{wildcards.run}", TRAIN[wildcards.run]
        ),
        out=lambda wildcards: f"{RESULTS}/checkpoints/{wildcards.run}",
    shell:
        "{params.requires_slurm}{resources.mpi} {params.srun}torchrun {params.torchrun}"
        " -m graphpar.training.train --config-json {params.config:q} --out {params.out} > {log} 2>&1"
        " && cp {params.out}/metrics.jsonl {output.curve}"
