# One job per (probed model, benchmark): every kind of the benchmark in one `xtra probe --no-ray`
# run, as in dvc.yaml. Inputs: the model's metrics.json (its identity; the job reads model.pt, never a
# checkpoint), the benchmark's prepared manifest; no code. The resumable state in results/probe-state/
# is no output: a finished job's state keeps its results, so a re-run rewrites the same JSONs.


for stage in stages_of("probe"):

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
        shell:
            "{resources.launch}{resources.cmd} > {log} 2>&1"
