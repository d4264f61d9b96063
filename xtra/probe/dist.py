"""Multi-device probe jobs: one process per device, torch.distributed over the batch.

`run_on_devices(fn, devices, *args)` runs `fn(device, *args)` in `devices` processes (spawned here,
or the ones a launcher such as torchrun already started: WORLD_SIZE/RANK/LOCAL_RANK set) with a
process group: NCCL on GPUs, gloo on CPU. Rank r uses `cuda:<local rank>` when GPUs are present.
Returns rank 0's return value. A job with one device runs `fn` in this process, with no group.
What each rank computes: `xtra.probe.loop` (1/world of every global batch, gradients all-reduced,
the bank's normalisation over the global batch).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["world", "run_on_devices", "job_device"]


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def job_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = job_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(device, *args)
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_on_devices(fn: Callable[..., Any], devices: int, *args: Any) -> Any:
    """fn(device, *args) on `devices` processes; rank 0's return value (see the module doc)."""
    if dist.is_available() and dist.is_initialized():
        return fn(job_device(int(os.environ.get("LOCAL_RANK", 0))), *args)  # inside a launched group
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            return fn(job_device(int(os.environ.get("LOCAL_RANK", 0))), *args)
        finally:
            dist.destroy_process_group()
    if devices <= 1:
        return fn(job_device(0), *args)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="xtra-probe-") as tmp:
        out = os.path.join(tmp, "rank0.pkl")
        mp.spawn(_worker, args=(devices, _free_port(), out, fn, args), nprocs=devices, join=True)
        return pickle.loads(Path(out).read_bytes())
