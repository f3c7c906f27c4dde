"""The run's process context: who this process is in a torchrun job, and its process group.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT for rendezvous). Without
them the run is one process without a process group, exactly the plain `gvmrl train`.

Failure handling: a rank killed with `kill -9` closes its sockets, so a peer waiting in a gloo
collective fails at once ("Connection closed by peer"), and torchrun's agent tears the other
workers down as soon as one exits, so the job exits non-zero in seconds. The process-group
`timeout` is the backstop for a rank that hangs without dying (a stuck filesystem, a lost node
whose sockets never close): collectives then fail after `timeout`. It must exceed the longest
time one rank can wait for another at a collective (the slowest rank's rollouts), or a healthy
but slow run fails; on NCCL the watchdog tears the process down after the same timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gvmrl.config import ConfigError
from gvmrl.runtime import resolve_device

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
DEFAULT_TIMEOUT_S = 1800.0
"""Longest wait at a collective (30 min): rollouts of a slow rank stay within it."""
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class ProcessContext:
    """This process's place in the job; `mesh` is None when there is no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, progress, TensorBoard and the final checkpoint."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.mesh is not None

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier()

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (picklable objects, e.g. a temporary path)."""
        if not self.grouped:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def print(self, *values: Any) -> None:
        """Print to stderr from rank 0 only, so K ranks do not repeat every line."""
        if self.is_main:
            print(*values, file=sys.stderr, flush=True)


def launch_environment(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, or None outside torchrun.

    Inconsistent variables are a user error (ConfigError: the CLI prints one line, exit 2):
    typically RANK left set in a shell, or a launcher other than torchrun."""
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return None
    if len(present) != len(LAUNCH_VARIABLES):
        missing = sorted(set(LAUNCH_VARIABLES) - set(present))
        raise ConfigError(
            f"{', '.join(present)} set but {', '.join(missing)} not: launch with torchrun"
        )
    try:
        rank, world, local = (int(environ[name]) for name in LAUNCH_VARIABLES)
    except ValueError:
        values = ", ".join(f"{name}={environ[name]!r}" for name in LAUNCH_VARIABLES)
        raise ConfigError(f"launch variables must be integers, got {values}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent launch variables RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def resolve_device_type(device: str) -> str:
    """"auto" is cuda when a GPU is visible, else cpu; otherwise "cpu" or "cuda" (a ConfigError
    naming `device` when this machine has no such device). A job's rank always runs on
    cuda:LOCAL_RANK, so a GPU index is refused."""
    if device.startswith("cuda:"):
        raise ConfigError(
            f"device: {device} under torchrun; each rank uses cuda:LOCAL_RANK, so set device=cuda "
            "(choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return resolve_device(device).type


def init_process_context(
    device: str = "auto",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    environ: Mapping[str, str] = os.environ,
) -> ProcessContext:
    """Join the job torchrun launched: process group (gloo on CPU, NCCL on CUDA) and a 1-D mesh.

    Outside torchrun the context is world size 1 without a process group (`grouped` is False).
    """
    launch = launch_environment(environ)
    kind = resolve_device_type(device)
    rank, world, local = launch or (0, 1, 0)
    target = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        visible = torch.cuda.device_count()
        if local >= visible:
            raise ConfigError(
                f"device: the rank of LOCAL_RANK {local} needs GPU {local}, but {visible} GPU(s) "
                "are visible; launch at most that many processes per node (--nproc-per-node)"
            )
        torch.cuda.set_device(target)
    if launch is None:
        return ProcessContext(rank, world, local, target, None)
    options: dict[str, Any] = {
        "backend": BACKENDS[kind],
        "timeout": datetime.timedelta(seconds=timeout_s),
    }
    if kind == "cuda":
        options["device_id"] = target
    dist.init_process_group(**options)
    mesh = init_device_mesh(kind, (world,), mesh_dim_names=("dp",))
    return ProcessContext(rank, world, local, target, mesh)


def shutdown(context: ProcessContext) -> None:
    """Leave the process group after a clean finish (a failed rank just exits)."""
    if context.grouped and dist.is_initialized():
        dist.destroy_process_group()


def quiet_other_ranks(context: ProcessContext) -> None:
    """Ranks other than 0 keep errors only: K copies of every warning would drown the log."""
    if context.is_main:
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
