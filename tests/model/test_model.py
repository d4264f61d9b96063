"""The block-causal mask, the encoder/predictor, block concatenation and the XTRA loss."""

from __future__ import annotations

import pytest
import torch

from xtra.errors import ParamsError
from xtra.model.arch import MODEL_PRESETS, ArchConfig
from xtra.model.mask import block_causal_mask, block_ids, block_ranks
from xtra.model.vit import build_encoder
from xtra.model.xtra import XTRA, concat_blocks, patchify_blocks, xtra_loss


def tiny_arch(**kw) -> ArchConfig:
    base = dict(
        width=32,
        depth=2,
        num_heads=2,
        img_size=32,
        patch_size=4,
        block_size=2,
        predictor_depth=2,
        predictor_width=16,
        predictor_num_heads=2,
        attn_impl="sdpa",
    )
    return ArchConfig(**{**base, **kw})


def test_block_ids_follow_the_formula() -> None:
    grid, k = 8, 2
    ids = block_ids(grid, k).view(grid, grid)
    for i in range(grid):
        for j in range(grid):
            assert ids[i, j] == (i // k) * (grid // k) + (j // k)


def test_k1_is_token_causal_and_k_grid_is_full() -> None:
    grid = 8
    n = grid * grid
    assert torch.equal(block_causal_mask(grid, 1), torch.tril(torch.ones(n, n, dtype=torch.bool)))
    assert block_causal_mask(grid, grid).all()


def test_block_mask_attends_within_block_and_to_earlier_blocks_only() -> None:
    grid, k = 8, 2
    ids = block_ids(grid, k)
    mask = block_causal_mask(grid, k)
    expected = ids.unsqueeze(0) <= ids.unsqueeze(1)
    assert torch.equal(mask, expected)
    assert not mask[0, 2]  # token 2 is in block 1, token 0 in block 0: no look-ahead
    assert mask[0, 1] and mask[1, 0]  # tokens 0 and 1 share block 0: full attention inside it


def _block_pixel_slice(m: int, arch: ArchConfig) -> tuple[slice, slice]:
    c, g = arch.block_pixels, arch.grid // arch.block_size
    r, col = divmod(m, g)
    return slice(r * c, (r + 1) * c), slice(col * c, (col + 1) * c)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("order", ["raster", "pseudo_random"])
def test_changing_block_m_changes_nothing_before_it(k: int, order: str) -> None:
    torch.manual_seed(0)
    arch = tiny_arch(block_size=k, block_order=order, num_block_orders=1).resolved()
    model = XTRA(arch).eval()
    perm = model.order_for_step(0)
    ranks = block_ranks(arch.grid, k, perm)  # (N,) rank of each token's block
    m_block = 5 if arch.num_blocks > 5 else arch.num_blocks - 1
    m_rank = int(ranks[block_ids(arch.grid, k) == m_block][0])
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    rows, cols = _block_pixel_slice(m_block, arch)
    y[:, :, rows, cols] += torch.randn_like(y[:, :, rows, cols])
    with torch.no_grad():
        from xtra.model.mask import MaskSpec

        spec = MaskSpec(arch.grid, k, perm)
        enc_x, enc_y = model.encoder(x, spec), model.encoder(y, spec)
        pred_x = model.predictor(model.proj(enc_x), spec)
        pred_y = model.predictor(model.proj(enc_y), spec)
    before, at = ranks < m_rank, ranks == m_rank
    assert before.any()
    torch.testing.assert_close(enc_x[:, before], enc_y[:, before], rtol=0, atol=1e-6)
    torch.testing.assert_close(pred_x[:, before], pred_y[:, before], rtol=0, atol=1e-6)
    assert (enc_x[:, at] - enc_y[:, at]).abs().max() > 1e-3  # the test can fail: block m itself changes


def _attention_by_definition(attn, x: torch.Tensor, grid: int, k: int, order: tuple[int, ...] | None) -> torch.Tensor:
    """The attention layer written out from METHOD.md, query by query: token q attends to the
    tokens of every block predicted no later than its own (no mask builder of the project)."""
    b, n, d = x.shape
    h = attn.num_heads
    q, kk, v = attn.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, N, d/h)
    per_side = grid // k
    blocks = [(t // grid // k) * per_side + (t % grid) // k for t in range(n)]
    rank = {blk: (order.index(blk) if order is not None else blk) for blk in set(blocks)}
    out = torch.empty_like(q)
    for query in range(n):
        keys = [t for t in range(n) if rank[blocks[t]] <= rank[blocks[query]]]
        scores = q[:, :, query : query + 1] @ kk[:, :, keys].transpose(-1, -2) / (d // h) ** 0.5
        out[:, :, query] = (scores.softmax(-1) @ v[:, :, keys])[:, :, 0]
    return attn.proj(out.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("impl", ["sdpa", "reference", "flex"])
@pytest.mark.parametrize("k, order", [(2, None), (2, (3, 0, 2, 1)), (1, None), (4, None)])
def test_each_attention_path_equals_attention_by_definition(impl: str, k: int, order) -> None:
    """The project's three paths (its cached dense mask, its per-call mask, its FlexAttention
    BlockMask) against the rule written out by hand; flex runs eagerly, forward only, on CPU."""
    from xtra.model.mask import MaskSpec
    from xtra.model.vit import Attention

    torch.manual_seed(0)
    grid = 4
    attn = Attention(16, 2, attn_impl=impl).eval()
    x = torch.randn(2, grid * grid, 16)
    with torch.no_grad():
        ours = attn(x, MaskSpec(grid, k, order))
        expected = _attention_by_definition(attn, x, grid, k, order)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_paper_encoder_parameter_counts_on_meta_device() -> None:
    with torch.device("meta"):
        base = build_encoder("base", 256, 16, 4)
        huge = build_encoder("huge", 224, 14, 4)
    n_base = sum(p.numel() for p in base.parameters())
    n_huge = sum(p.numel() for p in huge.parameters())
    assert abs(n_base - 85.8e6) / 85.8e6 < 0.01, n_base
    assert abs(n_huge - 631e6) / 631e6 < 0.01, n_huge


def test_paper_presets_build_with_their_shapes() -> None:
    with torch.device("meta"):
        model = XTRA(ArchConfig(**MODEL_PRESETS["xtra_h14"]))
    assert model.pixel_heads[0].mlp[0].in_features == 640 * 16
    assert model.pixel_heads[0].mlp[2].out_features == 3 * 56 * 56
    assert model.proj.mlp[2].bias is None and model.pixel_heads[0].mlp[2].bias is not None


def test_concat_blocks_is_channel_major() -> None:
    grid, k, d = 4, 2, 3
    tokens = torch.arange(grid * grid * d, dtype=torch.float32).view(1, grid * grid, d)  # token t, channel ch
    out = concat_blocks(tokens, grid, k)  # (1, 4, d*k*k)
    for block in range(4):
        br, bc = divmod(block, grid // k)
        expected = [
            tokens[0, (br * k + r) * grid + (bc * k + c), ch] for ch in range(d) for r in range(k) for c in range(k)
        ]
        assert out[0, block].tolist() == torch.stack(expected).tolist()


def test_loss_equals_a_direct_computation_of_the_formula() -> None:
    torch.manual_seed(0)
    b, s, c = 2, 8, 4  # 2x2 blocks of 4x4 pixels
    images = torch.randn(b, 3, s, s)
    m = (s // c) ** 2
    preds = [torch.randn(b, m, 3 * c * c) for _ in range(2)]
    # direct: cut block m at rows/cols, flatten (3, c, c), normalise with the unbiased variance
    targets = []
    for blk in range(m):
        r, col = divmod(blk, s // c)
        t = images[:, :, r * c : (r + 1) * c, col * c : (col + 1) * c].reshape(b, -1)
        targets.append((t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, keepdim=True) + 1e-6))
    target = torch.stack(targets, 1)
    direct = sum(((preds[j][:, : m - 1 - j] - target[:, 1 + j :]) ** 2).mean() for j in range(2)) / 2
    model_target = patchify_blocks(images, c)
    from xtra.model.xtra import normalize_blocks

    ours = xtra_loss(preds, normalize_blocks(model_target))
    torch.testing.assert_close(ours, direct)
    l1 = xtra_loss(preds, normalize_blocks(model_target), loss="l1")
    direct_l1 = sum((preds[j][:, : m - 1 - j] - target[:, 1 + j :]).abs().mean() for j in range(2)) / 2
    torch.testing.assert_close(l1, direct_l1)


def test_forward_features_returns_chosen_blocks() -> None:
    torch.manual_seed(0)
    encoder = XTRA(tiny_arch(depth=3)).encoder.eval()
    x = torch.randn(1, 3, 32, 32)
    feats = encoder.forward_features(x, blocks=[-1, 0])
    assert [f.shape for f in feats] == [torch.Size([1, 64, 32])] * 2
    with torch.no_grad():
        torch.testing.assert_close(encoder.norm(encoder.forward_features(x)[0]), encoder(x))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(img_size=30), "not divisible by patch_size x block_size"),
        (dict(preset="gigantic"), "unknown preset"),
        (dict(num_heads_ahead=64), "num_heads_ahead"),
        (dict(loss="l2"), "arch.loss"),
    ],
)
def test_bad_arch_is_a_clear_error(kw: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        tiny_arch(**kw).resolved()


def test_checkpoint_with_missing_or_unexpected_keys_is_named(tmp_path) -> None:
    from dataclasses import asdict

    from xtra.errors import CheckpointError
    from xtra.model.checkpoint import load_encoder, save_model_checkpoint

    arch = tiny_arch().resolved()
    path = tmp_path / "m.ckpt"
    save_model_checkpoint(XTRA(arch), path, asdict(arch), drop=("encoder.norm",))
    with pytest.raises(CheckpointError, match=r"missing keys: \['norm.bias', 'norm.weight'\]"):
        load_encoder(path)
    with pytest.raises(CheckpointError, match="different architecture"):
        save_model_checkpoint(XTRA(arch), path, asdict(arch))
        load_encoder(path, expected_arch={**asdict(arch), "depth": 3})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_encoder(path)


@pytest.mark.parametrize("order", ["raster", "pseudo_random"])
def test_encoder_flex_path_forward_equals_dense_path(order: str) -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = XTRA(tiny_arch(block_order=order)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model.encoder(x)
        model.set_attn_impl("flex")  # eager FlexAttention on CPU: forward only (no CPU backward)
        flex = model.encoder(x)
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)


def test_attention_bench_reports_every_cpu_path(capsys: pytest.CaptureFixture) -> None:
    from xtra.bench.attention import run_attention_bench

    rows = run_attention_bench(
        "tiny", batch=2, steps=1, warmup=0, device="cpu", overrides={"depth": 1, "predictor_depth": 1}
    )
    assert [r.impl for r in rows] == ["sdpa", "reference"]
    assert all(r.images_per_s > 0 and r.step_ms > 0 and r.peak_mem_mb > 0 for r in rows)
    assert "vs reference" in capsys.readouterr().out


def test_pseudo_random_orders_follow_the_release_rule() -> None:
    """As many permutations as blocks by default, no two sharing a prefix, drawn per step from a seed;
    validation uses the first, and probing (the encoder alone) stays in raster order."""
    arch = tiny_arch(block_order="pseudo_random", block_order_seed=3).resolved()
    model = XTRA(arch)
    orders = model.block_orders
    m = arch.num_blocks
    assert len(orders) == m and all(sorted(o) == list(range(m)) for o in orders)
    assert len({o[0] for o in orders}) == m  # distinct first blocks: no two share any prefix
    assert orders == XTRA(arch).block_orders  # seeded
    drawn = [model.order_for_step(s) for s in range(200)]
    assert drawn == [XTRA(arch).order_for_step(s) for s in range(200)]  # the same on every rank and resume
    assert len(set(drawn)) == m  # every permutation is drawn (uniformly, not in a cycle)
    assert drawn[:m] != orders[: len(drawn[:m])]
    assert model.order_for_step(None) == orders[0] and model.encoder.block_order is None
    with pytest.raises(ParamsError, match="num_block_orders"):
        tiny_arch(block_order="pseudo_random", num_block_orders=m + 1).resolved()


def test_patch_embedding_is_kaiming_normal_fan_in_with_zero_bias() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("base", 256, 16, 4)
    weight = encoder.patch_embed.proj.weight  # (768, 3, 16, 16): fan-in 768
    assert torch.equal(encoder.patch_embed.proj.bias, torch.zeros(768))
    assert abs(float(weight.detach().std()) - (2.0 / (3 * 16 * 16)) ** 0.5) < 0.002


def test_predictor_fp32_runs_the_predictor_alone_in_fp32() -> None:
    """The release's fp16 recipe: predictor outputs fp32, cast back to the autocast dtype before the heads."""
    arch = tiny_arch(predictor_fp32=True).resolved()
    model = XTRA(arch)
    seen: dict[str, torch.dtype] = {}
    model.predictor.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("predictor", o.dtype))
    model.pixel_heads[0].mlp[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("heads_in", i[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert seen == {"predictor": torch.float32, "heads_in": torch.bfloat16} and out[0].dtype == torch.bfloat16


def test_gpu_bench_plumbing_on_cpu(capsys: pytest.CaptureFixture, one_thread) -> None:
    """`xtra bench gpu`'s table on CPU with shrunken models (FlexAttention rows need CUDA): plumbing only."""
    from xtra.bench.gpu import run_gpu_bench
    from xtra.model.flops import train_flops_per_image

    shrink = {
        "preset": "tiny",
        "width": 32,
        "depth": 1,
        "num_heads": 2,
        "img_size": 32,
        "patch_size": 8,
        "block_size": 2,
        "predictor_depth": 1,
        "predictor_width": 16,
        "predictor_num_heads": 2,
        "proj_hidden": 32,
        "head_hidden": 32,
    }
    rows = run_gpu_bench(
        ("xtra_b16", "xtra_h14"), {"xtra_b16": 2, "xtra_h14": 2}, steps=1, warmup=0, device="cpu", overrides=shrink
    )
    assert [(r.model, r.recipe) for r in rows] == [
        ("xtra_b16", "bf16 sdpa"),
        ("xtra_b16", "fp16 release"),
        ("xtra_h14", "bf16 sdpa"),
        ("xtra_h14", "fp16 release"),
    ]
    assert all(r.images_per_s > 0 and r.mfu is None for r in rows)
    out = capsys.readouterr().out
    assert "vs bf16 sdpa" in out and "1.00x" in out
    # XTRA-B/16 at 256 px: ~3 x 85 GFLOPs of forward (encoder + predictor + heads) per image
    assert 2.0e11 < train_flops_per_image(ArchConfig(**MODEL_PRESETS["xtra_b16"])) < 3.0e11


def test_a_model_file_written_before_the_renames_still_loads(tmp_path) -> None:
    """model.pt of before one word per concept (arch `heads` / `predictor_heads`, tensors `heads.*`) is
    read with the new names, for probing (the encoder) and for reconstructions (the whole model)."""
    from dataclasses import asdict

    from xtra.model.artifact import read_model_artifact
    from xtra.model.checkpoint import load_artifact_encoder
    from xtra.train.reconstruct import load_model_file

    torch.manual_seed(0)
    model = XTRA(tiny_arch()).eval()
    arch = asdict(tiny_arch())
    old_arch = {
        ("heads" if k == "num_heads" else "predictor_heads" if k == "predictor_num_heads" else k): v
        for k, v in arch.items()
    }
    old_state = {k.replace("pixel_heads.", "heads.", 1): v for k, v in model.state_dict().items()}
    assert any(k.startswith("heads.") for k in old_state)
    payload = {"format": "xtra-model", "version": 1, "init": "pretrain", "arch": old_arch, "state_dict": old_state}
    torch.save(payload, tmp_path / "model.pt")
    artifact = read_model_artifact(tmp_path / "model.pt")
    assert artifact.arch == arch and set(artifact.state_dict) == set(model.state_dict())
    encoder, cfg, _ = load_artifact_encoder(tmp_path / "model.pt", arch)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encoder(images), rtol=0, atol=0)
        loaded = load_model_file(tmp_path / "model.pt").eval()
        for a, b in zip(loaded(images), model(images)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
