"""`xtra bench gpu|attention|data|sweep|online`: measured throughput, printed as tables with ratios (one module each).

- gpu: XTRA-B/16 and H/14 training images/s, step time, peak memory and MFU in bf16 (dense-mask
  SDPA vs compiled FlexAttention) and the release's fp16 recipe, as ratios;
- attention: XTRA training steps per attention path (dense-mask SDPA, FlexAttention on CUDA, and a
  reference that rebuilds the mask in every call);
- data: per-core images/s of a prepared dataset through the streaming reader and random access
  against a bare decode of the same images, opens per 1,000 samples, and cores per GPU;
- sweep: a K-learning-rate probe sweep in one pass vs K separate runs;
- online: a pre-training step with and without online probe heads, an evaluation's time, and their
  FLOPs at B/16 and H/14.
These measure; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    attn = sub.add_parser("attention", help="training throughput per attention path")
    attn.add_argument("--preset", default="tiny", help="tiny|small|base|large|huge or xtra_b16|xtra_h14")
    attn.add_argument("--batch", type=int, default=32)
    attn.add_argument("--steps", type=int, default=5)
    attn.add_argument("--block-size", type=int, default=None)
    attn.add_argument("--img-size", type=int, default=None)
    attn.add_argument("--patch-size", type=int, default=None)
    attn.add_argument("--bf16", action="store_true", help="bf16 autocast")
    attn.add_argument("--device", default=None)
    gpu = sub.add_parser("gpu", help="XTRA-B/16 and H/14 training: bf16 SDPA vs bf16 FlexAttention vs fp16 release")
    gpu.add_argument("--preset", action="append", choices=["xtra_b16", "xtra_h14"], default=None)
    gpu.add_argument("--batch-b16", type=int, default=128, help="per-device batch of XTRA-B/16")
    gpu.add_argument("--batch-h14", type=int, default=32, help="per-device batch of XTRA-H/14")
    gpu.add_argument("--steps", type=int, default=10)
    gpu.add_argument("--warmup", type=int, default=3)
    gpu.add_argument("--device", default=None)
    data = sub.add_parser("data", help="images/s per core: streaming, random access, bare decode; cores per GPU")
    data.add_argument("dataset", help="a dataset of params.yaml (prepared beforehand)")
    data.add_argument("--params", default="params.yaml")
    data.add_argument("--split", default="train")
    data.add_argument("--num-images", type=int, default=2048, help="about this many samples per path")
    data.add_argument("--batch", type=int, default=32)
    data.add_argument("--img-size", type=int, default=224, help="crop of the pre-training transform")
    sweep = sub.add_parser("sweep", help="one-pass K-lr probe sweep vs K separate runs")
    sweep.add_argument("--epochs", type=int, default=2)
    sweep.add_argument("--samples", type=int, default=512)
    sweep.add_argument("--depth", type=int, default=12)
    sweep.add_argument(
        "--kind", action="append", default=None, help="a probe kind (repeatable; default: linear, attentive)"
    )
    sweep.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    online = sub.add_parser("online", help="a pre-training step with and without online probe heads")
    online.add_argument("--params", default="params.yaml")
    online.add_argument("--model", default="xtra_k2", help="a model of params (its arch and batch size)")
    online.add_argument("--kind", action="append", default=None, help="a probe kind (repeatable; default: linear)")
    online.add_argument("--lr", action="append", type=float, default=None, help="a head's lr (repeatable)")
    online.add_argument("--steps", type=int, default=10, help="steps per round")
    online.add_argument("--rounds", type=int, default=5, help="rounds of each, alternating")
    online.add_argument("--eval-images", type=int, default=1000)
    online.add_argument("--extra-forward", action="store_true", help="feed the heads a raster forward of their own")
    online.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    if args.bench == "attention":
        from xtra.bench.attention import run_attention_bench

        overrides = {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size)) if v}
        run_attention_bench(
            args.preset,
            args.batch,
            args.steps,
            block_size=args.block_size,
            device=args.device,
            bf16=args.bf16,
            overrides=overrides,
        )
    elif args.bench == "gpu":
        from xtra.bench.gpu import run_gpu_bench

        run_gpu_bench(
            tuple(args.preset or ("xtra_b16", "xtra_h14")),
            {"xtra_b16": args.batch_b16, "xtra_h14": args.batch_h14},
            args.steps,
            args.warmup,
            args.device,
        )
    elif args.bench == "data":
        from xtra.bench.data import run_data_bench
        from xtra.config import load_params

        params = load_params(args.params)
        if args.dataset not in params["datasets"]:
            from xtra.errors import ParamsError

            raise ParamsError(f"datasets.{args.dataset}: no such dataset in {args.params}")
        run_data_bench(
            Path(params["paths"]["prepared"]) / args.dataset,
            split=args.split,
            img_size=args.img_size,
            num_images=args.num_images,
            batch_size=args.batch,
        )
    elif args.bench == "online":
        from xtra.bench.online import run_online_bench
        from xtra.config import load_params

        params = load_params(args.params, check_paths=False)
        model = params["models"][args.model]
        run_online_bench(
            model["arch"],
            model["train"]["batch_size"],
            kinds=tuple(args.kind or ("linear",)),
            kind_params=params["probe"]["kinds"],  # each kind's settings, as the run's online heads take them
            lrs=tuple(args.lr or (1e-3,)),
            steps=args.steps,
            rounds=args.rounds,
            eval_images=args.eval_images,
            val_every=model["train"]["val_every_n_steps"] or 50,
            extra_forward=args.extra_forward,
            threads=args.threads,
        )
    else:
        from xtra.bench.sweep import run_sweep_bench

        run_sweep_bench(
            kinds=tuple(args.kind or ("linear", "attentive")),
            epochs=args.epochs,
            num_samples=args.samples,
            depth=args.depth,
            num_threads=args.threads,
        )
    return 0
