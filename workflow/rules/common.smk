# Shared by the rules: the params checks, the stage table (xtra/pipeline/dag.py, the one dvc.yaml is written
# from: the same jobs, inputs, outputs and params identities, xtra/identity.py), and the translation of a
# params `resources` request into the resources the Slurm and LSF executor plugins read.
import os
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from xtra.config import validate_params
from xtra.yamlio import read_yaml
from xtra.errors import ParamsError
from xtra.identity import param_value, params_identity
from xtra.pipeline.dag import stage_table

# The xtra commands read this file themselves (their default --params), so it is the only source
# of the params: `xtra profile NAME` is the switch, for Snakemake as for DVC.
PARAMS_FILE = "params.yaml"


def check_config_is_params_file():
    """Refuse --configfile / --config: the plan would use them, the xtra commands would not.
    (--configfile would also deep-merge two profiles: the union of their datasets and models.)

    Then replace Snakemake's reading of params.yaml (PyYAML, YAML 1.1: `lr: 1e-3` is a string there)
    by the project's (xtra.yamlio.read_yaml, YAML 1.2, as every xtra command and DVC read it)."""
    with open(PARAMS_FILE) as handle:
        on_disk = yaml.safe_load(handle)  # Snakemake's own reading, to compare like with like
    if config != on_disk:
        changed = sorted(k for k in set(config) | set(on_disk) if config.get(k) != on_disk.get(k))
        raise WorkflowError(
            f"the Snakemake config differs from {PARAMS_FILE} at {changed}: --config and --configfile "
            f"are not used by the xtra commands. Switch profile with `xtra profile NAME` "
            f"(optionally --set KEY=VALUE), or edit {PARAMS_FILE}."
        )
    config.clear()
    config.update(read_params_file())


def read_params_file():
    try:
        return read_yaml(Path(PARAMS_FILE).read_text(), PARAMS_FILE)
    except ParamsError as exc:
        raise WorkflowError(str(exc)) from exc


def cross_check_params():
    """The checks the schema cannot express (xtra.config), without the raw-data paths: the
    dry-run plans cluster paths from anywhere; each `xtra` command checks them when it runs."""
    try:
        validate_params(config, PARAMS_FILE, check_paths=False)
    except ParamsError as exc:
        raise WorkflowError(str(exc)) from exc


# ---------------------------------------------------------------- the stages (the same table as dvc.yaml)


def check_params_complete():
    """Every params key a stage depends on must be in params.yaml itself, as DVC requires: a value
    the schema filled in would be seen by the commands but by no identity."""
    on_disk = read_params_file()
    missing = []
    for stage in STAGES:
        for key in stage.params:
            try:
                param_value(on_disk, key)
            except ParamsError:
                missing.append(key)
    if missing:
        raise WorkflowError(f"{PARAMS_FILE} leaves out {sorted(set(missing))[:8]}...: the stages depend on them. "
                            f"Run `xtra profile --fill` to write every schema key into it.")


def stages_of(kind):
    return [s for s in STAGES if s.kind == kind]


def stage_identity(stage):
    """The job's params identity: its kind's recipe version and the values of its keys (xtra/identity.py).
    Snakemake records it and re-runs the job when it changes, as DVC does for the same keys."""
    return params_identity(config, stage.kind, stage.params)


def stage_inputs(stage):
    """What the job reads: the files other stages (or the user) write, no code. A folder (the report's
    reference CSVs) is listed file by file: Snakemake compares file times (and the checksums of small
    files), and a folder's time changes only when a file is added or removed."""
    files = []
    for path in stage.data:
        if os.path.isdir(path):
            files += sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        else:
            files.append(path)
    return files


def stage_outputs(stage):
    """The declared outputs. A prepared manifest is updated in place (`update`): Snakemake keeps it
    before the job, as DVC does (`persist`), so `xtra prepare` finds its dataset up to date instead of
    preparing it again."""
    if stage.kind == "prepare":
        return [update(o) for o in stage.outs]
    return [directory(o) if o in stage.dirs else o for o in stage.outs] + list(stage.metrics)


def stage_log(stage):
    return f"{config['paths']['results']}/logs/{stage.kind}/{stage.name}.log"


# ---------------------------------------------------------------- scheduler resources
#
# A params request {runtime (minutes), mem_mb (per node), cpus (per task), gpus (per node), nodes,
# tasks_per_node} becomes the resources the executor plugin of the cluster profile reads. The
# cluster profiles name their scheduler (`config: [scheduler=slurm]`), because the two plugins read
# the same keys differently (LSF takes `cpus_per_task` as the job's total `bsub -n`) and `threads`
# cannot carry the total (Snakemake caps it at the submitting machine's --cores).
# A job runs `tasks_per_node` processes on each node: by default one per GPU (a GPU job) or one (a
# CPU job); a CPU pre-training of 2 tasks (gloo) sets tasks_per_node: 2 (what the cluster tests run).
# A job of more than one task sets `mpi` to the launcher that starts its tasks (srun on Slurm,
# jsrun on LSF, which is what Lightning's cluster environments read ranks from): the plugins then
# submit the whole task layout and run the shell command once, prefixed with it. Locally a
# multi-device job runs without launcher: Lightning starts the processes of one machine itself.
#
# The Slurm launcher names the layout again (`srun --nodes --ntasks-per-node --cpus-per-task`):
# the Slurm plugin's job step runs the rule's command with the allocation's SLURM_* task variables
# removed, so a bare `srun` would start one task per node. Lightning's SLURMEnvironment also
# refuses a job without --ntasks-per-node, so a job of one task per node on several nodes sets it
# through `slurm_extra`.

