# Submission: OC20 leaderboard files per run under results/<experiment>/submissions/<run>/, one
# <task>.npz per task with every evaluated test split's keys in fairchem's make_submission_file
# layout, and <task>.json saying which splits it holds and whether all four are there.


rule submission:
    input:
        submission_inputs,
    output:
        npz=f"{RESULTS}/submissions/{{run}}/{{task}}.npz",
        json=f"{RESULTS}/submissions/{{run}}/{{task}}.json",
    log:
        f"logs/submission/{EXPERIMENT}/{{run}}/{{task}}.log",
    wildcard_constraints:
        run="|".join(map(re.escape, [*TRAIN, *PUBLISHED])) or "(?!)",
        task="s2ef|is2rs|is2re",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        splits=lambda wildcards: submission_tasks(wildcards.run)[wildcards.task],
        predictions_dir=lambda wildcards: f"{RESULTS}/predictions/{wildcards.run}",
        out_dir=lambda wildcards: f"{RESULTS}/submissions/{wildcards.run}",
    shell:
        "python -m graphpar.submission --predictions-dir {params.predictions_dir}"
        " --splits {params.splits} --tasks {wildcards.task} --out-dir {params.out_dir}"
        " > {log} 2>&1"
