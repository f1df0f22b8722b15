"""One writer per run: an `flock` on `<store>/locks/<blake3 of the run id>.lock`.

The ledger's lock serialises transactions, but cannot stop two trainings from
interleaving the saves of one run. A Run handle takes its run's lock on its
first write and keeps it until its Store is closed; handles of one run in one
process share it (flock belongs to an open file, so the process keeps a single
one), and the kernel drops it when the process dies. The cost: a process that
leaves a Store open keeps its runs until it exits.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from ledger._errors import LedgerStateError


class RunLockedError(LedgerStateError):
    """Another process is writing to the run."""

    def __init__(self, run: str, holder: str, path: Path) -> None:
        self.run = run
        self.holder = holder
        super().__init__(
            f"run {run!r} is being written by another process ({holder}); one "
            f"writer per run: stop it, or open another run (lock {path})"
        )


@dataclass
class _Held:
    fd: int
    owners: set[int] = field(default_factory=set)


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def lock_path(store: Path, run: str) -> Path:
    """Where the writer lock of `run` lives."""
    return store / "locks" / f"{blake3.blake3(run.encode()).hexdigest()[:32]}.lock"


def claim(store: Path, run: str, owner: object) -> None:
    """Make this process the writer of `run` on behalf of `owner` (a Store).

    Raises:
        RunLockedError: another process holds the run.
        LedgerStateError: the lock file cannot be created.
    """
    path = lock_path(store, run).absolute()
    with _guard:
        held = _held.get(path)
        if held is not None:
            held.owners.add(id(owner))
            return
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerStateError(
                f"cannot create the writer lock {path} of run {run!r}: "
                f"{exc.strerror}; check that the store is writable"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunLockedError(run, holder or "unknown holder", path) from None

        # Say who holds it, for the error another process will show.
        me = f"host {socket.gethostname()}, pid {os.getpid()}".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        _held[path] = _Held(fd, {id(owner)})


def release(owner: object) -> None:
    """Drop `owner`'s claims; a run's lock goes when its last owner does."""
    with _guard:
        for path, held in list(_held.items()):
            held.owners.discard(id(owner))
            if not held.owners:
                os.close(held.fd)
                del _held[path]
