# Convert: every published checkpoint (config `published`) into a graphpar checkpoint at the
# path of a trained run's final.pt, results/<experiment>/checkpoints/<name>/final.pt, which the
# evaluation, relaxation and submission rules then take as they take a trained run's.


rule convert:
    input:
        checkpoint=lambda wildcards: published_download(wildcards.name),
        scale_factors=lambda wildcards: PUBLISHED[wildcards.name].get("scale_factors") or [],
    output:
        f"{RESULTS}/checkpoints/{{name}}/final.pt",
    log:
        f"logs/convert/{EXPERIMENT}/{{name}}.log",
    wildcard_constraints:
        name="|".join(map(re.escape, PUBLISHED)) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        options=lambda wildcards: convert_options(wildcards.name),
        record=lambda wildcards: published_record(wildcards.name),
    shell:
        "python -m graphpar.convert {input.checkpoint} {output} {params.options}"
        " --published {params.record:q} > {log} 2>&1"
