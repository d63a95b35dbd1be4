"""Data-parallel training under torchrun: one process per device, gradients averaged over processes.

`hemaseg train` needs no flag for it; it runs as it is under

    torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] \
        -m hemaseg.cli train DATA --out RUN ...

torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) is read here, in
`from_environment`, and nowhere else: it is the launcher's interface, as argv is the CLI's. Without it
(or with WORLD_SIZE=1) a run is a plain single process, bit for bit what it was before this module.

What a distributed run means (train.fit uses this module for each point):
- `batch_size` is per process, as a per-GPU setting usually is: the global batch is world_size x
  batch_size. The epoch's order is the single-process order (seeded by seed and epoch), dealt out so
  that the processes' step-k batches together are the single-process step-k batch of the global batch
  size. So N processes at batch b train the model one process trains at batch N x b, up to float
  rounding, when BatchNorm is synchronised (`sync_batchnorm`; otherwise each process normalises with
  its own batch's statistics, as DDP does by default). A resume needs the same world size.
- The loss is the global batch's: Dice's tp/fp/fn are summed over processes before the Dice is taken
  (a mean of per-process Dice losses would be another loss); the pointwise term is weighted by each
  process's share of the images.
- Validation scores each image once, on one process, and the epoch's Dice is the mean over all images
  (per-image values gathered, never a mean of per-process means).
- Rank 0 alone reads the resume state and writes every file and log line; the others are sent what
  they need. A time budget is decided on rank 0's clock and broadcast, so every process plans the
  same epochs.
- Failures: steps that can fail on one process only (the run folder, the data) are `agreed`: every
  process learns of the failure and raises, none is left waiting. A process that dies elsewhere is
  noticed by torchrun, which stops the others; a process that hangs is ended by the collective timeout
  (`timeout_s`, default 10 min; env HEMASEG_DIST_TIMEOUT_S), after which the job fails with an error.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # longer than any one-process step between collectives (rank 0's checkpoint write)
# Jobs whose processes only meet at the start and the end (predict's shards, cv's folds) wait there for
# the slowest: a fold trains for hours. They get this timeout instead (env HEMASEG_DIST_WAIT_S); a process
# that crashes meanwhile is still noticed by torchrun, which stops the others.
DEFAULT_WAIT_S = 7 * 24 * 3600.0


def wait_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """The collective timeout of a job whose processes work apart between its start and its end."""
    env = os.environ if environ is None else environ
    return float(env.get("HEMASEG_DIST_WAIT_S", DEFAULT_WAIT_S))


class RankFailedError(ValueError):
    """Another process of the job failed; raised on the processes that did not, so that all stop together.
    A ValueError, as the error it stands for usually is (a run folder or data refused on rank 0)."""


@dataclass
class Distributed:
    """This process's place in the job and the collectives train.fit uses. The default, world_size 1,
    is a plain single process: every method is then a no-op that returns its input."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" (CPU) or "nccl" (CUDA) once a process group exists
    owns_group: bool = field(default=False, repr=False)  # this object created the group and closes it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else \
            torch.device("cpu")

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on: CUDA means cuda:LOCAL_RANK (modulo the GPUs it can see, for
        launchers that give each process one visible GPU); anything else is kept."""
        if not self.active or device.type != "cuda":
            return device
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (pickled; tensors in it arrive on the CPU)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every process's `obj`, in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, value: float) -> float:
        """The sum of a number over processes (float64)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    @contextmanager
    def agreed(self, what: str) -> Iterator[None]:
        """Run a block that can fail on some processes only (rank 0 checking the run folder, a process
        that cannot read the data) and end it on all together: when one fails, it raises its own error and
        the others raise RankFailedError naming it, instead of waiting for it in the next collective.
        The block itself must hold no collectives (a failed process would skip them)."""
        if not self.active:
            yield
            return
        try:
            yield
        except Exception as e:  # tell the others, then fail with this process's own error
            self.all_gather(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        # (a KeyboardInterrupt skips the exchange: every process gets the signal, and none should wait)
        failures = self.all_gather(None)
        first = next(((r, f) for r, f in enumerate(failures) if f is not None), None)
        if first is not None:
            raise RankFailedError(f"{what} failed on rank {first[0]} of {self.world_size}: {first[1]}")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as it trains: DistributedDataParallel (gradients averaged over processes in buckets,
        overlapped with the backward pass), or the model itself in a single process."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        """Leave the process group if this object created it (a caller's own group is left to it)."""
        if self.owns_group and dist.is_initialized():
            # all processes reach the end before any tears its connections down: a process whose peers
            # had already gone once aborted at exit ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


SINGLE = Distributed()


def from_environment(device: torch.device, environ: Mapping[str, str] | None = None,
                     timeout_s: float | None = None) -> Distributed:
    """Join the job torchrun started this process in (WORLD_SIZE > 1), or a single process otherwise.
    Joins the process group already set up if there is one; else creates it, with NCCL for a CUDA
    `device` and gloo for the CPU, and a timeout on every collective (`timeout_s`, else env
    HEMASEG_DIST_TIMEOUT_S, else 10 min) so a process that hangs ends the job instead of holding it."""
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    try:
        rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    except KeyError:
        raise ValueError("WORLD_SIZE is set but RANK is not: start distributed training with torchrun "
                         "(torchrun --nproc-per-node N -m hemaseg.cli train ...)") from None
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not "
                             f"the one the environment names (RANK {rank} of WORLD_SIZE {world_size})")
        return Distributed(rank, world_size, local_rank, dist.get_backend())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if timeout_s is None:
        timeout_s = float(env.get("HEMASEG_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    log.debug("rank %d of %d joined (%s, timeout %.0f s)", rank, world_size, backend, timeout_s)
    return Distributed(rank, world_size, local_rank, backend, owns_group=True)


@contextmanager
def session(device: torch.device, environ: Mapping[str, str] | None = None,
            timeout_s: float | None = None) -> Iterator[Distributed]:
    """`from_environment` for the length of a block; a group it created is closed when the block ends
    normally (after an error the process is on its way out, and closing could wait for the others)."""
    ctx = from_environment(device, environ, timeout_s)
    yield ctx
    ctx.close()


# --- differentiable collectives and synchronised BatchNorm -------------------------------------------


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """y = sum over processes of x, on every process. Its adjoint is the same sum: each process's x feeds
    every process's y, so x's gradient is the sum of every process's gradient for y."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the processes of the job, with gradients flowing back to every process's `x`;
    `x` itself outside a process group."""
    if _group_size() == 1:
        return x
    return _AllReduceSum.apply(x)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the global batch (all processes' batches as one)
    while training in a process group, on any device and backend (torch's SyncBatchNorm runs on GPUs
    only). Each process's count, mean and centred sum of squares per channel are combined exactly
    (Chan's parallel variance), in one all-reduce forward and one backward. In eval mode, and outside a
    process group, it is BatchNorm2d; being one, it keeps state dicts, checkpoints and Conv+BN folding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        if not self.training or _group_size() == 1:
            return super().forward(x)
        world, rank = dist.get_world_size(), dist.get_rank()
        xf = x.float()  # statistics in fp32 under bf16 autocast too
        n = x.shape[0] * x.shape[2] * x.shape[3]
        var_r, mean_r = torch.var_mean(xf, dim=(0, 2, 3), correction=0)  # (C,) each
        row = torch.cat([xf.new_tensor([float(n)]), mean_r, var_r * n])  # (1 + 2C,)
        rows = xf.new_zeros(world, row.shape[0]).index_copy(0, torch.tensor([rank], device=x.device),
                                                            row[None])
        rows = all_reduce_sum(rows)  # (world, 1 + 2C): an all-gather with gradients
        counts, means, m2s = rows[:, :1], rows[:, 1:1 + self.num_features], rows[:, 1 + self.num_features:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - mean) ** 2).sum(0) / total  # biased, as BatchNorm normalises with
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * (total / (total - 1)) if total > 1 else var
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm2d of `model` a SyncBatchNorm2d, in place (the same parameters and buffers,
    so an optimizer or checkpoint made before still fits). Returns how many were converted."""
    n = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
            n += 1
    return n


def local_device(device: torch.device, environ: Mapping[str, str] | None = None) -> torch.device:
    """The device a process of a torchrun job works on before it joins the group (a predictor that loads
    first): CUDA means cuda:LOCAL_RANK, as `Distributed.device`; outside torchrun `device` itself."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return device
    return Distributed(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))).device(device)


def shard(n: int, rank: int, world_size: int) -> range:
    """The items of n this process takes when items are dealt out in turn: rank, rank + world, ..."""
    return range(rank, n, world_size)
