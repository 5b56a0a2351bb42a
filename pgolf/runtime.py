"""Where and how code runs: the device, the processes (torchrun, NCCL on GPUs, gloo on CPU), the precision
(bf16 autocast and Newton-Schulz on CUDA, float32 on CPU) and the CPU allocator.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


CPU = Dist(0, 1, torch.device("cpu"))  # one process on the CPU: the report, the benchmarks, the tests


def setup() -> Dist:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across processes (a no-op for one); returns t."""
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def relaunch_under_torchrun(module: str) -> None:
    """With PGOLF_NPROC=N > 1 outside torchrun, rerun `python -m module` as N torchrun processes and exit."""
    nproc = int(os.environ.get("PGOLF_NPROC", "1"))
    if nproc > 1 and "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
        launcher = subprocess.Popen(cmd)
        try:
            code = launcher.wait()
        except BaseException:  # Ctrl-C or SIGTERM here: torchrun stops its workers on SIGTERM
            launcher.terminate()
            launcher.wait()
            raise
        sys.exit(code)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ns_dtype(device: torch.device) -> torch.dtype:
    # bf16 as in the baseline on GPUs. float32 on CPUs, for exactness, not speed: bf16 speed there depends on the
    # processor (bench/newton_schulz.py: 0.5-0.8x the float32 time on an AMD EPYC with avx512_bf16; +30% elsewhere).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter numbers from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed CPU memory instead of returning it; False where that is not glibc.

    glibc serves allocations over its mmap threshold (at most 32 MB) with fresh mappings and unmaps them
    on free, so a batch whose activations exceed it pays a page fault per 4 KiB page on every op (measured
    here: 2.3 GB/s for an elementwise multiply of 33 MB tensors). PyTorch's CPU tuning guide swaps in
    jemalloc or tcmalloc for the same reason; this does it without a dependency, and changes no result.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
