# Evaluation: S2EF metrics of every S2EF run on every val and test split, one metrics JSON per
# (run, split) under results/<experiment>/metrics/<run>/ and the per-system predictions (OC20's
# submission format) under results/<experiment>/predictions/<run>/.


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
        run="|".join(map(re.escape, TRAIN)) or "(?!)",
        split="|".join(s2ef_eval_splits()) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=12 * 60,
        # SLURM: one process on one GPU for now (none for a run pinned to the CPU), one task.
        nodes=1,
        tasks=1,
        gres=lambda wildcards: evaluate_s2ef_gres(wildcards.run),
        tasks_per_gpu=0,  # see the train rule: no --ntasks-per-gpu
    params:
        # The run's validation batch per data-parallel group: what one GPU held in training.
        batch_size=lambda wildcards: val_batch_per_group(
            TRAIN[wildcards.run], TRAIN[wildcards.run]["dp_size"] or 1
        ),
    shell:
        "python -m graphpar.evaluate s2ef --checkpoint {input.checkpoint} --data {input.data}"
        " --split {wildcards.split} --batch-size {params.batch_size} --metrics {output.metrics}"
        " --predictions {output.predictions} > {log} 2>&1"
