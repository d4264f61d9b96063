"""`xtra prepare DATASET`: a raw dataset -> checksummed WebDataset shards + manifest.json.

Steps: the dataset's reader lists the samples (`xtra.data.readers.read_dataset`); samples whose
label is out of range are skipped; the split sizes are checked against the official ones
(`size_check`); each image is decoded, converted to RGB, resized and encoded in `num_workers`
processes (`xtra.data.images` holds the policies), in a fixed order (sorted by key), and written
to shards with their sidecar indexes (`xtra.data.shards`); a bad file is skipped with its reason,
and the run fails when more than `max_skipped_fraction` of the samples were skipped (the samples
the reader dropped and those with a bad label count as skipped too).

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
prepares again on any difference; `force=True` always prepares.
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

from xtra.atomic import sha256_file
from xtra.config import section_defaults
from xtra.data.fingerprint import listing_fingerprint, preparation_hash, shard_params, tree_fingerprint
from xtra.data.images import IMAGE_POLICY, Converted, convert_image
from xtra.data.rng import derive_seed
from xtra.data.shards import MANIFEST, ShardWriter
from xtra.data.source import RawDataset, Reader, Sample
from xtra.errors import DataError, writing_to

__all__ = [
    "FORMAT_VERSION",
    "SAMPLE_ORDER",
    "dataset_defaults",
    "prepare_dataset",
    "configure_parser",
    "run",
]

FORMAT_VERSION = 2  # 2: seeded sample order, manifest without the non-shard params, input fingerprints
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
    skipped: list[dict] = field(default_factory=list)  # {split, source, reason}

    @property
    def total(self) -> int:
        """Samples listed or dropped by the reader: the denominator of the skipped fraction."""
        return sum(self.found.values()) + sum(1 for s in self.skipped if s.get("stage") == "reader")


def _source_of(sample: Sample) -> str:
    return str(sample.image) if isinstance(sample.image, (str, Path)) else sample.key


def _plan(raw: RawDataset) -> Plan:
    """Sort each split by key, check keys are unique, and skip samples with a bad label."""
    plan = Plan(splits={}, found={})
    plan.skipped = [{"split": s, "source": src, "reason": r, "stage": "reader"} for s, src, r in raw.skipped]
    seen: dict[str, str] = {}
    k = len(raw.classes)
    for split in sorted(raw.splits):
        kept: list[Sample] = []
        for sample in sorted(raw.splits[split], key=lambda s: s.key):
            if sample.key in seen:
                raise DataError(f"sample key {sample.key!r} occurs twice (splits {seen[sample.key]!r}, {split!r})")
            seen[sample.key] = split
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


def _check_fraction(name: str, skipped: list[dict], total: int, limit: float) -> float:
    """The skipped fraction; DataError naming the first bad files when it is over `limit`."""
    fraction = len(skipped) / total if total else 0.0
    if fraction > limit:
        first = "; ".join(f"{s['split']}: {s['source']}: {s['reason']}" for s in skipped[:5])
        raise DataError(
            f"dataset {name!r}: {len(skipped)} of {total} samples skipped ({fraction:.2%}), "
            f"more than max_skipped_fraction {limit}; first: {first}"
        )
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
    """Convert and shard one split; (manifest split entry, skipped entries)."""
    skipped: list[dict] = []
    results = convert(range(start, start + len(samples)))
    with ShardWriter(tmp, split, int(p["shard_size"])) as writer:
        for sample, result in tqdm(zip(samples, results), total=len(samples), desc=split, unit="img", mininterval=1):
            if isinstance(result, str):
                skipped.append({"split": split, "source": _source_of(sample), "reason": result, "stage": "decode"})
                continue
            extra = [(f"orig.{result.original[0]}", result.original[1])] if result.original else []
            writer.add(sample.key, int(sample.label), result.ext, result.data, extra)
        shards = writer.close()
    return {"count": sum(s["count"] for s in shards), "shards": shards}, skipped


def _convert_all(plan: Plan, tmp: Path, p: dict) -> tuple[dict, list[dict]]:
    """All splits -> ({split: entry}, decode-skipped entries)."""
    flat = [s for split in sorted(plan.splits) for s in plan.splits[split]]
    splits: dict = {}
    skipped: list[dict] = []
    with _converter(flat, int(p["image_size"]), bool(p["keep_original"]), int(p["num_workers"])) as convert:
        start = 0
        for split in sorted(plan.splits):
            entry, bad = _write_split(split, plan.splits[split], start, convert, tmp, p)
            splits[split], start = entry, start + len(plan.splits[split])
            skipped.extend(bad)
    return splits, skipped


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
    lines.append(f"  skipped {len(manifest['skipped'])} ({manifest['skipped_fraction']:.2%})")
    for split, check in sorted(manifest["official_sizes"].items()):
        if not check["matched"]:
            lines.append(f"  warning: {split} has {check['found']} samples, the official size is {check['expected']}")
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
        return existing
    problem = _verify_problem(final, existing, listing())
    if problem is None:
        print(f"{name}: up to date and verified ({final}, params_hash {digest[:12]})")
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
) -> dict:
    """Prepare dataset `name` (its params section) into `out_root/name/`; returns the manifest.

    `reader` replaces `xtra.data.readers.read_dataset` (tests, custom sources). See the module doc
    for when a run is skipped (`verify`: full check first; `force`: never skipped).
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
    inputs["listing_sha256"] = listing()
    assert raw is not None
    return _prepare(name, p, raw, {"params_hash": digest, "inputs": inputs}, (tmp, final, old))


def _prepare(name: str, p: dict, raw: RawDataset, ids: dict, folders: tuple[Path, Path, Path]) -> dict:
    """Check, convert, shard and publish; the manifest."""
    tmp, final, old = folders
    plan = _plan(raw)
    sizes = _check_sizes(name, raw, plan, str(p["size_check"]))
    _check_fraction(name, plan.skipped, plan.total, float(p["max_skipped_fraction"]))
    tmp.mkdir()
    try:
        with writing_to(final):
            splits, bad = _convert_all(plan, tmp, p)
            skipped = plan.skipped + bad
            fraction = _check_fraction(name, skipped, plan.total, float(p["max_skipped_fraction"]))
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
                "skipped": skipped,
                "skipped_fraction": fraction,
                "official_sizes": sizes,
            }
            _publish(tmp, final, old, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(_summary(manifest, final))
    return manifest


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """`xtra prepare DATASET [--params params.yaml] [--force | --verify]`."""
    parser.add_argument("dataset", metavar="DATASET", help="a dataset name under `datasets:` in params")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--force", action="store_true", help="prepare again even when up to date")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="before skipping, re-list the raw data and sha256 every shard (slow at scale)",
    )


def run(args: argparse.Namespace) -> int:
    """CLI entry: load params, prepare the dataset, print the summary."""
    from xtra.config import load_params
    from xtra.data.config import PrepareConfig

    cfg = PrepareConfig.from_params(load_params(args.params), args.dataset, args.params)
    prepare_dataset(cfg.name, cfg.section(), cfg.out_root, force=args.force, verify=getattr(args, "verify", False))
    sys.stdout.flush()
    return 0
