"""dvc.yaml: the stage table of `xtra.pipeline.dag` written for DVC, after its `check` stage.

`render_dvc_yaml(params)` is the text `xtra dag` writes: a header, the `check` stage (it runs
`xtra dag --check --stamp`, `always_changed`, and writes a constant file every other stage depends
on: when params.yaml is valid, complete and the table of this file, nothing after it becomes
stale; otherwise the run stops there naming the fix), then one DVC stage per stage of the table.
`dvc_yaml_problem` and `params_problem` are what the check reports.

Experiments that DVC runs in a temporary copy of the repository (`dvc exp run --temp`, and every
queued one, `--queue`) lack its git-ignored prepared data: the check links the repository's own
`paths.prepared` into the copy (`share_prepared`), and `xtra prepare` there only reads it
(`shared_prepared`): it refuses to prepare a dataset anew through the link. A repository with no
prepared data to share is an error of the check, naming the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from xtra.errors import ParamsError
from xtra.pipeline.dag import DVC_YAML, Stage, stage_table
from xtra.yamlio import read_yaml

__all__ = [
    "RECIPES",
    "CHECK_STAGE",
    "CHECK_STAMP",
    "STAMP_TEXT",
    "check_stamp",
    "render_dvc_yaml",
    "dvc_yaml_problem",
    "params_problem",
    "write_dvc_yaml",
    "TEMP_WORKSPACES",
    "temp_workspace_origin",
    "share_prepared",
    "shared_prepared",
]

_HEADER = """\
# dvc.yaml: WRITTEN BY `xtra dag` from params.yaml and xtra/pipeline/dag.py (do not edit; `xtra profile
# NAME` rewrites it, and `xtra dag --check` says whether it is current). The local front-end of the
# pipeline; workflow/Snakefile makes one rule per stage of the same table (xtra/pipeline/dag.py).
#
# The first stage, `check`, runs on every `dvc repro`: it stops the run, naming the fix, when
# params.yaml is invalid, leaves a schema key out (`xtra profile --fill`) or is not the table this
# file was written from (`xtra dag`). Every other stage depends on its constant output.
#
#   dvc repro                          # everything that is out of date
#   dvc exp run -S 'models.xtra_k2.arch.block_size=1'    # an ablation (docs/ABLATIONS.md)
#   dvc metrics show; dvc plots show
#
# Staleness (the same rule as Snakemake's, from the one table of xtra/identity.py): each stage
# depends on exactly the params keys that can change its result (never `resources`, worker counts,
# log/checkpoint/validation cadence, `probe.ray`), on its kind's recipe version (xtra/recipes.yaml),
# and on the files other stages write: the prepared dataset's manifest.json, the model's
# metrics.json (it carries the model's identity; checkpoints are never a dependency), the result
# JSONs. No code: a refactor re-runs nothing, a change of numerics bumps the recipe version. A
# forced re-run of a finished stage rewrites the same bytes and makes nothing after it stale.
# params.yaml spells out every schema key (`xtra profile --fill`), so the values a command uses
# are the ones DVC compares, and `dvc exp run -S` can override any of them.
#
# No copies of large data (.dvc/config: cache type reflink,hardlink,symlink, never a copy):
# - prepare: the output is the dataset's manifest.json, `cache: false` and `persist: true`. The
#   shards beside it (hundreds of GB) are no DVC output at all: never hashed by `dvc status`,
#   never copied into .dvc/cache, never deleted before `xtra prepare` runs (it decides itself
#   whether they are current). The manifest holds every shard's sha256, so depending on it is
#   depending on the shards. `dvc push`/`pull` do not carry prepared data: re-prepare it from the
#   raw data, or point `paths.prepared` at a shared copy.
# - pretrain: model.pt (the weights-only artifact), metrics.json and, with online probes on,
#   online.csv are cached (linked, not copied), so `dvc push` shares the trained model and `dvc exp
#   apply` restores it. The resumable checkpoints in models/<model>/checkpoints/ are no output: DVC
#   never hashes, caches or deletes them, and an interrupted run resumes from them.
# - probe: one stage per (model, benchmark); its result JSONs are cached (small), so a failed job
#   leaves every other stage's results in place and committed; its resumable state in
#   results/probe-state/ is no output.
# - report: tables, figures, metrics and plot data are cached (small; results/ is git-ignored, so
#   the cache is what lets `dvc exp show` and `dvc metrics diff` read past runs).
# Raw data (`datasets.*.root`) is not a dependency: hashing terabytes on every `dvc status` is not
# affordable. After changing raw files, re-prepare with `dvc repro -f prepare-NAME`.
"""

_PLOTS = [
    {"{results}/plots/top1.csv": {"template": "bar_horizontal", "x": "top1", "y": "key"}},
    {"{results}/plots/sweep.csv": {"template": "scatter", "x": "lr", "y": "top1"}},
    {"{results}/plots/loss.csv": {"x": "step", "y": "loss"}},
    {"{results}/plots/online.csv": {"x": "images_seen", "y": "top1"}},
    {"{results}/plots/images_seen.csv": {"template": "scatter", "x": "images_seen", "y": "top1"}},
    "{results}/figures/top1_bars.png",
    "{results}/figures/lr_sweep.png",
    "{results}/figures/pretrain_loss.png",
    "{results}/figures/online_top1.png",
]


RECIPES = "xtra/recipes.yaml"  # xtra.identity.RECIPES_FILE, as DVC finds it from the repository root
CHECK_STAGE = "check"
CHECK_STAMP = ".params-checked"  # the check stage's output, in paths.results
STAMP_TEXT = "params.yaml is valid, complete and the stage table of dvc.yaml\n"


def check_stamp(params: dict[str, Any]) -> str:
    """The path of the check stage's output (constant content: no stage after it becomes stale)."""
    return f"{params['paths']['results']}/{CHECK_STAMP}"


