# Evaluation without relaxation, one metrics JSON per (run, split) under
# results/<experiment>/metrics/<run>/ and the per-system predictions (OC20's submission format)
# under results/<experiment>/predictions/<run>/:
# - evaluate_s2ef: S2EF metrics of every force run (task s2ef) on every S2EF val and test split;
# - evaluate_is2re: direct IS2RE metrics (`"method": "direct"`) of every energy-only run (task
#   is2re) on every IS2RE val and test split: the relaxed energy predicted from the initial
#   structure. Its files are named as the relax rule's IS2RE files of force runs (relax.smk),
#   whose run wildcard takes force runs only.
# torchrun starts G x D processes (config evaluate.gp_size, evaluate.dp_size, shared with the
# relaxations; 1 by default), each of the D data-parallel groups a shard of the split, shaped
# like a training job (common.smk, "cluster": EVALUATE_SHAPE); a batch is the run's validation
# batch of one data-parallel group in training (val_batch_per_group).


rule evaluate_s2ef:
    input:
        checkpoint=lambda wildcards: checkpoint(wildcards.run),
        data=lambda wildcards: preprocessed_s2ef(wildcards.split),
    output:
        metrics=f"{RESULTS}/metrics/{{run}}/s2ef_{{split}}.json",
        predictions=f"{RESULTS}/predictions/{{run}}/s2ef_{{split}}.npz",
    log:
        f"logs/evaluate_s2ef/{EXPERIMENT}/{{run}}/{{split}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, runs_of_task("s2ef"))) or "(?!)",
        split="|".join(s2ef_eval_splits()) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: cpus_per_node(EVALUATE_SHAPE)
    resources:
        mem_mb=4000,
        runtime=12 * 60,
        # As the train rule's: per node GPUs (none for a run pinned to the CPU) and CPUs, one
        # task per node.
        nodes=EVALUATE_SHAPE["nodes"],
        tasks=EVALUATE_SHAPE["nodes"],
        gres=lambda wildcards: evaluate_gres(wildcards.run),
        tasks_per_gpu=0,  # see the train rule: no --ntasks-per-gpu
        mpi=mpi_launcher(EVALUATE_SHAPE),
    params:
        batch_size=lambda wildcards: evaluation_batch(wildcards.run),
        device=lambda wildcards: run_device(wildcards.run),
        srun=srun_options(EVALUATE_SHAPE),
        torchrun=torchrun_options(EVALUATE_SHAPE),
        requires_slurm=requires_slurm(EVALUATE_SHAPE),
        gp_size=config["evaluate"]["gp_size"],
    shell:
        "{params.requires_slurm}{resources.mpi} {params.srun}torchrun {params.torchrun}"
        " -m graphpar.evaluate s2ef"
        " --gp-size {params.gp_size} --checkpoint {input.checkpoint} --data {input.data}"
        " --split {wildcards.split} --batch-size {params.batch_size} --device {params.device}"
        " --metrics {output.metrics} --predictions {output.predictions} > {log} 2>&1"


rule evaluate_is2re:
    input:
        checkpoint=lambda wildcards: checkpoint(wildcards.run),
        data=lambda wildcards: preprocessed_is2re(wildcards.split),
    output:
        metrics=f"{RESULTS}/metrics/{{run}}/is2re_{{split}}.json",
        predictions=f"{RESULTS}/predictions/{{run}}/is2re_{{split}}.npz",
    log:
        f"logs/evaluate_is2re/{EXPERIMENT}/{{run}}/{{split}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, runs_of_task("is2re"))) or "(?!)",
        split="|".join(relax_splits()) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: cpus_per_node(EVALUATE_SHAPE)
    resources:
        mem_mb=4000,
        runtime=12 * 60,
        # As evaluate_s2ef's.
        nodes=EVALUATE_SHAPE["nodes"],
        tasks=EVALUATE_SHAPE["nodes"],
        gres=lambda wildcards: evaluate_gres(wildcards.run),
        tasks_per_gpu=0,  # see the train rule: no --ntasks-per-gpu
        mpi=mpi_launcher(EVALUATE_SHAPE),
    params:
        batch_size=lambda wildcards: evaluation_batch(wildcards.run),
        device=lambda wildcards: run_device(wildcards.run),
        srun=srun_options(EVALUATE_SHAPE),
        torchrun=torchrun_options(EVALUATE_SHAPE),
        requires_slurm=requires_slurm(EVALUATE_SHAPE),
        gp_size=config["evaluate"]["gp_size"],
    shell:
        "{params.requires_slurm}{resources.mpi} {params.srun}torchrun {params.torchrun}"
        " -m graphpar.evaluate is2re"
        " --gp-size {params.gp_size} --checkpoint {input.checkpoint} --data {input.data}"
        " --split {wildcards.split} --batch-size {params.batch_size} --device {params.device}"
        " --metrics {output.metrics} --predictions {output.predictions} > {log} 2>&1"
