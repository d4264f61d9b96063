"""AdamW's parameters in the release's order: with an active gradient clip, a pre-training step of this
project's model equals, bit for bit, a step whose AdamW groups are built the release's way, from
`named_parameters()` of the release's module tree (tests/fixtures/release_files.ReleaseTree: `enc`
with its position embedding, patch embedding, blocks, norm; `proj`; `predictor`; `aim_proj`).

The clip sums the parameters' gradient norms in the order of the optimiser's groups (Lightning clips
`param_groups`' parameters, in order), so another order moves the clipped update in its last bits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SMALL_ARCH
from tests.fixtures.release_files import ReleaseTree, release_groups
from xtra.model.arch import ArchConfig
from xtra.model.xtra import XTRA
from xtra.train.config import TrainConfig
from xtra.train.module import PretrainModule
from xtra.train.schedule import decay_groups

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {
    "epochs": 1,
    "max_steps": -1,
    "warmup_epochs": 0,
    "lr": 1e-3,
    "warmup_start_lr": 1e-3,
    "min_lr": 1e-6,
    "weight_decay": 0.05,
    "betas": [0.9, 0.95],
}


def train_config(**keys) -> TrainConfig:
    """A full train section: the schema's defaults with `keys` on top."""
    from xtra.config import section_defaults

    return TrainConfig.from_dict({**section_defaults("train"), **keys})


STEPS, CLIP = 20, 0.01  # a tiny model's gradient norms are about 0.05: every step is clipped


def _train(model: XTRA, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> tuple[dict, list[float]]:
    """STEPS clipped AdamW steps as Lightning takes them; the final weights and each step's total norm."""
    norms = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        model.loss(images[step], step=step).backward()
        clipped = [p for group in optimizer.param_groups for p in group["params"]]  # Lightning's main_params
        norms.append(float(torch.nn.utils.clip_grad_norm_(clipped, CLIP)))
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def test_clipped_steps_equal_the_release_order_bit_for_bit() -> None:
    arch = {**SMALL_ARCH, "num_heads_ahead": 2}
    torch.manual_seed(0)
    images = torch.randn(STEPS, 4, 3, 32, 32)

    torch.manual_seed(1)
    ours = PretrainModule(arch, train_config(**TRAIN), steps_per_epoch=STEPS, run_id="test")
    optimizer = ours.configure_optimizers()["optimizer"]
    lr = optimizer.param_groups[0]["lr"]

    torch.manual_seed(1)
    release = XTRA(ArchConfig.from_dict(arch))
    tree = ReleaseTree(release)
    release_optimizer = torch.optim.AdamW(release_groups(tree, TRAIN["weight_decay"]), lr=lr, betas=(0.9, 0.95))

    # the same parameters (by name), in the same groups, in the same order
    names = {id(p): n for n, p in ours.model.named_parameters()}
    release_names = {id(p): n for n, p in release.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups] == [
        [release_names[id(p)] for p in g["params"]] for g in release_optimizer.param_groups
    ]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]

    torch.manual_seed(1)
    registered = XTRA(ArchConfig.from_dict(arch))  # the former order: the modules' registration order
    former_optimizer = torch.optim.AdamW(decay_groups(registered, TRAIN["weight_decay"]), lr=lr, betas=(0.9, 0.95))

    ours_state, ours_norms = _train(ours.model, optimizer, images)
    release_state, release_norms = _train(release, release_optimizer, images)
    former_state, former_norms = _train(registered, former_optimizer, images)
    assert min(release_norms) > CLIP  # every step clipped
    assert ours_norms == release_norms
    for key, value in release_state.items():
        assert torch.equal(ours_state[key], value), key
    # the former order clips by norms summed in another order: the weights move in their last bits
    moved = max(float((former_state[k] - v).abs().max()) for k, v in release_state.items())
    print(f"max |former - release| after {STEPS} clipped steps: {moved:.3g}")
    assert former_norms != release_norms and moved > 0