def _dvc_stage(stage: Stage, stamp: str) -> dict[str, Any]:
    """A stage's entry: its command, the check's stamp and its data files, its params keys and its kind's
    recipe version (`xtra/recipes.yaml`, a second params file), its outputs."""
    params: list[Any] = [*stage.params, {RECIPES: [stage.kind]}]
    entry: dict[str, Any] = {"cmd": stage.cmd, "deps": [stamp, *stage.data], "params": params}
    if stage.kind == "prepare":
        entry["outs"] = [{o: {"cache": False, "persist": True}} for o in stage.outs]
    else:
        entry["outs"] = list(stage.outs)
    if stage.metrics:
        entry["metrics"] = list(stage.metrics)
    return entry


def render_dvc_yaml(params: dict[str, Any]) -> str:
    """The text of dvc.yaml for a validated params dict: the check stage, then the stage table."""
    stamp = check_stamp(params)
    check = {"cmd": f"xtra dag --check --stamp {stamp}", "always_changed": True, "outs": [{stamp: {"cache": False}}]}
    stages = {CHECK_STAGE: check, **{s.name: _dvc_stage(s, stamp) for s in stage_table(params)}}
    results = params["paths"]["results"]
    plots = [
        {k.format(results=results): v for k, v in p.items()} if isinstance(p, dict) else p.format(results=results)
        for p in _PLOTS
    ]
    body = yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)
    return _HEADER + "\n" + body


def dvc_yaml_problem(params: dict[str, Any], root: Path) -> str | None:
    """Why `root/dvc.yaml` is not the one params make (None when it is).

    Compared as DVC reads it (stages, plots), not as text: a params file whose sections come in
    another order (a tool that rewrote it) makes the same stages."""
    path = Path(root) / DVC_YAML
    if not path.is_file():
        return f"{path} is missing: run `xtra dag` to write it"
    try:
        found = read_yaml(path.read_text(), str(path))
    except ParamsError:
        found = None
    if found != read_yaml(render_dvc_yaml(params)):
        return (
            f"{path} is not the stage table of the current params (a dataset, model, benchmark, kind "
            f"or path changed): run `xtra dag` to rewrite it"
        )
    return None


def params_problem(params_file: str | Path) -> str | None:
    """Why a params file cannot drive DVC: schema keys it leaves to their defaults (None when complete).

    DVC compares only what the file spells out: a stage would run, then DVC would refuse to record it.
    """
    from xtra.pipeline.fill import missing_keys

    missing = missing_keys(Path(params_file).read_text())
    if missing:
        return (
            f"{params_file} leaves out {missing[:6]}: DVC sees only what the file spells out. "
            "Run `xtra profile --fill` to write every schema key into it"
        )
    return None


def write_dvc_yaml(params: dict[str, Any], root: Path) -> Path:
    from xtra.atomic import write_atomic

    return write_atomic(Path(root) / DVC_YAML, render_dvc_yaml(params))


# ---------------------------------------------------------------- experiments in a temporary workspace

TEMP_WORKSPACES = (".dvc", "tmp", "exps")  # DVC copies the repository to <repo>/.dvc/tmp/exps/<tmp>/


def temp_workspace_origin(root: str | Path) -> Path | None:
    """The repository a DVC temporary workspace at `root` was copied from; None when `root` is none."""
    parts, n = Path(root).resolve().parts, len(TEMP_WORKSPACES)
    for i in range(len(parts) - n):
        if parts[i : i + n] == TEMP_WORKSPACES:
            return Path(*parts[:i])
    return None


def share_prepared(params: dict[str, Any], root: str | Path) -> str | None:
    """In a DVC temporary workspace, link the repository's prepared data (a relative `paths.prepared`)
    into it; why it cannot be shared (None when linked, or nothing to do)."""
    origin, prepared = temp_workspace_origin(root), Path(params["paths"]["prepared"])
    here = Path(root) / prepared
    if origin is None or prepared.is_absolute() or here.is_symlink() or here.exists():
        return None
    there = origin / prepared
    if not there.is_dir():
        return (
            f"DVC runs this experiment in a temporary copy of the repository ({Path(root).resolve()}), which "
            f"lacks the git-ignored {prepared}, and the repository at {origin} has none to share: prepare the "
            f"datasets there first (`dvc repro` of its prepare stages), or run the experiment in the workspace "
            f"(`dvc exp run` without --temp or --queue)"
        )
    here.parent.mkdir(parents=True, exist_ok=True)
    here.symlink_to(there.resolve(), target_is_directory=True)
    print(f"{here}: the prepared data of the repository at {origin}, shared with this DVC temporary workspace")
    return None


def shared_prepared(root: str | Path, out_root: str | Path) -> Path | None:
    """The repository whose prepared data `out_root` (relative to `root`) is, read through the link of
    `share_prepared` from a DVC temporary workspace; None when it is a workspace's own."""
    origin = temp_workspace_origin(root)
    path = Path(out_root) if Path(out_root).is_absolute() else Path(root) / out_root
    return origin if origin is not None and path.is_symlink() else None
