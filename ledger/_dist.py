"""The rank-0 writer: under torch.distributed only rank 0 touches the ledger.

Collective calls share one small int64 tensor: rank 0 does the work, then
broadcasts the sequence number it committed (or -1 on failure); the broadcast
is the barrier that keeps every other rank from returning before the commit.
No Python object is pickled across ranks. torch is looked up, never imported,
to tell whether a process group is up: a reader of the ledger that never
imported torch cannot be in one, and is spared its second-long import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from ledger._errors import DistributedSaveError

T = TypeVar("T")

_FAILED = -1
_NONE = -2

_alone: ContextVar[bool] = ContextVar("ledger_rank_alone", default=False)


def is_distributed() -> bool:
    """True when a torch.distributed process group is up."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if not is_distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def is_writer() -> bool:
    """True if this process may append to the ledger (global rank 0)."""
    return rank() == 0


@contextmanager
def rank_alone() -> Iterator[None]:
    """Run ledger calls inside on this rank alone, with no collective.

    For frameworks that call their checkpoint hooks on rank 0 only and hold
    the other ranks at a barrier of their own (Lightning's CheckpointIO): a
    collective there would wait forever for ranks that never join it.
    """
    token = _alone.set(True)
    try:
        yield
    finally:
        _alone.reset(token)


def agree_on_seq(work: Callable[[], int | None], what: str) -> int | None:
    """Run `work` on rank 0 and give every rank the sequence number it returned.

    Without a process group this is just `work()`. With one, rank 0's
    exception is re-raised there, and the other ranks raise
    DistributedSaveError instead of waiting forever.
    """
    if not is_distributed() or _alone.get():
        return work()
    import torch
    import torch.distributed as dist

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    box = torch.tensor([_FAILED], dtype=torch.int64, device=device)
    error: BaseException | None = None
    if is_writer():
        try:
            seq = work()
            box.fill_(_NONE if seq is None else seq)
        except BaseException as exc:  # noqa: BLE001 - re-raised after the broadcast
            error = exc
    dist.broadcast(box, src=0)
    if error is not None:
        raise error
    value = int(box.item())
    if value == _FAILED:
        raise DistributedSaveError(
            f"rank 0 failed to {what}; see rank 0's error for the cause"
        )
    return None if value == _NONE else value
