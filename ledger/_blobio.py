"""A save's blobs on the wire: written and read on a few threads at once.

Writes overlap because a blob's cost is mostly waiting (on the disk's
bandwidth for large blobs, on fsync latency for small ones), and blake3 and
file I/O release the GIL. Reads hash each chunk as it lands, into memory that
torch allocates and nobody zero-fills first, so each byte of a loaded tensor is
written once; the cost is a dependency on torch's allocator here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from cas import BlobStore

if TYPE_CHECKING:
    from ledger._codec import TensorRef

_WRITERS = 8  # large blobs: fsyncs and extending writes wait on the journal
_SMALL_WRITERS = 16  # small blobs: bound by fsync latency, which threads share
_SMALL = 1 << 20
_READERS = 2  # each reads and hashes one blob; page faults and hashing overlap
_UNFILLED_MIN = 64 << 10  # below it, zero-filling costs less than a tensor

Buffer = bytearray | np.ndarray
T = TypeVar("T")


def submit(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> Future[T]:
    """`pool.submit`, or `fn` run on this thread when the interpreter is exiting
    (a save from an atexit hook): pools then refuse new work."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed back through the future
            future.set_exception(exc)
        return future


def write_blobs(blobs: BlobStore, items: list[tuple[str, memoryview | bytes]]) -> int:
    """Put each (digest, bytes) without syncing directories; the bytes written.

    The digests are known, so threads only overlap writes and fsyncs. Large
    blobs share the disk's bandwidth among a few threads, largest first; small
    ones, whose cost is the fsync, go many at a time so that the filesystem
    commits their fsyncs together. With a fault-injection hook the blobs go
    one by one, in order, as its user expects.
    """

    def put(item: tuple[str, memoryview | bytes]) -> int:
        digest, data = item
        result = blobs.put(data, digest=digest, sync_dir=False)
        return result.size if result.written else 0

    if blobs.hook is not None:
        return sum(put(item) for item in items)
    # Only blobs missing now go to the threads (put checks again, as it must).
    sized = []
    for digest, data in items:
        size = memoryview(data).nbytes
        if not blobs.has_blob(digest, size=size):
            sized.append((size, (digest, data)))
    sized.sort(key=lambda pair: -pair[0])
    if len(sized) < 2:
        return sum(put(item) for _, item in sized)
    with (
        ThreadPoolExecutor(_WRITERS, thread_name_prefix="ckpt-write") as large,
        ThreadPoolExecutor(_SMALL_WRITERS, thread_name_prefix="ckpt-write") as small,
    ):
        futures = [
            submit(large if size >= _SMALL else small, put, item)
            for size, item in sized
        ]
        try:
            return sum(f.result() for f in futures)
        except BaseException:
            # Let the writes in flight finish (their temp files are removed on
            # failure) and start no more.
            for f in futures:
                f.cancel()
            raise


class BlobReader:
    """Reads a save's blobs on a few threads, ahead of `build`, which asks for
    them in manifest order. Each (digest, tie) is read once and handed out
    once; a further request for it (refused as a tie by `build`) reads again."""

    def __init__(self, blobs: BlobStore, refs: list[TensorRef]) -> None:
        self.blobs = blobs
        self.pool = ThreadPoolExecutor(_READERS, thread_name_prefix="ckpt-read")
        self.ahead: dict[tuple[str, int], Future[Buffer]] = {}
        for ref in refs:
            key = _read_key(ref)
            if key not in self.ahead:
                self.ahead[key] = submit(self.pool, self._read, ref)

    def _read(self, ref: TensorRef) -> Buffer:
        buf = tensor_buffer(ref.nbytes)
        with memoryview(buf) as view:  # type: ignore[arg-type]  # numpy is a Buffer
            self.blobs.read_into(ref.digest, view)
        return buf

    def read(self, ref: TensorRef) -> Buffer:
        future = self.ahead.pop(_read_key(ref), None)
        return self._read(ref) if future is None else future.result()

    def close(self) -> None:
        for future in self.ahead.values():
            future.cancel()
        self.pool.shutdown(wait=True)


def tensor_buffer(nbytes: int) -> Buffer:
    """Writable memory for a tensor of `nbytes`, not yet written.

    A large one is the memory of a new uint8 tensor, never zero-filled (a
    `bytearray` is: one more pass over every page, and on a VM the first touch
    of a page is the expensive part). A tensor or array made on it keeps it
    alive.
    """
    if nbytes < _UNFILLED_MIN:
        return bytearray(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8).numpy()


def _read_key(ref: TensorRef) -> tuple[str, int]:
    return ref.digest, ref.tie if ref.tie is not None else -id(ref)
