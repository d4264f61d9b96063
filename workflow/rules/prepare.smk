# One job per dataset of params.yaml: raw files -> checksummed WebDataset shards. CPU only.
# `cfg` is a digest of the dataset's params, so that Snakemake re-runs the job when they change.


rule prepare:
    output:
        directory(prepared_dir("{dataset}")),
    params:
        cfg=lambda wildcards: params_hash(config["datasets"][wildcards.dataset]),
    conda:
        "../envs/xtra.yaml"
    log:
        results_path("logs/prepare/{dataset}.log"),
    threads: lambda wildcards: job_threads(dataset_request(wildcards))
    resources:
        **resources_of(dataset_request),
    shell:
        "xtra prepare {wildcards.dataset} > {log} 2>&1"
