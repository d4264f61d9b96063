"""`xtra prepare DATASET`: a raw dataset -> checksummed WebDataset shards + manifest.json.

Steps: the dataset's reader lists the samples (`xtra.data.readers.read_dataset`); samples whose
label is out of range are skipped; the split sizes are checked against the official ones
(`size_check`); each image is decoded, converted to RGB, resized and encoded in `num_workers`
processes (`xtra.data.images` holds the policies), in a fixed order (sorted by key), and written
to shards with their sidecar indexes (`xtra.data.shards`); a bad file is skipped with its reason,
and the run fails when more than `max_skipped_fraction` of the samples were skipped (the samples
the reader dropped and those with a bad label count as skipped too).

Every file is accounted for, in three lists of the manifest, each entry {split, source, reason}:
`skipped` (samples dropped: by the reader, for a bad label, or because they cannot be decoded; each
with its `stage`; the skipped fraction counts these), `not_taken` (files under the root that are
not samples: hidden, not an image Pillow decodes, outside a class folder, link loops, links out of
a class folder, empty class folders; not counted in the fraction) and `notes` (samples converted with
a caveat: a bit depth the file does not record, an ICC profile that cannot be applied). A run that
fails on the fraction converts every sample first, so its list is complete, and writes all three
lists to `<out_root>/<name>/failed-prepare.json` beside the last good manifest (which it keeps);
the next successful or up-to-date run removes that file. The summary names the first few files of
each list; `xtra prepare DATASET --explain` prints them all, from that file or the manifest,
without preparing.

Output `<out_root>/<name>/`: `<split>-NNNNNN.tar`, `<split>-NNNNNN.idx.npy` and `manifest.json`
(the ARCHITECTURE.md fields, plus per shard `bytes`, `index`, `index_sha256`; `skipped_fraction`;
`official_sizes` as {split: {expected, found, matched}}, where `found` counts the samples the
reader listed, before decoding; `image_policy`; each skipped entry's `stage`: reader, label or
decode). Nothing in it depends on time or on temporary paths, so the folder is byte-identical
when prepared twice with the same params; the shards do not depend on `num_workers` either.

Atomicity: everything is written into `<out_root>/.<name>.partial/`, the manifest last, and the
folder is renamed to `<out_root>/<name>/` only when complete. A stale `.partial` (or `.old`) folder
left by a killed run is removed first. One `prepare` of a dataset runs at a time (the DAG runners
guarantee it).

Sample order. Within each split the samples are sorted by key (for the duplicate check) and then
written in a fixed seeded permutation (`derive_seed("sample order", split)`), so every shard holds
a random mix of classes: ImageNet-style keys sort by class, and a streaming reader that shuffles
shards and a buffer of 1,000 samples would otherwise fill a batch with one or two classes.

Up to date. The defaults of a dataset section are those of the schema (`dataset_defaults`), for the
CLI and the API alike. `preparation_hash` (stored as the manifest's `params_hash`) covers the format
version, the image policy, the params that
change shard bytes (`xtra.data.fingerprint.shard_params`: not num_workers, resources,
max_skipped_fraction or size_check, which are not written to the manifest either) and the inputs:
for a dataset with a root, one walk of the whole root tree (path, size, mtime of every file); for
one without (embedded sets, readers passed in), the reader's listing. A run is skipped when the
existing manifest has that hash and every shard and index file is present with its recorded size:
no listing, no second stat of the raw files, no shard hash. `verify=True` (`xtra prepare --verify`)
also re-lists the raw data, compares the listing fingerprint and sha256s every shard and index, and
prepares again on any difference; `force=True` always prepares. An up-to-date dataset is left
untouched, manifest included (bytes and time): a re-run of a finished prepare stage makes nothing
after it stale.

Identity. The manifest records the dataset's identity (`identity`, `xtra.identity.dataset_identity`):
its content, every shard's sha256 and the classes. Later stages are keyed on it (a pre-training run,
a probe job), not on the params that made it, so a re-preparation that writes the same bytes changes
nothing downstream. The manifest's `version` is the prepare recipe version (`xtra/recipes.yaml`).

Experiments in a DVC temporary workspace (`dvc exp run --temp`, `--queue`) read the repository's
own prepared data through a link the `check` stage makes (`xtra.pipeline.dvc_yaml.share_prepared`);
there `xtra prepare` only checks that a dataset is up to date and refuses to prepare it (that would
change the data every other experiment and the workspace read).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xtra.atomic import sha256_file, write_json_atomic
from xtra.config import section_defaults
from xtra.data.fingerprint import listing_fingerprint, preparation_hash, shard_params, tree_fingerprint
from xtra.data.images import IMAGE_POLICY, Converted, convert_image
from xtra.data.readers.common import NotTaken
from xtra.data.rng import derive_seed
from xtra.data.shards import MANIFEST, ShardWriter
from xtra.data.source import RawDataset, Reader, Sample
from xtra.errors import DataError, writing_to
from xtra.identity import dataset_identity, recipe_version

__all__ = [
    "FORMAT_VERSION",
    "SAMPLE_ORDER",
    "FAILED_LIST",
    "explain",
    "dataset_defaults",
    "prepare_dataset",
    "configure_parser",
    "run",
]

# The manifest's `version` is the prepare recipe version (xtra/recipes.yaml, its one home, with each bump's
# reason): 2: seeded sample order, manifest without the non-shard params, input fingerprints; 3: embedded
# ICC profiles applied, 16-bit grey scaled by PNG sBIT; every file under the root accounted for (not_taken,
# notes); links followed once; colliding keys made unique; Pillow's extensions are candidates
FORMAT_VERSION = recipe_version("prepare")
FAILED_LIST = "failed-prepare.json"  # a failed prepare's full lists, beside the last good manifest
SHOWN = 5  # files of each list named in an error or the summary
SAMPLE_ORDER = 'sorted by key, then a fixed permutation per split: derive_seed("sample order", split)'


def dataset_defaults() -> dict:
    """The schema's default of every key of a dataset section (the one table of defaults)."""
    return section_defaults("dataset")


