# One job per (model, benchmark, kind): DVC's `probe@MODEL` runs a model's jobs together on Ray;
# here each is a cluster job of its own (--no-ray) with the same result file.


rule probe:
    input:
        ckpt=model_file("{model}", "model.pt"),
        data=lambda wildcards: prepared_dir(config["probe"]["benchmarks"][wildcards.benchmark]["dataset"]),
    output:
        probe_result("{model}", "{benchmark}", "{kind}"),
    params:
        cfg=probe_fingerprint,
    conda:
        "../envs/xtra.yaml"
    log:
        results_path("logs/probe/{model}/{benchmark}-{kind}.log"),
    threads: lambda wildcards: job_threads(probe_request(wildcards))
    resources:
        **resources_of(probe_request),
    shell:
        "xtra probe {wildcards.model} --benchmark {wildcards.benchmark} --kind {wildcards.kind} --no-ray"
        " > {log} 2>&1"
