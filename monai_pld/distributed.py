"""Running under ``torchrun``: the process group, which share of the work a rank does, and the collectives.

A bundle started as ``torchrun --nproc_per_node N -m monai.bundle run ...`` gets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and the rendezvous address from ``torchrun``; :func:`init_distributed` (the first step of every
bundle's ``initialize``) joins the group with ``nccl`` on GPUs and ``gloo`` on CPUs. Without those variables nothing
happens and every helper here behaves as for one process (rank 0 of 1), so single-process runs are unchanged.

PyTorch's ``torch.distributed`` does the communication and ignite's ``idist`` (which MONAI's handlers and ignite's
``Checkpoint`` consult to write on rank 0 only) is synchronised with the group. What is written here is only the
project's policy: which classes, experts or classifiers a rank takes, and one flat all-reduce of the gradients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_parameters",
    "gather",
    "init_distributed",
    "is_main",
    "mean_over_ranks",
    "rank",
    "rank_device",
    "rank_note",
    "shard",
    "shutdown",
    "world_size",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# a rank that waits longer than this for the others (e.g. while rank 0 runs a periodic evaluation) gives up
_TIMEOUT = timedelta(minutes=int(os.environ.get("MONAI_PLD_DIST_TIMEOUT_MIN", "60")))


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: str | torch.device | None = "auto") -> torch.device:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1), and return this rank's device.

    The backend is ``nccl`` when the run uses CUDA and ``gloo`` otherwise; a CUDA rank takes ``cuda:LOCAL_RANK``.
    Calling it again (every bundle file calls it) returns the same device.

    Args:
        device: the run's ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:i``).

    Returns:
        The device this process computes on.

    Raises:
        ValueError: for CUDA asked for without CUDA, or fewer GPUs on the node than ranks.
    """
    want = str(device if device is not None else "auto").lower()
    cuda = torch.cuda.is_available() and want in ("auto", "cuda") or want.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"'device' is {device!r} but CUDA is not available here; use --device cpu (or auto)")
    if _env_world_size() > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            if local >= torch.cuda.device_count():
                raise ValueError(
                    f"rank with LOCAL_RANK {local} has no GPU (this node has {torch.cuda.device_count()}): start at "
                    "most one process per GPU (--nproc_per_node), or use --device cpu"
                )
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_TIMEOUT)
        idist.sync()
        logger.info(f"rank {dist.get_rank()} of {dist.get_world_size()} joined ({dist.get_backend()})")
    return rank_device(torch.device(want if want.startswith("cuda:") else "cuda") if cuda else torch.device("cpu"))


def rank_device(device: torch.device) -> torch.device:
    """``device`` as this rank uses it: a CUDA device without an index is the rank's own GPU (``cuda:LOCAL_RANK``)
    under several ranks, and ``cuda:0`` otherwise; any other device is returned as it is."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0)


def shutdown() -> None:
    """Leave the process group (the last step of a bundle); nothing for a single process."""
    if dist.is_initialized():
        dist.destroy_process_group()
        idist.sync()


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes outputs, checkpoints and MLflow (rank 0)."""
    return rank() == 0


def rank_note() -> str:
    """``"rank r of N: "`` under several ranks, ``""`` otherwise (a prefix for messages)."""
    return f"rank {rank()} of {world_size()}: " if world_size() > 1 else ""


def shard(items: Sequence[T], of_rank: int | None = None, ranks: int | None = None) -> list[T]:
    """The items this rank takes: every ``world_size()``-th one, starting at its rank (round robin, so that classes
    or classifiers of different cost are mixed)."""
    r = rank() if of_rank is None else of_rank
    n = world_size() if ranks is None else ranks
    return list(items[r::n])


def barrier() -> None:
    """Wait for every rank (nothing for a single process)."""
    if world_size() > 1:
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for a single process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(tensors: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values into every rank's tensors (parameters and buffers), in place."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of ``tensor`` (a new tensor, no gradient); ``tensor`` itself for one process."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def all_reduce_gradients(params: Sequence[torch.Tensor], values: Sequence[float | torch.Tensor] = ()) -> list[float]:
    """Sum the gradients of ``params`` and the scalars ``values`` over the ranks, in one flat all-reduce.

    A parameter without a gradient on one rank counts as zero there; one without a gradient on every rank keeps
    ``grad = None`` (so an optimiser skips it exactly as in a single process).

    Args:
        params: the trained tensors, in the same order on every rank.
        values: scalars to sum alongside (e.g. the per-rank loss terms, for logging).

    Returns:
        The summed ``values`` (the inputs themselves for a single process).
    """
    if world_size() == 1:
        return [float(v) for v in values]
    device = params[0].device if params else torch.device("cpu")
    parts, flags = [], []
    for p in params:
        flags.append(float(p.grad is not None))
        parts.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float())
    extra = torch.tensor([*flags, *(float(v) for v in values)], device=device)
    flat = torch.cat([*parts, extra])
    dist.all_reduce(flat)
    offset = 0
    for p, part in zip(params, parts, strict=True):
        n = part.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    seen = flat[offset : offset + len(params)]
    for p, s in zip(params, seen.tolist(), strict=True):
        if s == 0:
            p.grad = None
    return flat[offset + len(params) :].tolist()


def mean_over_ranks(values: Sequence[float], device: str | torch.device = "cpu") -> list[float]:
    """The mean over the ranks of each of ``values`` (e.g. per-rank losses, for logging); ``values`` for one process.
    ``device`` must be one the backend communicates from (the rank's GPU under nccl)."""
    if world_size() == 1:
        return [float(v) for v in values]
    flat = torch.tensor([float(v) for v in values], device=device, dtype=torch.float64)
    dist.all_reduce(flat)
    return (flat / world_size()).tolist()