# The work of the conversion processes: (samples, image_size, keep_original). Set before the pool
# forks, so samples (arrays, callables) are never pickled; passed to the initializer under spawn.
_WORK: tuple[Sequence[Sample], int, bool] | None = None


@dataclass
class Plan:
    """What the reader listed, sorted by key, with the samples skipped before any decoding."""

    splits: dict[str, list[Sample]]
    found: dict[str, int]  # split -> samples listed by the reader
    skipped: list[dict] = field(default_factory=list)  # {split, source, reason, stage}
    not_taken: list[dict] = field(default_factory=list)  # {split, source, reason}: files that are not samples

    @property
    def total(self) -> int:
        """Samples listed or dropped by the reader: the denominator of the skipped fraction."""
        return sum(self.found.values()) + sum(1 for s in self.skipped if s.get("stage") == "reader")


def _source_of(sample: Sample) -> str:
    return str(sample.image) if isinstance(sample.image, (str, Path)) else sample.key


def _plan(raw: RawDataset) -> Plan:
    """Sort each split by key, check keys are unique, and skip samples with a bad label."""
    plan = Plan(splits={}, found={})
    for entry in raw.skipped:
        split, source, reason = entry
        if isinstance(entry, NotTaken):
            plan.not_taken.append({"split": split, "source": source, "reason": reason})
        else:
            plan.skipped.append({"split": split, "source": source, "reason": reason, "stage": "reader"})
    seen: dict[str, tuple[str, Sample]] = {}
    k = len(raw.classes)
    for split in sorted(raw.splits):
        kept: list[Sample] = []
        for sample in sorted(raw.splits[split], key=lambda s: s.key):
            if sample.key in seen:
                first_split, first = seen[sample.key]
                raise DataError(
                    f"{raw.source}: sample key {sample.key!r} occurs twice: {_source_of(first)} ({first_split}) "
                    f"and {_source_of(sample)} ({split})"
                )
            seen[sample.key] = (split, sample)
            label = sample.label
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < k:
                reason = f"label {label!r} out of range [0, {k})"
                plan.skipped.append({"split": split, "source": _source_of(sample), "reason": reason, "stage": "label"})
                continue
            kept.append(sample)
        order = np.random.default_rng(derive_seed("sample order", split)).permutation(len(kept))
        plan.splits[split] = [kept[i] for i in order]
        plan.found[split] = len(raw.splits[split])
    return plan


