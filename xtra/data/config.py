"""The typed config of the prepare stage: what `xtra prepare DATASET` reads from params, built once.

`PrepareConfig.from_params(params, name)` takes the validated params dict (every default filled in
by the schema, the one home of defaults and enums) and holds one dataset's section, one field per
schema key (a test checks both ways), and where it is prepared. The readers and the up-to-date
fingerprint take the section as the mapping the schema defines (`section()`): a reader registered
for a new kind reads its own keys from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xtra.errors import ParamsError

__all__ = ["PrepareConfig"]


@dataclass(frozen=True)
class PrepareConfig:
    """One dataset's `datasets.<name>` section (`$defs/dataset` of the schema, which says what each key does)."""

    name: str
    kind: str
    root: str | None
    image_size: int
    keep_original: bool
    shard_size: int
    num_workers: int
    max_skipped_fraction: float
    size_check: str
    split_seed: int
    heldout_fraction: float
    partition: int
    split_lists: str | None
    layout: str
    out_root: Path  # paths.prepared: the dataset goes to out_root / name
    resources: dict[str, Any] = field(default_factory=dict)  # the scheduler's request (Snakemake), no result

    @classmethod
    def from_params(cls, params: Mapping[str, Any], name: str, source: str = "params.yaml") -> PrepareConfig:
        """From validated params; a dataset params does not define is a ParamsError naming the defined ones."""
        datasets = params.get("datasets") or {}
        if name not in datasets:
            known = ", ".join(sorted(datasets)) or "none"
            raise ParamsError(f"{source}: datasets.{name} is not defined (defined: {known})")
        return cls(name=name, out_root=Path(params["paths"]["prepared"]), **datasets[name])

    def section(self) -> dict[str, Any]:
        """The dataset section as the schema spells it (what readers and the fingerprint read)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "out_root")}
