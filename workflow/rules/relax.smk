# ML relaxations (IS2RS/IS2RE): every force model relaxes every val and test IS2RE split with
# batched L-BFGS (a stream: batches refilled as systems finish; config evaluate.relax_steps and
# evaluate.relax_fmax, 0 for OC20's fixed-step IS2RS protocol); relaxed structures under
# results/<experiment>/relaxations/<run>/<split>/ (resumed when a job is restarted), IS2RS and
# IS2RE metrics (FbT/AFbT from the oracle calculator) and OC20 submission-format predictions.
# torchrun starts G x D processes (config evaluate.gp_size, evaluate.dp_size; 1 by default),
# shaped like a training job (common.smk, "cluster": on G x D / site.gpus_per_node nodes when
# larger than one).


rule relax:
    input:
        checkpoint=lambda wildcards: checkpoint(wildcards.run),
        data=lambda wildcards: preprocessed_is2re(wildcards.split),
    output:
        is2rs=f"{RESULTS}/metrics/{{run}}/is2rs_{{split}}.json",
        is2re=f"{RESULTS}/metrics/{{run}}/is2re_{{split}}.json",
        predictions=multiext(
            f"{RESULTS}/predictions/{{run}}/", "is2rs_{split}.npz", "is2re_{split}.npz"
        ),
    log:
        f"logs/relax/{EXPERIMENT}/{{run}}/{{split}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, runs_of_task("s2ef"))) or "(?!)",
        split="|".join(relax_splits()) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: cpus_per_node(RELAX_SHAPE)
    resources:
        mem_mb=4000,
        runtime=24 * 60,
        # As the train rule's: per node GPUs and CPUs, one task per node.
        nodes=RELAX_SHAPE["nodes"],
        tasks=RELAX_SHAPE["nodes"],
        gres=gres(RELAX_SHAPE),
        tasks_per_gpu=0,  # see the train rule: no --ntasks-per-gpu
        mpi=mpi_launcher(RELAX_SHAPE),
    params:
        out_dir=lambda wildcards: f"{RESULTS}/relaxations/{wildcards.run}/{wildcards.split}",
        metrics_dir=lambda wildcards: f"{RESULTS}/metrics/{wildcards.run}",
        predictions_dir=lambda wildcards: f"{RESULTS}/predictions/{wildcards.run}",
        oracle=config["evaluate"]["oracle"],
        srun=srun_options(RELAX_SHAPE),
        torchrun=torchrun_options(RELAX_SHAPE),
        requires_slurm=requires_slurm(RELAX_SHAPE),
        gp_size=config["evaluate"]["gp_size"],
        steps=config["evaluate"]["relax_steps"],
        fmax=config["evaluate"]["relax_fmax"],
    shell:
        "{params.requires_slurm}{resources.mpi} {params.srun}torchrun {params.torchrun}"
        " -m graphpar.relax"
        " --gp-size {params.gp_size} --checkpoint {input.checkpoint} --data {input.data}"
        " --split {wildcards.split} --out-dir {params.out_dir}"
        " --metrics-dir {params.metrics_dir} --predictions-dir {params.predictions_dir}"
        " --oracle {params.oracle:q} --steps {params.steps} --fmax {params.fmax}"
        " > {log} 2>&1"
