"""Multi-process training with torch.distributed (launched by torchrun, or by SLURM through submitit): process-group
set-up, synchronised BatchNorm on any backend, and gathering of evaluation results.

Every rank draws the same sampler stream and takes an interleaved shard of it (``samplers.shard``); a global batch
of ``schedule.batch_size`` is split evenly across ranks; BatchNorm statistics are computed over the global batch;
only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """This process's place: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else, inside a submitit job of several
    SLURM tasks (hydra/launcher=submitit_slurm or slurm with tasks_per_node > 1), SLURM's SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID (what submitit.JobEnvironment reads); one process otherwise."""
    env = os.environ
    if "RANK" not in env and env.get("SUBMITIT_EXECUTOR") == "slurm" and int(env.get("SLURM_NTASKS", 1)) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def _init_method(info: DistInfo) -> str:
    """``env://`` under torchrun; in a SLURM job the first node of the job and a port drawn from the job id
    (submitit.helpers.TorchDistributedEnvironment: the same on every task; $MASTER_PORT overrides it)."""
    if "RANK" in os.environ:
        return "env://"
    from submitit.helpers import TorchDistributedEnvironment

    d = TorchDistributedEnvironment()
    return f"tcp://{d.master_addr}:{d.master_port}"


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group of torchrun or of a SLURM job (nccl on CUDA, gloo on CPU); each rank gets its own
    GPU."""
    info = from_env()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=_init_method(info), rank=info.rank, world_size=info.world_size)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across ranks, on any backend (PyTorch's
    SyncBatchNorm needs GPUs). Per-channel sums are all-reduced through an autograd-aware all_reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce  # autograd-aware

        c = x.shape[1]
        n_local = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), n_local])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its replacement has no autograd yet
            stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean  # biased, used to normalise
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch: PyTorch's SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def eval_shard(n: int, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous share of n evaluation items (every item on exactly one rank)."""
    bounds = torch.linspace(0, n, info.world_size + 1).round().long()
    return torch.arange(int(bounds[info.rank]), int(bounds[info.rank + 1]))


def gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order (shapes may differ in the first dimension)."""
    if not info.enabled:
        return t
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)
