# Training: one torchrun job per run of config["train"], G x D processes on one node
# (multi-node launches: config/README.md). The run folder keeps checkpoint.pt, so a failed or
# killed job resumes where it stopped when Snakemake runs it again.


rule train:
    input:
        train_inputs,
    output:
        f"{RESULTS}/checkpoints/{{run}}/final.pt",
    log:
        f"logs/train/{EXPERIMENT}/{{run}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, TRAIN)) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: lambda wildcards: train_processes(wildcards.run)
    resources:
        mem_mb=8000,
        runtime=7 * 24 * 60,
    params:
        config=lambda wildcards: json.dumps(TRAIN[wildcards.run]),
        processes=lambda wildcards: train_processes(wildcards.run),
        out=lambda wildcards: f"{RESULTS}/checkpoints/{wildcards.run}",
    shell:
        "torchrun --standalone --nproc_per_node={params.processes}"
        " -m graphpar.train --config-json {params.config:q} --out {params.out} > {log} 2>&1"
