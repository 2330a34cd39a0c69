"""Distributed data-parallel set-up for ``torchrun`` and SLURM launches.

Launch on one node with ``torchrun --nproc_per_node=G $(which matkit) train config.yaml`` (or
``python -m torch.distributed.run ...``), on several nodes with ``torchrun --nnodes=N --rdzv_endpoint=host:port``
or with ``srun matkit train config.yaml`` (one task per GPU; set ``MASTER_ADDR``/``MASTER_PORT``, e.g. to the
first host of ``scontrol show hostnames $SLURM_JOB_NODELIST``). The environment decides:

* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM (when ``RANK`` is not set): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, with
  ``MASTER_ADDR`` (default: ``127.0.0.1`` if all tasks are on one node) and ``MASTER_PORT`` (default 29500).

Backend: ``nccl`` on CUDA, ``gloo`` on CPU.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("matkit.training")

__all__ = ["DistributedInfo", "detect_distributed", "init_distributed", "cleanup_distributed",
           "split_global_batch", "all_reduce_sum", "barrier", "broadcast_object"]


@dataclass
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"environment variable {key}={env[key]!r} is not an integer") from None


def detect_distributed(env: Optional[Mapping[str, str]] = None) -> DistributedInfo:
    """Read rank / world size / local rank from torchrun or SLURM variables (single process if neither)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistributedInfo(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"),
                               _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torchrun",
                               env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int_env(env, "SLURM_NTASKS") > 1:
        nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")) or 1)
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if nnodes == 1 else None)
        if addr is None:
            raise RuntimeError("SLURM multi-node launch: set MASTER_ADDR to the first node's host name, e.g. "
                               "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)")
        info = DistributedInfo(_int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS"),
                               _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0, "slurm",
                               addr, int(env.get("MASTER_PORT", "29500")))
    else:
        return DistributedInfo()
    if not (0 <= info.rank < info.world_size):
        raise RuntimeError(f"invalid distributed environment: rank {info.rank} with world size {info.world_size}")
    return info


def init_distributed(info: DistributedInfo, device: torch.device) -> None:
    """Initialise the default process group (no-op for a single process)."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if info.launcher == "slurm":  # torch's env:// rendezvous reads these
        os.environ.setdefault("MASTER_ADDR", str(info.master_addr))
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
        os.environ["LOCAL_RANK"] = str(info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size)


def cleanup_distributed(timeout_s: float = 60.0) -> bool:
    """Destroy the default process group, waiting at most ``timeout_s`` seconds; returns whether it finished.

    Call it once every rank has finished (the trainer meets all ranks at a barrier after its last checkpoint)
    and after freeing any DDP wrapper. Tearing a process group down can hang although every rank got there
    (pytorch/pytorch#75097); the gloo destructor/GIL deadlock of pytorch/pytorch#56297 is avoided by
    ``_COLLECTIVE_TENSORS`` and ``Trainer._free_ddp_wrapper``. For any other cause the teardown runs in a helper
    thread: after
    ``timeout_s`` the rank logs a warning, prints where the teardown is stuck and goes on, so a finished training
    exits instead of hanging its launcher. Should the teardown hold the interpreter lock while stuck, a watchdog
    prints every thread's stack after ``2 * timeout_s`` and exits with status 1.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return True
    worker = threading.Thread(target=dist.destroy_process_group, name="matkit-destroy-process-group", daemon=True)
    watchdog = _arm_watchdog(2 * timeout_s)
    try:
        worker.start()
        worker.join(timeout_s)
    finally:
        if watchdog:
            faulthandler.cancel_dump_traceback_later()
    if not worker.is_alive():
        _COLLECTIVE_TENSORS.clear()  # the process group and its worker threads are gone
        return True
    log.warning("the process-group teardown did not finish within %g s (an intermittent PyTorch problem, "
                "pytorch/pytorch#75097); this rank goes on without it. Where it is stuck:", timeout_s)
    _dump_stacks()
    return False


def _arm_watchdog(timeout_s: float) -> bool:
    """Print every thread's stack to the process's stderr and exit(1) after ``timeout_s`` unless cancelled."""
    try:
        faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.__stderr__)
        return True
    except (AttributeError, ValueError, OSError):  # no usable stderr file descriptor (e.g. pythonw)
        return False


def _dump_stacks() -> None:
    try:
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):
        pass


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# Tensors recently passed to collectives, kept referenced from Python until the process group is destroyed.
# A finished gloo collective is freed by a gloo worker thread while it holds the process group's work lock. If
# the caller has dropped the tensor by then, freeing it needs the GIL; should the main thread meanwhile hold the
# GIL while destroying the process group (which waits for that lock), both wait forever (pytorch/pytorch#56297).
# Kept alive here, the tensors are freed by Python later and the worker threads never need the GIL.
_COLLECTIVE_TENSORS: deque = deque(maxlen=256)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        _COLLECTIVE_TENSORS.append(tensor)
    return tensor


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to all ranks (no-op for one process)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def split_global_batch(indices: Sequence[int], sizes: Sequence[int], world_size: int) -> List[List[int]]:
    """Partition one global batch into ``world_size`` disjoint parts with balanced atom counts.

    ``indices``: dataset indices of the global batch; ``sizes``: atoms of each (same order). Structures are
    assigned largest first to the rank with the fewest atoms (ties: lowest rank); each part keeps the
    batch order. With fewer structures than ranks some parts are empty (the trainer then gives those
    ranks a masked padding structure so that every rank takes part in the gradient all-reduce).
    """
    order = sorted(range(len(indices)), key=lambda k: (-sizes[k], k))
    loads = [0] * world_size
    owner = [0] * len(indices)
    for k in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[k] = rank
        loads[rank] += sizes[k]
    return [[indices[k] for k in range(len(indices)) if owner[k] == r] for r in range(world_size)]