# The time limit (xtra.timelimit; docs/pipeline.md, "Time limits"). A multi-task pre-training asks the scheduler
# for a warning signal `signal_lead` seconds (a profile's config key; default 300) before its limit: Slurm
# `--signal=USR1@<s>` (Slurm may send it up to a minute earlier), LSF `-wa USR1 -wt <minutes>`. The job saves at
# the next optimiser step and exits 75, and Snakemake runs it again (the profile's `retries`). The lead must
# cover one step and one checkpoint save (the log prints the save time of each stop).
# Pitfall: the warning reaches every process of the job step (Slurm) or of the job (LSF), and SIGUSR1 ends any
# process that does not catch it. A multi-task job's step is the launcher's (`srun ... xtra`): xtra's processes
# alone. A one-task job's step is the plugin's `srun snakemake ...`, whose Snakemake and shell would die of
# the warning (and xtra with them): one-task pre-trainings get no warning; they are saved by their periodic
# checkpoints and by SIGTERM at the limit, which xtra catches too. On LSF the job's own Snakemake is one of the
# job's processes whatever its tasks: untested (no LSF cluster here).
# Each job also gets its attempt number (XTRA_ATTEMPT, the rules' shell), so that a resubmitted pre-training
# that made no progress since its previous attempt stops (exit 2) instead of using up the retries.
SIGNAL_LEAD_S = int(config.pop("signal_lead", 300))

SCHEDULERS = ("local", "slurm", "lsf")
DEFAULT_LAUNCHERS = {
    "slurm": "srun --nodes={nodes} --ntasks-per-node={tasks_per_node} --cpus-per-task={cpus}",
    "lsf": "jsrun --nrs {tasks} --tasks_per_rs 1 --cpu_per_rs {cpus} --gpu_per_rs {gpus_per_task}"
    " --rs_per_host {tasks_per_node}",
}
# The two keys a profile may add to the config; they are not params, so they leave it here.
SCHEDULER = str(config.pop("scheduler", "local"))
LAUNCHER = config.pop("launcher", DEFAULT_LAUNCHERS.get(SCHEDULER))
if SCHEDULER not in SCHEDULERS:
    raise WorkflowError(f"config scheduler={SCHEDULER!r}: expected one of {list(SCHEDULERS)}")


def job_layout(req):
    """(tasks per node, tasks, cores per node) of a params request.

    A request marked `one_process` (a probe job) is one task however many GPUs it has: the command
    starts one process per device itself (xtra.probe.dist), so no launcher may start it N times."""
    gpus = req["gpus"]
    if req.get("one_process"):
        return 1, 1, req["cpus"]
    per_node = req.get("tasks_per_node") or max(gpus, 1)
    if gpus and per_node != gpus:
        raise WorkflowError(f"resources {req}: a GPU job runs one task per GPU (tasks_per_node {per_node}, "
                            f"gpus {gpus}); leave tasks_per_node out or set it to gpus")
    if not gpus and req["nodes"] > 1 and not req.get("tasks_per_node"):
        raise WorkflowError(f"resources {req}: a CPU job of several nodes needs tasks_per_node (its processes "
                            f"on each node); a multi-node GPU job runs one per GPU")
    return per_node, per_node * req["nodes"], per_node * req["cpus"]


def launcher(req):
    """The launcher command of a multi-task job on this scheduler; None for a single process."""
    per_node, tasks, _ = job_layout(req)
    if tasks == 1 or SCHEDULER == "local" or not LAUNCHER:
        return None
    return LAUNCHER.format(tasks=tasks, tasks_per_node=per_node, cpus=req["cpus"], nodes=req["nodes"],
                           gpus_per_task=1 if req["gpus"] else 0)


def joined(*options):
    """Extra scheduler options of a job, or None (Snakemake then leaves the key out)."""
    return " ".join(o for o in options if o) or None


