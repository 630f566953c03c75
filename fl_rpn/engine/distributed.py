"""torch.distributed helpers: one process per GPU (or CPU process with gloo), launched by torchrun or SLURM.

Who started this process is read from the environment (``launched_by``), first match wins:

- torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (rendezvous through torchrun's own store, ``env://``);
- a SLURM job step (``srun``; Hydra's submitit launcher starts its tasks with ``srun`` too): ``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; rank 0 listens on the first host of the step
  (``scontrol show hostnames $SLURM_STEP_NODELIST``) on a port derived from the job and step ids, unless
  ``MASTER_ADDR`` / ``MASTER_PORT`` are set. A batch script itself (no ``srun``) is one process;
- submitit's local executor (``hydra/launcher=submitit_local``): ``SUBMITIT_LOCAL_*``, on 127.0.0.1.

Anything else is one process. Backend: NCCL when training on CUDA, gloo on CPU.
"""

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def cuda_index(self) -> int:
        """This rank's GPU: ``local_rank``, or 0 where SLURM binds one GPU to each task (it then sees only that one)."""
        return self.local_rank % max(torch.cuda.device_count(), 1)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):  # no scontrol here: parse the first group
        prefix, first_id = re.match(r"([^,\[]*)(?:\[([^,\]-]*))?", nodelist).groups()
        return prefix + (first_id or "")


def launched_by(env: Mapping[str, str] = os.environ) -> tuple[int, int, int, str]:
    """``(rank, world_size, local_rank, init_method)`` of this process, from its launcher's environment."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything exporting torch's variables)
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://"
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # srun, submitit on SLURM
        step = env.get("SLURM_STEP_ID", "0")
        step = int(step) if step.isdigit() else 0
        port = env.get("MASTER_PORT") or 20000 + (int(env["SLURM_JOB_ID"]) * 101 + step) % 40000
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        return rank, world_size, int(env.get("SLURM_LOCALID", 0)), f"tcp://{addr}:{port}"
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        port = env.get("MASTER_PORT") or 20000 + int(env["SUBMITIT_LOCAL_JOB_ID"]) % 40000
        rank, world_size = int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env["SUBMITIT_LOCAL_NTASKS"])
        return rank, world_size, int(env["SUBMITIT_LOCAL_LOCALID"]), f"tcp://127.0.0.1:{port}"
    return 0, 1, 0, "env://"


def init_distributed(device: str) -> DistInfo:
    """Join the process group of this process's launcher (see the module docstring); a no-op for one process."""
    rank, world_size, local_rank, init_method = launched_by()
    if world_size == 1:
        return DistInfo()
    info = DistInfo(rank, world_size, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.cuda_index)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return info


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flags: Sequence, info: DistInfo) -> list[bool]:
    """For each flag (bool or 0-d tensor), whether it is set on any rank; one small all_reduce.

    Decisions that change the control flow (skip a step, stop and checkpoint) must be taken by all ranks
    alike, or one rank waits forever in a collective the others skipped.
    """
    if not info.enabled:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], dtype=torch.float32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over ranks (for logging)."""
    if not info.enabled or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(values, (t / info.world_size).tolist()))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


SINGLE_PROCESS = DistInfo()
