# Data stage: the raw files a preprocessing rule consumes, under resources/<dataset>/
# (layout in config/README.md). Either generated (mini) or downloaded and extracted (oc20).


rule generate_mini:
    output:
        manifest=f"{MINI}/manifest.json",
        s2ef=[directory(f"{MINI}/s2ef/{split}") for split in mini_splits()],
        is2re=[f"{MINI}/is2re/{split}/data.lmdb" for split in mini_splits()],
    log:
        f"logs/generate_mini/{Path(MINI).name}.log",
    conda:
        "../../envs/data.yaml"
    threads: 8
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        settings=json.dumps(config["dataset"]["mini"], sort_keys=True),
    shell:
        "python -m graphpar.data.mini --out $(dirname {output.manifest}) --config-json {params.settings:q}"
        " --workers {threads} > {log} 2>&1"


rule download_oc20:
    output:
        unless_kept("resources/oc20/downloads/{filename}"),
    log:
        "logs/download_oc20/{filename}.log",
    wildcard_constraints:
        filename="|".join(re.escape(a.filename) for a in oc20.CATALOGUE.values()),
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        downloads=1,
        runtime=24 * 60,
    params:
        name=oc20_download_name,
        base_url=OC20["base_url"],
        retries=OC20["retries"],
        manual_dir="resources/oc20/manual",
    shell:
        "python -m graphpar.data.oc20 download {params.name} --out {output}"
        " --base-url {params.base_url} --retries {params.retries}"
        " --manual-dir {params.manual_dir} > {log} 2>&1"


rule extract_oc20_s2ef:
    input:
        oc20_s2ef_archive,
    output:
        directory("resources/oc20/s2ef/{split}"),
    log:
        "logs/extract_oc20_s2ef/{split}.log",
    wildcard_constraints:
        split="|".join(OC20_S2EF_SPLITS),
    conda:
        "../../envs/data.yaml"
    threads: 4
    resources:
        runtime=12 * 60,
    params:
        name=oc20_s2ef_name,
        decompress="--decompress" if OC20["decompress"] else "",
    shell:
        "python -m graphpar.data.oc20 extract {params.name} --archive {input} --root resources/oc20"
        " {params.decompress} --threads {threads} > {log} 2>&1"


rule extract_oc20_s2ef_test:
    input:
        oc20_archive_path(oc20.CATALOGUE["s2ef_test"]),
    output:
        [directory(f"resources/oc20/s2ef/{split}") for split in oc20.CATALOGUE["s2ef_test"].splits],
    log:
        "logs/extract_oc20_s2ef_test.log",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        runtime=12 * 60,
    shell:
        "python -m graphpar.data.oc20 extract s2ef_test --archive {input} --root resources/oc20"
        " > {log} 2>&1"


rule extract_oc20_is2re:
    input:
        oc20_archive_path(oc20.CATALOGUE["is2re"]),
    output:
        expand("resources/oc20/is2re/{split}/data.lmdb", split=oc20.CATALOGUE["is2re"].splits),
    log:
        "logs/extract_oc20_is2re.log",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        runtime=6 * 60,
    shell:
        "python -m graphpar.data.oc20 extract is2re --archive {input} --root resources/oc20"
        " > {log} 2>&1"


rule download_checkpoint:
    output:
        "resources/checkpoints/{name}.pt",
    log:
        "logs/download_checkpoint/{name}.log",
    wildcard_constraints:
        name="|".join(map(re.escape, PUBLISHED)) or "(?!)",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        downloads=1,
        runtime=60,
    params:
        url=lambda wildcards: PUBLISHED[wildcards.name]["url"],
        size=lambda wildcards: published_size_option(wildcards.name),
        retries=OC20["retries"],
    shell:
        "python -m graphpar.data.oc20 download-checkpoint --url {params.url:q} --out {output}"
        " {params.size} --retries {params.retries} > {log} 2>&1"
