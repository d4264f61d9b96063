# One job per model of params.yaml. Outputs are the final files only: the resumable state in
# <model>/checkpoints/ is not an output, so Snakemake never deletes it and a job cut by its time
# limit (or retried) resumes where it stopped. A multi-GPU run on a cluster is one multi-task job
# whose command is started by the `mpi` launcher (srun, jsrun; see rules/common.smk).


rule pretrain:
    input:
        lambda wildcards: pretrain_inputs(wildcards.model),
    output:
        ckpt=model_file("{model}", "model.pt"),
        metrics=model_file("{model}", "metrics.json"),
    params:
        cfg=lambda wildcards: params_hash({"model": config["models"][wildcards.model], "seed": config["seed"]}),
        launch=lambda wildcards, resources: launch_prefix(resources),
    conda:
        "../envs/xtra.yaml"
    log:
        results_path("logs/pretrain/{model}.log"),
    threads: lambda wildcards: job_threads(model_request(wildcards))
    resources:
        **resources_of(model_request),
    shell:
        "{params.launch}xtra pretrain {wildcards.model} > {log} 2>&1"
