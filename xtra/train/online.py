"""Online probes: probe heads trained during pre-training on the encoder's detached features, so that a
long run says how good its representation is while it trains (`models.<m>.online_probe`).

What they are. The offline probe's kinds (`xtra.model.probes`: linear, attentive, with the settings of
`probe.kinds.<kind>`) read the encoder's blocks under the block-causal mask in raster order, as the
offline probe does. One `HeadBank` per kind holds a head per learning rate of `online_probe.lrs`, each
trained by a `BankTrainer` of the probe package (its own AdamW, clipping, and gradients all-reduced over
the ranks by itself) one optimiser step per pre-training micro-batch, at `lr x (the model's rate at that
step / train.lr)`: the pre-training schedule's shape, as an online classifier in the model's own
optimiser would follow it.

What they are fed.
- The pre-training set (`dataset: null`, its labels): a raster-order model's heads take the block
  outputs of the training forward itself (forward hooks, `FeatureTap`; no extra forward: the
  features of the augmented batch, with stochastic depth as trained); a model trained in
  pseudo-random block order sees its training batch again in raster order (one extra encoder forward
  without gradients, in eval mode: about a third of the encoder's share of a training step);
- another labelled set (`dataset: NAME`, required when the pre-training set has fewer than 2 classes):
  its `train` split, in a seeded order resumable by position (`LabelledBatches`), through one extra
  forward as above.
Every `train.val_every_n_steps` steps, at the end of the run and at the `eval_steps` given (the steps of
`probe.along_training`), each head's top-1 is computed on the held-out split (`online_probe.eval_split`,
default `train.val_split`; `eval_batches` per device, default all of it) in eval mode, every rank a share,
counts all-reduced. Rank 0 appends one row per head to `online.csv` of the run folder (copied beside
model.pt at the end, where `dvc plots` and the report read it) and logs `online/<kind>_top1` (the best
head) and each head's to TensorBoard.

What they never do. They are no module of the LightningModule: not in its optimiser, nor its gradient
clip, nor DDP's parameters; they train after the step (`on_train_batch_end`), so the warm-up step of
`RebuildBucketsOnResume` (run from `on_train_batch_start`) trains none of them; the evaluation runs under
a forked RNG. The model's weights are bit for bit those of a run without them (tested). Their state
(banks, AdamW states, steps, the labelled set's position) is this callback's part of every checkpoint, so
exact resume stays exact for them too (tests/train/test_resume.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from xtra.data.prepared import PreparedDataset, load_manifest
from xtra.data.rng import derive_seed
from xtra.data.transforms import eval_transform
from xtra.errors import CheckpointError, DataError, ParamsError
from xtra.model.probes import HeadBank, probe_kind
from xtra.probe.config import SweepConfig, settings_grid
from xtra.probe.dist import world
from xtra.probe.loop import BankTrainer, autocast_for, encode_batch
from xtra.train.config import OnlineProbeConfig, PretrainConfig
from xtra.train.module import _append_csv, _truncate_csv

__all__ = [
    "ONLINE_FIELDS",
    "online_num_classes",
    "FeatureTap",
    "LabelledBatches",
    "OnlineBankTrainer",
    "OnlineProbes",
]

ONLINE_FIELDS = ["step", "epoch", "images_seen", "kind", "lr", "weight_decay", "top1"]


def online_num_classes(cfg: PretrainConfig) -> int:
    """The classes of the set the online heads learn; refuses (naming the key) a set without labels, a
    missing split or an unprepared dataset. Called on every rank before training starts."""
    online, where = cfg.online_probe, f"models.{cfg.model}.online_probe"
    try:
        manifest = load_manifest(online.prepared)
    except DataError as exc:
        raise DataError(f"{where}.dataset: {exc}") from exc
    classes = int(manifest["num_classes"])
    if classes < 2:
        named = f"dataset {online.dataset!r}" if online.dataset else f"the pre-training set {cfg.dataset!r}"
        raise ParamsError(
            f"{where}: {named} has {classes} class(es), no labels to probe with; set {where}.dataset to a "
            "labelled dataset of params (or online_probe.kinds: [] to train without online probes)"
        )
    splits = [online.eval_split] + (["train"] if online.dataset else [])
    for split in splits:
        if split not in manifest["splits"]:
            key = "eval_split" if split == online.eval_split else "dataset"
            raise DataError(
                f"{where}.{key}: {online.prepared} has no split {split!r}; its splits: {sorted(manifest['splits'])}"
            )
    return classes


class FeatureTap:
    """Forward hooks on the encoder blocks the online kinds read: while armed, the next forward's outputs
    of those blocks are kept (detached; the same tensors autograd keeps for the backward, no copy)."""

    def __init__(self, blocks: Sequence[torch.nn.Module], wanted: Sequence[int]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self.armed = False
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in wanted]

    def _hook(self, index: int) -> Callable:
        def keep(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.armed:
                self.outputs[index] = output.detach()  # (B, N, d)

        return keep

    def take(self) -> dict[int, torch.Tensor]:
        """The kept outputs (block index -> (B, N, d)); disarms."""
        outputs, self.outputs, self.armed = self.outputs, {}, False
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class LabelledBatches:
    """The online heads' batches from another labelled set: pass p over its `train` split is the seeded
    permutation `derive_seed(seed, "online", p)`, rank r takes every world-th sample of it, in batches of
    `batch_size` (the remainder waits for the next pass). The position is the number of batches drawn (this
    rank's), so a resumed run draws what the uninterrupted one drew."""

    def __init__(
        self, root: Path, img_size: int, eval_resize: int, batch_size: int, seed: int, num_workers: int
    ) -> None:
        self.dataset = PreparedDataset(root, "train", eval_transform(img_size, eval_resize))
        self.rank, self.world = world()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.per_pass = (len(self.dataset) // self.world) // batch_size
        if self.per_pass == 0:
            raise DataError(f"{root}: its train split has fewer than {batch_size} images a rank (train.batch_size)")
        self.drawn = 0
        self._batches: Iterable | None = None

    def _start(self) -> None:
        p, done = divmod(self.drawn, self.per_pass)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "online", p))
        order = torch.randperm(len(self.dataset), generator=gen)[self.rank :: self.world]
        mine = order[done * self.batch_size : self.per_pass * self.batch_size].tolist()
        self._batches = iter(
            DataLoader(Subset(self.dataset, mine), batch_size=self.batch_size, num_workers=self.num_workers)
        )

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (images (B, 3, S, S), labels (B,)) of this rank."""
        if self._batches is None or self.drawn % self.per_pass == 0:
            self._start()
        self.drawn += 1
        return next(self._batches)

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn, self._batches = int(state["drawn"]), None


class OnlineBankTrainer(BankTrainer):
    """A probe package's `BankTrainer` taking one optimiser step per pre-training micro-batch, each head at
    `lr x factor`, the factor the pre-training schedule's shape at the model's step (see the module doc)."""

    def __init__(self, bank: HeadBank, cfg: SweepConfig, device: torch.device) -> None:
        super().__init__(bank, cfg, batches_per_epoch=1, device=device)
        self.factor = 1.0

    def lrs(self, step: int) -> list[float]:
        return [g["base_lr"] * self.factor for g in self.optimizer.param_groups]

    def train_on(self, features: torch.Tensor, labels: torch.Tensor, factor: float) -> None:
        self.factor = factor
        self.micro_batch(0, features, labels)  # one micro-batch a step: loss, backward, all-reduce, clip, step


class OnlineProbes(L.Callback):
    """Online probe heads of one pre-training run (see the module doc)."""

    def __init__(
        self,
        cfg: PretrainConfig,
        num_classes: int,
        csv_path: Path,
        global_batch: int,
        eval_steps: Iterable[int] = (),
    ) -> None:
        self.cfg, self.online = cfg, cfg.online_probe
        self.num_classes, self.csv_path, self.global_batch = num_classes, Path(csv_path), global_batch
        self.eval_steps = set(eval_steps)
        self.sweeps = [_sweep(self.online, kind, cfg) for kind in self.online.kinds]
        self.trainers: dict[str, OnlineBankTrainer] = {}
        self.tap: FeatureTap | None = None
        self.labelled: LabelledBatches | None = None
        self.eval_loader: DataLoader | None = None
        self.last: dict[str, dict[str, float]] = {}  # kind -> the best head at the last evaluation
        self._loaded, self._last_eval, self._batch_step, self.depth = False, -1, 0, 0

    # ------------------------------------------------------------ set-up and state

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        encoder = pl_module.model.encoder
        self.depth = len(encoder.blocks)
        for sweep in self.sweeps:
            problem = probe_kind(sweep.kind).check(sweep.options, encoder.width, len(encoder.blocks))
            if problem:
                raise ParamsError(f"models.{self.cfg.model}.online_probe: {problem}")
            bank = HeadBank(sweep.kind, encoder.width, self.num_classes, sweep.settings, sweep.options, sweep.seed)
            self.trainers[sweep.kind] = OnlineBankTrainer(bank, sweep, device)
        arch, train = self.cfg.arch, self.cfg.train
        if self.online.dataset is not None:
            self.labelled = LabelledBatches(
                self.online.prepared,
                arch["img_size"],
                self.cfg.eval_resize,
                train.batch_size,
                self.cfg.seed,
                train.num_workers,
            )
        elif pl_module.model.block_orders is None:  # raster order: the training forward is the probe's
            wanted = sorted({b + self.depth if b < 0 else b for s in self.sweeps for b in s.blocks})
            self.tap = FeatureTap(encoder.blocks, wanted)
        held_out = PreparedDataset(
            self.online.prepared, self.online.eval_split, eval_transform(arch["img_size"], self.cfg.eval_resize)
        )
        rank, size = world()
        count = len(held_out)
        if self.online.eval_batches is not None:
            count = min(count, self.online.eval_batches * train.batch_size * size)
        self.eval_loader = DataLoader(  # every rank a share of the same fixed images; counts summed
            Subset(held_out, list(range(rank, count, size))), batch_size=train.batch_size, num_workers=0
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainers": {kind: t.state_dict() for kind, t in self.trainers.items()},
            "labelled": self.labelled.state_dict() if self.labelled is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind, trainer in self.trainers.items():
            trainer.load_state_dict(state["trainers"][kind])
        if self.labelled is not None:
            self.labelled.load_state_dict(state["labelled"])
        self._loaded = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and not self._loaded:
            raise CheckpointError(
                f"models.{self.cfg.model}: the checkpoint of step {trainer.global_step} holds no online probe state"
            )
        self._last_eval = trainer.global_step  # a resumed step was evaluated before its checkpoint
        if trainer.is_global_zero:
            _truncate_csv(self.csv_path, ONLINE_FIELDS, trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.tap is not None:
            self.tap.remove()

    # ------------------------------------------------------------ training

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step  # the optimiser step this micro-batch belongs to
        if self.tap is not None:
            self.tap.armed = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        device = trainer.strategy.root_device
        if self.labelled is not None:
            images, labels = self.labelled.next_batch()
            features = self._forward(pl_module, images, device)
        elif self.tap is not None:
            features = self._pool(self.tap.take())
            labels = batch[1]
        else:
            features = self._forward(pl_module, batch[0], device)
            labels = batch[1]
        factor = pl_module.lr_at(self._batch_step) / self.cfg.train.lr
        labels = labels.to(device)
        for kind, bank_trainer in self.trainers.items():
            bank_trainer.train_on(features[kind], labels, factor)
        step = trainer.global_step
        every = self.cfg.train.val_every_n_steps
        due = (every > 0 and step % every == 0) or step in self.eval_steps or step == pl_module.total_steps
        if step > self._last_eval and due:
            self._last_eval = step
            self._log(trainer, step, self.evaluate(pl_module, device))

    def _pool(self, outputs: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Kept block outputs -> each kind's pooled input, float32 (as `encode_batch` pools them)."""
        pooled = {}
        for sweep in self.sweeps:
            blocks = [outputs[b + self.depth if b < 0 else b] for b in sweep.blocks]
            pooled[sweep.kind] = probe_kind(sweep.kind).pool(blocks).float()
        return pooled

    def _forward(self, pl_module: L.LightningModule, images: torch.Tensor, device: torch.device) -> dict:
        """One raster-order encoder forward without gradients, in eval mode -> each kind's pooled input."""
        encoder = pl_module.model.encoder
        was_training = encoder.training
        encoder.eval()
        try:
            return encode_batch(encoder, images, self.sweeps, device)
        finally:
            encoder.train(was_training)

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, pl_module: L.LightningModule, device: torch.device) -> dict[str, list[float]]:
        """Every head's top-1 (%) on the held-out images; the same numbers on every rank."""
        encoder = pl_module.model.encoder
        was_training = encoder.training
        encoder.eval()
        correct = {kind: torch.zeros(len(t.bank), dtype=torch.long, device=device) for kind, t in self.trainers.items()}
        count = torch.zeros(1, dtype=torch.long, device=device)
        fork = [] if device.type == "cpu" else [device.index]
        try:
            with torch.random.fork_rng(devices=fork, device_type=device.type):
                for images, labels in self.eval_loader:
                    features = encode_batch(encoder, images, self.sweeps, device)
                    labels = labels.to(device)
                    for kind, bank_trainer in self.trainers.items():
                        bank = bank_trainer.bank.eval()
                        with autocast_for(device, bank_trainer.cfg.precision):
                            logits = bank(features[kind])  # [(B, C)] a head each
                        correct[kind] += torch.stack([(out.argmax(-1) == labels).sum() for out in logits])
                    count += len(labels)
        finally:
            encoder.train(was_training)
            for bank_trainer in self.trainers.values():
                bank_trainer.bank.train()
        totals = torch.cat([*correct.values(), count])
        if world()[1] > 1:
            dist.all_reduce(totals)
        if int(totals[-1]) == 0:
            raise DataError(f"models.{self.cfg.model}.online_probe.eval_split: no held-out image to evaluate on")
        top1 = (totals[:-1].double() * 100.0 / totals[-1].double()).tolist()
        out, i = {}, 0
        for kind, bank_trainer in self.trainers.items():
            out[kind] = [round(v, 4) for v in top1[i : i + len(bank_trainer.bank)]]
            i += len(bank_trainer.bank)
        return out

    def _log(self, trainer: L.Trainer, step: int, top1: dict[str, list[float]]) -> None:
        """online.csv rows and the loggers' scalars (rank 0); the best head of each kind kept for metrics.json."""
        rows, scalars = [], {}
        for kind, values in top1.items():
            settings = self.trainers[kind].bank.settings
            best = max(range(len(values)), key=lambda i: (values[i], -i))
            self.last[kind] = {"step": step, "top1": values[best], "lr": settings[best][0]}
            scalars[f"online/{kind}_top1"] = values[best]
            for (lr, wd), value in zip(settings, values):
                scalars[f"online/{kind}_lr{lr:g}_top1"] = value
                rows.append({"kind": kind, "lr": f"{lr:g}", "weight_decay": f"{wd:g}", "top1": f"{value:.4f}"})
        if not trainer.is_global_zero:
            return
        common = {"step": step, "epoch": trainer.current_epoch, "images_seen": step * self.global_batch}
        for row in rows:
            _append_csv(self.csv_path, ONLINE_FIELDS, {**common, **row})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)


def _sweep(online: OnlineProbeConfig, kind: str, cfg: PretrainConfig) -> SweepConfig:
    """The training settings of one kind's online bank (its schedule: `OnlineBankTrainer`)."""
    return SweepConfig(
        kind=kind,
        settings=settings_grid(online.lrs, [online.weight_decay]),
        epochs=1,
        seed=cfg.seed,
        precision="bf16-mixed" if cfg.train.precision == "bf16-mixed" else "32-true",
        options=online.options[kind],
    )
