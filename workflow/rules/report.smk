# One job: probe results and pre-training metrics -> tables, figures, metrics and plot data. Keyed
# on the `report` section, probe.protocol, the reference CSVs and its recipe version. A few seconds
# of pandas: it runs where Snakemake runs, not as a cluster job.


for stage in stages_of("report"):

    rule:
        name:
            stage.name
        localrule: True
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
        resources:
            cmd=stage.cmd,  # bound now: see resources_of in common.smk
        shell:
            "{resources.cmd} > {log} 2>&1"
