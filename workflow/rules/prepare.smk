# One job per dataset of params.yaml: raw files -> checksummed WebDataset shards. CPU only.
# The declared output is the manifest (it records every shard's sha256): the shards beside it are
# no output, so Snakemake never deletes them before the job, and the manifest is updated in place
# (xtra prepare decides what to redo: an up-to-date dataset is left untouched).


for stage in stages_of("prepare"):

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
            "{resources.cmd} > {log} 2>&1"
