# One job per model of params.yaml. Outputs are the final files only (model.pt, metrics.json): the
# resumable state in <model>/checkpoints/ is not an output, so Snakemake never deletes it and a
# job cut by its time limit (or retried) resumes where it stopped. A multi-GPU run on a cluster is
# one multi-task job whose command is started by the launcher (`launch`: srun, jsrun; see
# rules/common.smk). Inputs: the dataset's manifest (init: pretrain), the source checkpoint
# (official) or weights file (backbone), nothing (random, pixels); no code. A re-run of a finished
# model rewrites the same model.pt and metrics.json from its final checkpoint, without training.
# A job stopped by the scheduler's warning exits 75 after saving, and the profile's `retries` run it again;
# XTRA_ATTEMPT (Snakemake's attempt number) lets it stop when it made no progress (xtra/timelimit.py).


for stage in stages_of("pretrain"):

    rule:
        name:
            stage.name
        input:
            stage_inputs(stage),
        output:
            stage_outputs(stage),
        params:
            identity=stage_identity(stage),
        conda:
            "../envs/xtra.yaml"
        log:
            stage_log(stage),
        threads: job_threads(stage_request(stage))
        resources:
            **resources_of(stage),
            attempt=front_end_attempt,
        shell:
            "XTRA_ATTEMPT={resources.attempt} {resources.launch}{resources.cmd} > {log} 2>&1"
