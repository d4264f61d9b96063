# One job: probe results and pre-training logs -> tables, figures, metrics and plot data.


rule report:
    input:
        results=[probe_result(*job) for job in probe_jobs()],
        metrics=[model_file(m, "metrics.json") for m in config["models"]],
    output:
        tables=directory(results_path("tables")),
        figures=directory(results_path("figures")),
        metrics=results_path("metrics.json"),
        plots=[results_path(f"plots/{name}.csv") for name in PLOT_NAMES],
    params:
        cfg=lambda wildcards: params_hash({"probe": config["probe"], "models": sorted(config["models"])}),
    conda:
        "../envs/xtra.yaml"
    log:
        results_path("logs/report.log"),
    shell:
        "xtra report > {log} 2>&1"
