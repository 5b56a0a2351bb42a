"""Process group set-up from torchrun's environment: NCCL on GPUs, gloo on CPU; 1 process needs none."""
from __future__ import annotations

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