def slurm_resources(req, warn):
    per_node, tasks, _ = job_layout(req)
    gpus, multi = req["gpus"], tasks > 1
    warning = f"--signal=USR1@{SIGNAL_LEAD_S}" if warn and multi else None
    return {
        "nodes": req["nodes"],
        "mem_mb": req["mem_mb"],  # sbatch --mem: per node
        "cpus_per_task": req["cpus"],
        "gpu": gpus if gpus and not multi else None,  # --gpus=N for one task, also given to the job step
        "gres": f"gpu:{gpus}" if gpus and multi else None,  # per node
        "tasks_per_node": per_node if multi and per_node > 1 else None,  # --ntasks-per-node
        # the plugin takes tasks_per_node > 1 only: one task per node is --ntasks=nodes, plus the
        # --ntasks-per-node=1 that Lightning's SLURMEnvironment insists on
        "tasks": tasks if multi and per_node == 1 else None,
        "slurm_extra": joined("--ntasks-per-node=1" if multi and per_node == 1 else None, warning),
        "tasks_per_gpu": 0 if gpus and multi else None,  # 0: no --ntasks-per-gpu, the layout is per node
    }


def lsf_resources(req, warn):
    per_node, tasks, cores_per_node = job_layout(req)
    warning = f"-wa USR1 -wt {max(1, round(SIGNAL_LEAD_S / 60))}" if warn and tasks > 1 else None  # -wt: minutes
    return {
        "cpus_per_task": tasks * req["cpus"],  # bsub -n: every core of the job
        "mem_mb": req["mem_mb"] * req["nodes"],  # the plugin divides it per core
        "ptile": cores_per_node if tasks > 1 else None,  # span[ptile=...], read for `mpi` jobs
        "lsf_extra": joined(f"-gpu num={req['gpus']}" if req["gpus"] else None, warning),  # -gpu: per host
    }


def cluster_resources(req, warn=False):
    """The plugin resources of one request (Snakemake leaves out keys whose value is None); `warn`: the job
    saves on the scheduler's warning signal (a pre-training)."""
    res = {"runtime": req["runtime"], "mpi": launcher(req)}
    if SCHEDULER == "slurm":
        return {**res, **slurm_resources(req, warn)}
    if SCHEDULER == "lsf":
        return {**res, **lsf_resources(req, warn)}
    # Local: `--resources gpu=N mem_mb=M` on the command line makes Snakemake respect them.
    return {**res, "mem_mb": req["mem_mb"], "gpu": req["gpus"] * req["nodes"] or None}


def check_pretrain_layout(model):
    """A multi-task pre-training's Lightning layout (train.devices, num_nodes) is its request's, or
    Lightning's cluster environment stops the job on the cluster: say so when planning."""
    cfg = config["models"][model]
    if cfg["init"] != "pretrain" or SCHEDULER == "local":
        return
    req, train = cfg["resources"], cfg["train"]
    per_node, tasks, _ = job_layout(req)
    if tasks > 1 and (train["devices"] != per_node or train["num_nodes"] != req["nodes"]):
        raise WorkflowError(
            f"models.{model}: resources ask for {req['nodes']} node(s) x {per_node} task(s), but train has "
            f"devices {train['devices']!r}, num_nodes {train['num_nodes']}: set train.devices = {per_node} and "
            f"train.num_nodes = {req['nodes']} (Lightning reads the ranks from the scheduler)")


def job_threads(req):
    """Cores of one task: what a local run gives the command (Snakemake caps it at --cores)."""
    return req["cpus"]


def launch_prefix(resources):
    """The shell prefix that starts a multi-task job: `srun `, `jsrun ... `, or nothing."""
    return f"{resources['mpi']} " if resources.get("mpi") else ""


def stage_request(stage):
    """The params `resources` of a stage: its dataset's, its model's, or probe.resources with the
    benchmark's own keys on top. Resources size the job; they are never part of its identity."""
    if stage.kind == "prepare":
        return config["datasets"][stage.item["dataset"]]["resources"]
    if stage.kind == "pretrain":
        check_pretrain_layout(stage.item["model"])
        return config["models"][stage.item["model"]]["resources"]
    bench = config["probe"]["benchmarks"][stage.item["benchmark"]]
    return {**config["probe"]["resources"], **(bench.get("resources") or {}), "nodes": 1, "one_process": True}


RESOURCE_KEYS = ("runtime", "mpi", "nodes", "mem_mb", "cpus_per_task", "gpu", "gres", "tasks_per_node", "tasks",
                 "slurm_extra", "tasks_per_gpu", "ptile", "lsf_extra")


def resources_of(stage):
    """Rule `resources:` keyword arguments of a stage's job, plus `launch`, the shell prefix of a
    multi-task job, and `cmd`, the stage's command (resources, not params: Snakemake keeps params in
    the job's identity).

    The shell line reads the command from `resources.cmd`, never from `stage` itself: Snakemake
    evaluates a rule's `shell:` expression again when the job runs (in the cluster job, and locally),
    and by then the loop variable `stage` is the last stage of the last file, report.smk, so
    every job would run `xtra report`."""
    res = cluster_resources(stage_request(stage), warn=stage.kind == "pretrain")
    return {**{key: res.get(key) for key in RESOURCE_KEYS}, "launch": launch_prefix(res), "cmd": stage.cmd}


def front_end_attempt(wildcards, attempt):
    """Snakemake's attempt number of a job (1, then 2, ... on `retries`), a resource the shell exports."""
    return attempt
