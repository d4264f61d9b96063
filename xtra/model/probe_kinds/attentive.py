"""The attentive probe kind: the mean of the last `num_last_blocks` blocks' outputs (B, N, d) ->
BatchNorm over channels without affine -> attention pooling with one learned query (no query
projection, key and value projections without bias, scale head_dim^-0.5, `num_heads` heads) ->
Linear. The query is initialised normal(0, 0.02), as the release's; its settings are
`probe.kinds.attentive` (`num_last_blocks`, `num_heads`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from xtra.errors import ParamsError
from xtra.model.probes import FeatureNorm, ProbeKind, register_probe_kind

__all__ = ["QUERY_INIT_STD", "AttentiveProbe", "ATTENTIVE"]

QUERY_INIT_STD = 0.02  # the release's `nn.init.normal_(query, std=0.02)`; linear layers keep torch's default


class AttentiveProbe(nn.Module):
    """mean of the last blocks -> BatchNorm over channels -> one-query attention pooling -> Linear."""

    kind = "attentive"

    def __init__(self, dim: int, num_classes: int, num_heads: int = 16, norm: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ParamsError(
                f"probe.kinds.attentive.num_heads: {num_heads} heads do not divide the encoder width {dim}"
            )
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.bn = FeatureNorm(dim) if norm else nn.Identity()  # a bank normalises once for all heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)  # torch's default init, as the release
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.query, std=QUERY_INIT_STD)

    @staticmethod
    def pool(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """[(B, N, d)] * n -> (B, N, d): the mean of the given blocks' outputs."""
        return torch.stack(list(blocks), dim=0).mean(dim=0)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, N, d) -> pooled (B, d) by the learned query.

        Computed as softmax_n(q_h . (W_k x_n)_h * scale) weighting (W_v x_n)_h, re-associated so that
        no (B, N, d) projection is formed: the query is mapped into token space once
        (u_h = W_k,h^T q_h) and W_v is applied after pooling. Same function and gradients, about N
        times fewer operations than projecting every token.
        """
        b, n, d = x.shape
        h = self.num_heads
        w_k = self.k.weight.reshape(h, d // h, d)  # (h, d/h, d): the rows of each head
        w_v = self.v.weight.reshape(h, d // h, d)
        u = torch.einsum("hcd,hc->hd", w_k, self.query.reshape(h, d // h))  # (h, d)
        attn = (torch.einsum("bnd,hd->bhn", x, u) * self.scale).softmax(dim=-1)  # (B, h, N)
        pooled = torch.einsum("bhn,bnd->bhd", attn, x)  # (B, h, d)
        return torch.einsum("bhd,hcd->bhc", pooled, w_v).reshape(b, d)  # (B, d)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> logits (B, C)."""
        x = self.bn(pooled)  # per-channel statistics over batch and tokens
        return self.linear(self.attend(x))


def _check(settings: Mapping[str, Any], width: int, depth: int) -> str | None:
    if settings["num_last_blocks"] > depth:
        return (
            f"probe.kinds.attentive.num_last_blocks: {settings['num_last_blocks']} blocks asked, the model has {depth}"
        )
    if width % settings["num_heads"] != 0:
        return f"probe.kinds.attentive.num_heads: {settings['num_heads']} heads do not divide the width {width}"
    return None


ATTENTIVE = register_probe_kind(
    ProbeKind(
        name="attentive",
        blocks=lambda settings: list(range(-settings["num_last_blocks"], 0)),
        pool=AttentiveProbe.pool,
        head=lambda dim, num_classes, settings: AttentiveProbe(dim, num_classes, settings["num_heads"], norm=False),
        keeps_tokens=True,
        check=_check,
    )
)
