"""`xtra probe MODEL`: probe one model's frozen encoder on its benchmarks (METHOD.md, "Probing").

One job per (model, benchmark) trains every kind of the benchmark, each kind's learning rates (x
weight decays) as one bank of heads, all fed by one pass over the data (`xtra.probe.loop`), and
writes `<paths.results>/probe/MODEL/<benchmark>-<kind>.json` per kind (`xtra.probe.job`). Its
resumable state lies in `<paths.results>/probe-state/MODEL/<benchmark>/`; a finished job is skipped.
The jobs run as Ray tasks, on a local Ray by default or on the cluster at `--ray-address` /
`probe.ray.address`; with `--no-ray` they run one after the other in this process (debugging, and
Snakemake's one-job-per-rule mode: `xtra probe MODEL --benchmark B --no-ray`; `--kind K` narrows a
job to some kinds).

Every input is checked before any training starts: the model file's architecture, each benchmark's
prepared dataset and splits, the sweep grids, the benchmark and kind names. Exit code 0 when every
job succeeded, 1 when any failed after its retries (see failures.json), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["configure_parser", "run", "probe_model"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model name under `models:` in params")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--benchmark",
        action="append",
        default=None,
        metavar="B",
        help="probe only this benchmark (repeatable; default: all of probe.benchmarks)",
    )
    parser.add_argument(
        "--kind",
        action="append",
        default=None,
        metavar="K",
        help="probe only this kind (a registered probe kind; repeatable; default: the benchmark's kinds)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="A",
        help="an existing Ray cluster (default: probe.ray.address, else a local Ray)",
    )
    parser.add_argument("--no-ray", action="store_true", help="run the jobs in this process, one after the other")


def probe_model(
    params: dict,
    model: str,
    benchmarks: list[str] | None = None,
    kinds: list[str] | None = None,
    use_ray: bool = True,
    ray_address: str | None = None,
    source: str = "params.yaml",
    num_cpus: int | None = None,
) -> int:
    """Check, run and report a model's probe jobs; returns the exit code (0 ok, 1 some job failed)."""
    from xtra.probe.driver import is_finished, record_failures, run_in_process, run_with_ray
    from xtra.probe.job import plan_jobs, preflight

    jobs = plan_jobs(params, model, benchmarks, kinds, source)
    preflight(params, model, jobs)
    _remove_stale_tmp(Path(params["paths"]["results"]) / "probe" / model)
    done = [job for job in jobs if is_finished(params, job)]
    if done:
        print(f"probe {model}: {len(done)} finished job(s) skipped: {', '.join(j.name for j in done)}", flush=True)
        jobs = [job for job in jobs if job not in done]
        if not jobs:
            return 0
    address = ray_address or params["probe"]["ray"]["address"] or "local"
    where = f"on Ray ({address})" if use_ray else "in this process"
    print(f"probe {model}: {len(jobs)} job(s) {where}: {', '.join(j.name for j in jobs)}", flush=True)
    if use_ray:
        failures = run_with_ray(params, jobs, ray_address, num_cpus)
    else:
        failures = run_in_process(params, jobs, params["probe"]["ray"]["max_retries"])
    record_failures(params, model, jobs, failures)
    done = len(jobs) - len(failures)
    print(f"probe {model}: {done}/{len(jobs)} job(s) succeeded", file=sys.stderr if failures else sys.stdout)
    return 1 if failures else 0


def _remove_stale_tmp(results: Path) -> None:
    """Temporary result files of a killed run (`.<job>.json.<pid>.tmp`): never a finished result."""
    for tmp in results.glob(".*.json.*.tmp"):
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    from xtra.config import load_params

    params = load_params(args.params)
    chosen = params["probe"]["models"]
    if chosen is not None and args.model in params["models"] and args.model not in chosen:
        # DVC runs a probe stage for every model; probe.models narrows what is actually probed
        (Path(params["paths"]["results"]) / "probe" / args.model).mkdir(parents=True, exist_ok=True)
        print(f"{args.model}: not in probe.models {chosen}; nothing to probe")
        return 0
    return probe_model(
        params,
        args.model,
        args.benchmark,
        args.kind,
        use_ray=not args.no_ray,
        ray_address=args.ray_address,
        source=args.params,
    )