def _recorded(final: Path, expected_hash: str) -> dict | None:
    """The existing manifest when it has `expected_hash` and every shard and index has its recorded size."""
    try:
        manifest = json.loads((final / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("params_hash") != expected_hash or manifest.get("version") != FORMAT_VERSION:
        return None
    for split in manifest.get("splits", {}).values():
        for shard in split["shards"]:
            try:
                if (final / shard["file"]).stat().st_size != shard["bytes"] or not (final / shard["index"]).is_file():
                    return None
            except OSError:
                return None
    return manifest


def _verify_problem(final: Path, manifest: dict, listing: str) -> str | None:
    """The first difference the full check finds (listing, then shard and index sha256), else None."""
    if manifest.get("inputs", {}).get("listing_sha256") != listing:
        return "the reader lists different samples than the manifest records"
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for file, digest in ((shard["file"], shard["sha256"]), (shard["index"], shard["index_sha256"])):
                path = final / str(file)
                if not path.is_file() or sha256_file(path) != digest:
                    return f"{path} does not match its recorded sha256"
    return None


def _check_sizes(name: str, raw: RawDataset, plan: Plan, mode: str) -> dict:
    """Compare listed split sizes with the official ones; DataError (mode "error") or a warning."""
    report = {}
    for split, expected in sorted(raw.official_sizes.items()):
        found = plan.found.get(split, 0)
        report[split] = {"expected": int(expected), "found": found, "matched": found == expected}
        if found != expected:
            msg = f"dataset {name!r} split {split!r}: expected {expected} samples (official size), found {found}"
            if mode == "error":
                raise DataError(f"{msg} in {raw.source}; a partial copy? (size_check: warn accepts it)")
            warnings.warn(msg, stacklevel=2)
    return report


def _entries(entries: list[dict], shown: int = SHOWN) -> str:
    """The first `shown` entries as `split: source: reason`, joined by '; ', with the count of the rest."""
    text = "; ".join(f"{e['split']}: {e['source']}: {e['reason']}" for e in entries[:shown])
    return text + (f"; and {len(entries) - shown} more" if len(entries) > shown else "")


def _check_fraction(name: str, lists: dict, total: int, limit: float, failed: Path, params_hash: str) -> float:
    """The skipped fraction. Over `limit`: all `lists` (skipped, not_taken, notes) written to `failed`,
    and a DataError naming the first bad files and that file."""
    skipped = lists["skipped"]
    fraction = len(skipped) / total if total else 0.0
    if fraction > limit:
        message = (
            f"dataset {name!r}: {len(skipped)} of {total} samples skipped ({fraction:.2%}), "
            f"more than max_skipped_fraction {limit}; first: {_entries(skipped)}. Every reason "
            f"({len(skipped)} skipped, {len(lists['not_taken'])} not taken, {len(lists['notes'])} noted) "
            f"is in {failed}; `xtra prepare {name} --explain` prints them"
        )
        failure = {"dataset": name, "params_hash": params_hash, "error": message, "total": total}
        write_json_atomic(failed, {**failure, "skipped_fraction": fraction, **lists}, indent=1, sort_keys=True)
        raise DataError(message)
    return fraction


def _convert_one(i: int) -> Converted | str:
    assert _WORK is not None
    samples, size, keep = _WORK
    return convert_image(samples[i].image, size, keep)


def _init_worker(work: tuple[Sequence[Sample], int, bool]) -> None:
    global _WORK
    _WORK = work


@contextmanager
def _converter(samples: Sequence[Sample], size: int, keep: bool, workers: int) -> Iterator[Callable]:
    """A function range -> iterator of convert results, in order, over `workers` processes."""
    global _WORK
    _WORK = (samples, size, keep)
    try:
        if workers <= 1:
            yield lambda idx: map(_convert_one, idx)
            return
        fork = "fork" in mp.get_all_start_methods()
        ctx = mp.get_context("fork" if fork else "spawn")
        init, initargs = (None, ()) if fork else (_init_worker, (_WORK,))
        with ctx.Pool(workers, initializer=init, initargs=initargs) as pool:
            yield lambda idx: pool.imap(_convert_one, idx, chunksize=max(1, min(64, len(idx) // (8 * workers))))
    finally:
        _WORK = None


def _write_split(split: str, samples: list[Sample], start: int, convert: Callable, tmp: Path, p: dict) -> tuple:
    """Convert and shard one split; (manifest split entry, skipped entries, note entries)."""
    skipped: list[dict] = []
    notes: list[dict] = []
    results = convert(range(start, start + len(samples)))
    with ShardWriter(tmp, split, int(p["shard_size"])) as writer:
        for sample, result in tqdm(zip(samples, results), total=len(samples), desc=split, unit="img", mininterval=1):
            if isinstance(result, str):
                skipped.append({"split": split, "source": _source_of(sample), "reason": result, "stage": "decode"})
                continue
            if result.note:
                notes.append({"split": split, "source": _source_of(sample), "reason": result.note})
            extra = [(f"orig.{result.original[0]}", result.original[1])] if result.original else []
            writer.add(sample.key, int(sample.label), result.ext, result.data, extra)
        shards = writer.close()
    return {"count": sum(s["count"] for s in shards), "shards": shards}, skipped, notes


def _convert_all(plan: Plan, tmp: Path, p: dict) -> tuple[dict, list[dict], list[dict]]:
    """All splits -> ({split: entry}, decode-skipped entries, note entries)."""
    flat = [s for split in sorted(plan.splits) for s in plan.splits[split]]
    splits: dict = {}
    skipped: list[dict] = []
    notes: list[dict] = []
    with _converter(flat, int(p["image_size"]), bool(p["keep_original"]), int(p["num_workers"])) as convert:
        start = 0
        for split in sorted(plan.splits):
            entry, bad, noted = _write_split(split, plan.splits[split], start, convert, tmp, p)
            splits[split], start = entry, start + len(plan.splits[split])
            skipped.extend(bad)
            notes.extend(noted)
    return splits, skipped, notes


def _clear_stale(out_root: Path, name: str) -> tuple[Path, Path]:
    tmp, old = out_root / f".{name}.partial", out_root / f".{name}.old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    return tmp, old


def _publish(tmp: Path, final: Path, old: Path, manifest: dict) -> None:
    """Write the manifest last, then swap the folder in with renames."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _summary(manifest: dict, final: Path) -> str:
    lines = [f"prepared {manifest['dataset']} -> {final}  ({manifest['num_classes']} classes, {manifest['source']})"]
    lines.append(f"  {'split':<12}{'samples':>10}{'shards':>8}{'skipped':>9}")
    for split, entry in sorted(manifest["splits"].items()):
        bad = sum(1 for s in manifest["skipped"] if s["split"] == split)
        lines.append(f"  {split:<12}{entry['count']:>10}{len(entry['shards']):>8}{bad:>9}")
    skipped, not_taken, notes = manifest["skipped"], manifest["not_taken"], manifest["notes"]
    counts = {
        f"skipped {len(skipped)} ({manifest['skipped_fraction']:.2%})": skipped,
        f"not taken {len(not_taken)} (files under the root that are not samples)": not_taken,
        f"converted with a note {len(notes)}": notes,
    }
    for title, entries in counts.items():
        if entries or title.startswith("skipped"):
            lines.append(f"  {title}" + (":" if entries else ""))
        lines.extend(f"    {e['split']}: {e['source']}: {e['reason']}" for e in entries[:SHOWN])
        if len(entries) > SHOWN:
            lines.append(f"    and {len(entries) - SHOWN} more")
    if skipped or not_taken or notes:
        lines.append(f"  `xtra prepare {manifest['dataset']} --explain` lists them all")
    for split, check in sorted(manifest["official_sizes"].items()):
        if not check["matched"]:
            lines.append(f"  warning: {split} has {check['found']} samples, the official size is {check['expected']}")
    return "\n".join(lines)


def explain(name: str, out_root: Path) -> str:
    """Every file a prepare of `name` skipped, did not take, or converted with a note, one a line, from
    the list a failed prepare left (`FAILED_LIST`) or else the manifest; nothing is prepared."""
    folder = Path(out_root) / name
    failed, manifest = folder / FAILED_LIST, folder / MANIFEST
    if failed.is_file():
        record = json.loads(failed.read_text())
        lines = [f"{name}: the last prepare failed ({failed}): {record['error']}"]
        if manifest.is_file():
            lines.append(f"{name}: the last good preparation ({manifest}) is kept")
    elif manifest.is_file():
        record = json.loads(manifest.read_text())
        lines = [f"{name}: prepared ({manifest}), skipped fraction {record['skipped_fraction']:.2%}"]
    else:
        raise DataError(f"dataset {name!r} has not been prepared: neither {manifest} nor {failed} exists")
    titles = {
        "skipped": "skipped (samples dropped; counted in the skipped fraction)",
        "not_taken": "not taken (files under the root that are not samples)",
        "notes": "converted with a note",
    }
    for key, title in titles.items():
        entries = record.get(key, [])
        lines.append(f"{title}: {len(entries)}")
        for e in entries:
            stage = f" [{e['stage']}]" if "stage" in e else ""
            lines.append(f"  {e['split']}: {e['source']}: {e['reason']}{stage}")
    return "\n".join(lines)


def _inputs(p: dict, reader: Reader, use_tree: bool) -> tuple[dict, RawDataset | None]:
    """The input identity: the root tree's fingerprint (no listing needed), else the reader's listing."""
    if use_tree:
        digest, files = tree_fingerprint(Path(str(p["root"])).expanduser())
        return {"tree_sha256": digest, "tree_files": files}, None
    raw = reader(p)
    return {"listing_sha256": listing_fingerprint(raw)}, raw


def _existing(name: str, final: Path, digest: str, verify: bool, listing: Callable[[], str]) -> dict | None:
    """The existing manifest when the prepared folder is up to date (fully verified with `verify`)."""
    existing = _recorded(final, digest)
    if existing is None:
        return None
    if not verify:
        print(f"{name}: up to date ({final}, params_hash {digest[:12]}; --verify re-hashes the shards)")
        (final / FAILED_LIST).unlink(missing_ok=True)  # a failure of other inputs than these
        return existing
    problem = _verify_problem(final, existing, listing())
    if problem is None:
        print(f"{name}: up to date and verified ({final}, params_hash {digest[:12]})")
        (final / FAILED_LIST).unlink(missing_ok=True)
        return existing
    print(f"{name}: --verify: {problem}; preparing again")
    return None


def prepare_dataset(
    name: str,
    params: dict,
    out_root: Path,
    force: bool = False,
    reader: Reader | None = None,
    verify: bool = False,
    read_only: str | None = None,
) -> dict:
    """Prepare dataset `name` (its params section) into `out_root/name/`; returns the manifest.

    `reader` replaces `xtra.data.readers.read_dataset` (tests, custom sources). See the module doc
    for when a run is skipped (`verify`: full check first; `force`: never skipped). With `read_only`
    (why `out_root` must not be written) a dataset that is not up to date is a DataError saying so.
    """
    use_tree = reader is None and bool(params.get("root"))  # a reader passed in may read more than root
    if reader is None:
        from xtra.data.readers import read_dataset as reader

    p = {**dataset_defaults(), **params}
    out_root, final = Path(out_root), Path(out_root) / name
    out_root.mkdir(parents=True, exist_ok=True)
    tmp, old = _clear_stale(out_root, name)
    inputs, raw = _inputs(p, reader, use_tree)
    digest = preparation_hash(p, json.dumps(inputs, sort_keys=True), FORMAT_VERSION)
    stat_files = not use_tree  # with the tree fingerprint, sizes and mtimes are in it already

    def listing() -> str:
        nonlocal raw
        raw = raw if raw is not None else reader(p)
        return listing_fingerprint(raw, stat_files=stat_files)

    if not force and (existing := _existing(name, final, digest, verify, listing)) is not None:
        return existing
    if read_only:
        raise DataError(f"dataset {name!r} is not prepared for these params in {final}, and {read_only}")
    inputs["listing_sha256"] = listing()
    assert raw is not None
    return _prepare(name, p, raw, {"params_hash": digest, "inputs": inputs}, (tmp, final, old))


def _prepare(name: str, p: dict, raw: RawDataset, ids: dict, folders: tuple[Path, Path, Path]) -> dict:
    """Check, convert, shard and publish; the manifest."""
    tmp, final, old = folders
    plan = _plan(raw)
    sizes = _check_sizes(name, raw, plan, str(p["size_check"]))
    tmp.mkdir()
    try:
        with writing_to(final):
            splits, bad, notes = _convert_all(plan, tmp, p)
            lists = {"skipped": plan.skipped + bad, "not_taken": plan.not_taken, "notes": notes}
            limit = float(p["max_skipped_fraction"])
            fraction = _check_fraction(name, lists, plan.total, limit, final / FAILED_LIST, ids["params_hash"])
            manifest = {
                "format": "webdataset",
                "version": FORMAT_VERSION,
                "dataset": name,
                "kind": p.get("kind"),
                "source": raw.source,
                "params": shard_params(p),
                **ids,
                "image_policy": IMAGE_POLICY,
                "sample_order": SAMPLE_ORDER,
                "classes": list(raw.classes),
                "num_classes": len(raw.classes),
                "splits": splits,
                **lists,
                "skipped_fraction": fraction,
                "official_sizes": sizes,
            }
            manifest["identity"] = dataset_identity(manifest)  # its content: what later stages are keyed on
            _publish(tmp, final, old, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(_summary(manifest, final))
    return manifest


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """`xtra prepare DATASET [--params params.yaml] [--force | --verify | --explain]`."""
    parser.add_argument("dataset", metavar="DATASET", help="a dataset name under `datasets:` in params")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--force", action="store_true", help="prepare again even when up to date")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="before skipping, re-list the raw data and sha256 every shard (slow at scale)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print every file the last prepare skipped, did not take or converted with a note; prepare nothing",
    )


def run(args: argparse.Namespace) -> int:
    """CLI entry: load params, prepare the dataset, print the summary."""
    from xtra.config import load_params
    from xtra.data.config import PrepareConfig
    from xtra.pipeline.dvc_yaml import shared_prepared

    cfg = PrepareConfig.from_params(load_params(args.params), args.dataset, args.params)
    if getattr(args, "explain", False):
        print(explain(cfg.name, cfg.out_root))
        return 0
    shared = shared_prepared(Path(args.params).resolve().parent, cfg.out_root)
    read_only = (
        f"{cfg.out_root} is the prepared data of the repository at {shared}, shared with this DVC temporary "
        "workspace: preparing it here would change the data of the workspace and of every other experiment. "
        "Prepare it in the repository (`dvc repro prepare-" + cfg.name + "` there), or run this experiment "
        "in the workspace (`dvc exp run` without --temp or --queue)"
        if shared
        else None
    )
    prepare_dataset(
        cfg.name,
        cfg.section(),
        cfg.out_root,
        force=args.force,
        verify=getattr(args, "verify", False),
        read_only=read_only,
    )
    sys.stdout.flush()
    return 0
