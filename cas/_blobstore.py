"""The blob store: immutable files named by the blake3 digest of their bytes.

Layout: `<root>/blobs/<first two hex>/<digest>` for blobs and `<root>/tmp/` for
writes in flight. A blob becomes visible under its name only by an atomic rename
of a fully written and fsync'd temp file, so a crash leaves either nothing or a
complete blob. The price is one fsync per blob plus one per touched directory;
callers that write many blobs batch the directory fsyncs with `sync_dirs`.
Large blobs are written with O_DIRECT through a small reused aligned buffer,
which skips the page cache (and its cost on a VM) at the price of one memory
copy. Presence is judged by size, never by the mere existence of a file, so a
truncated blob is rewritten rather than trusted. Every write hashes the bytes
it hands the OS and refuses a mismatch with the name, so neither a wrong digest
nor a buffer changed mid-write is stored; the cost is one more hash pass, over
bytes still in cache (the small pieces are copied first, for the same reason).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cas._digest import Hasher, check_digest, hash_bytes, new_hasher
from cas._errors import (
    BlobStoreIOError,
    CorruptBlobError,
    DigestMismatchError,
    MissingBlobError,
    UnreadableBlobError,
)

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
_BLOB_MODE = 0o444
_DIRECT_MIN = 1 << 20  # smaller blobs are written through the page cache
_ALIGN = 4096  # O_DIRECT offset, length and address alignment
_STAGING = 4 << 20  # one aligned staging buffer per concurrent direct write
_STAGING_SLOTS = 4  # direct writes at once (fsyncs wait without a buffer)
_HOOK_SPAN = 1 << 30  # the "write" hook runs once per GiB written
_DIR_SYNC_THREADS = 8

Hook = Callable[[str, str], None]
"""Called as `hook(step, digest)` at each step of a blob write (fault injection)."""


@dataclass(frozen=True)
class BlobInfo:
    """One blob on disk: its digest, size in bytes and modification time."""

    digest: str
    size: int
    mtime: float


@dataclass(frozen=True)
class PutResult:
    """What `BlobStore.put` did: the blob's digest and size, and if it wrote it."""

    digest: str
    size: int
    written: bool


class BlobStore:
    """A content-addressed store of immutable blobs under one directory.

    Safe to use from several threads at once. Once it has written a large
    blob, it keeps up to 16 MiB of aligned staging buffers for direct I/O.

    Args:
        root: the store directory; `blobs/` and `tmp/` are created on first write.
        hook: optional callback run at each step of a write, for fault injection.
    """

    def __init__(self, root: str | os.PathLike[str], *, hook: Hook | None = None):
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.hook = hook
        self._lock = threading.Lock()
        self._staging: list[mmap.mmap] = []
        self._staging_slots = threading.BoundedSemaphore(_STAGING_SLOTS)
        self._direct_ok = True
        # Shards made by deferred puts, and how many of them an fsync of
        # blobs/ that started after their mkdir has covered.
        self._shards_made = 0
        self._shards_synced = 0

    def path_of(self, digest: str) -> Path:
        """The file a blob lives in (whether or not it exists)."""
        check_digest(digest)
        return self.blobs_dir / digest[:2] / digest

    def has_blob(
        self, digest: str, *, size: int | None = None, verify: bool = False
    ) -> bool:
        """True if the blob is present with the expected size (and hash if asked).

        A file of the wrong size, or one that fails verification, counts as absent.
        """
        path = self.path_of(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if size is not None and st.st_size != size:
            return False
        if verify:
            try:
                self.verify(digest)
            except CorruptBlobError:
                return False
        return True

    def size_of(self, digest: str) -> int:
        """The size of a blob in bytes; MissingBlobError if absent."""
        path = self.path_of(digest)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise MissingBlobError(digest, path) from None
        except OSError as exc:
            raise UnreadableBlobError(digest, path, exc) from exc

    def put(
        self,
        data: bytes | bytearray | memoryview,
        *,
        digest: str | None = None,
        sync_dir: bool = True,
    ) -> PutResult:
        """Store bytes durably and return their digest.

        `data` may be any bytes-like object (a tensor's memory through numpy is
        read in place, never copied). A caller that already hashed the bytes
        passes `digest` to skip hashing them before the write. A blob already
        present with the right size is not written again. With
        `sync_dir=False` the caller must call `sync_dirs` before relying on the
        blob surviving a crash. The bytes are hashed again as they are written,
        so a buffer changed meanwhile (or a wrong `digest`) is refused rather
        than stored under a false name.

        Raises:
            ValueError: `data` is not C-contiguous, or `digest` is malformed.
            DigestMismatchError: the bytes written do not hash to `digest`;
                nothing is stored.
            BlobStoreIOError: the OS refused a write, fsync or rename (ENOSPC,
                EROFS, ...); no file is left under the blob's name.
        """
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError(
                f"cannot store a non-contiguous buffer (shape {view.shape}, "
                f"strides {view.strides}): pass a C-contiguous copy, e.g. "
                "numpy.ascontiguousarray(x) or bytes(x)"
            )
        view = view.cast("B")
        if digest is None:
            digest = hash_bytes(view)
        else:
            check_digest(digest)
        size = view.nbytes
        if self.has_blob(digest, size=size):
            log.debug("blob %s already present (%d bytes)", digest, size)
            return PutResult(digest, size, written=False)
        self._write(digest, view, sync_dir=sync_dir)
        log.debug("blob %s written (%d bytes)", digest, size)
        return PutResult(digest, size, written=True)

    def _write(self, digest: str, view: memoryview, *, sync_dir: bool) -> None:
        final = self.path_of(digest)
        self._make_dirs(final.parent, defer_sync=not sync_dir)
        tmp = self.tmp_dir / (
            f"{digest[:16]}.{socket.gethostname()}.{os.getpid()}."
            f"{secrets.token_hex(4)}.tmp"
        )
        step = "create temp file"
        fd = -1
        try:
            fd = self._open_locked_tmp(tmp)
            self._step("tmp_open", digest)

            # 1. Write every byte, hashing each piece exactly as handed to the
            #    OS: the caller's buffer may change under us (a tensor updated
            #    by another thread), and what lands on disk is what must match
            #    the name. A large blob's aligned bulk skips the page cache.
            step = "write"
            hasher = new_hasher(view.nbytes)
            written = 0
            if view.nbytes >= _DIRECT_MIN and self._direct_ok:
                written = self._write_direct(fd, view, digest, hasher)
            self._write_buffered(fd, view, written, digest, hasher)

            # 2. Refuse bytes that do not hash to the name they would get.
            actual = hasher.hexdigest()
            if actual != digest:
                raise DigestMismatchError(digest, actual)

            # 3. Make the bytes durable before the name can point at them.
            step = "fsync"
            os.fchmod(fd, _BLOB_MODE)
            os.fsync(fd)
            self._step("fsync", digest)

            # 4. Publish atomically; this replaces a truncated or damaged copy.
            step = "rename"
            if final.is_dir() and not final.is_symlink():
                # A directory squatting on the name would fail every rename.
                self.quarantine(digest)
            os.replace(tmp, final)
            self._step("rename", digest)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise BlobStoreIOError(step, tmp, exc) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

        # 5. Make the rename itself durable.
        if sync_dir:
            self.sync_dirs([digest])

    def _write_buffered(
        self, fd: int, view: memoryview, start: int, digest: str, hasher: Hasher
    ) -> None:
        # Each piece is copied before it is hashed and written, so the hash is
        # of the very bytes the OS received. A large rest (no O_DIRECT here)
        # reuses a staging buffer, whose pages are already mapped.
        left = view.nbytes - start
        if not left:
            return
        staging = self._take_staging() if left >= _DIRECT_MIN else None
        buffer = memoryview(staging if staging is not None else bytearray(left))
        pos = start
        try:
            while pos < view.nbytes:
                size = min(_STAGING, view.nbytes - pos)
                piece = buffer[:size]
                piece[:] = view[pos : pos + size]
                hasher.update(piece)
                done = 0
                while done < size:
                    done += os.write(fd, piece[done:])
                self._wrote(digest, pos, pos + size, view.nbytes)
                pos += size
        finally:
            buffer.release()
            if staging is not None:
                self._give_staging(staging)

    def _write_direct(
        self, fd: int, view: memoryview, digest: str, hasher: Hasher
    ) -> int:
        """Write the block-aligned bulk of `view` with O_DIRECT; return the bytes
        written, 0 where the filesystem refuses direct I/O (the caller writes
        whatever is left through the page cache)."""
        bulk = view.nbytes - view.nbytes % _ALIGN
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
            self._direct_ok = False
            log.debug("no O_DIRECT under %s (%s): buffered writes", self.root, exc)
            return 0
        # Tensor memory is rarely 4 KiB aligned, so each piece is copied into
        # an aligned buffer first: one memory copy instead of the page cache's.
        staging = self._take_staging()
        stage = memoryview(staging)
        done = 0
        try:
            while done < bulk:
                size = min(_STAGING, bulk - done)
                stage[:size] = view[done : done + size]
                try:
                    n = os.write(fd, stage[:size])
                except OSError as exc:
                    if exc.errno != errno.EINVAL or done:
                        raise
                    self._direct_ok = False
                    log.debug("O_DIRECT refused under %s: buffered writes", self.root)
                    break
                # The staging buffer is ours alone: its bytes are the written ones.
                hasher.update(stage[:n])
                self._wrote(digest, done, done + n, view.nbytes)
                done += n
                if n != size:
                    break  # a short write: the buffered path carries on from here
        finally:
            stage.release()
            self._give_staging(staging)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        return done

    def _take_staging(self) -> mmap.mmap:
        # At most _STAGING_SLOTS buffers ever exist, however many threads put.
        self._staging_slots.acquire()
        with self._lock:
            if self._staging:
                return self._staging.pop()
        try:
            return mmap.mmap(-1, _STAGING)  # page aligned
        except BaseException:
            self._staging_slots.release()
            raise

    def _give_staging(self, staging: mmap.mmap) -> None:
        with self._lock:
            self._staging.append(staging)
        self._staging_slots.release()

    def _wrote(self, digest: str, before: int, after: int, total: int) -> None:
        if after // _HOOK_SPAN > before // _HOOK_SPAN or (
            after == total and after % _HOOK_SPAN
        ):
            self._step("write", digest)

    def _open_locked_tmp(self, tmp: Path) -> int:
        # The lock tells a concurrent sweep that this temp file is in flight; it
        # dies with the process, so a crashed writer's leftovers are fair game.
        # A sweep may unlink the file between open and lock: then start over.
        while True:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd
            os.close(fd)

    def sync_dirs(self, digests: Iterable[str]) -> None:
        """fsync the shard directories of these blobs (once per directory),
        and `blobs/` itself where a deferred put created a shard."""
        digests_list = list(digests)
        dirs = sorted({self.path_of(d).parent for d in digests_list})
        with self._lock:
            made = self._shards_made
            if made > self._shards_synced:
                dirs.append(self.blobs_dir)
        _fsync_dirs(dirs)
        with self._lock:
            self._shards_synced = max(self._shards_synced, made)
        for digest in digests_list:
            self._step("dir_fsync", digest)

    def _make_dirs(self, shard: Path, *, defer_sync: bool = False) -> None:
        try:
            for parent in (self.root, self.blobs_dir, self.tmp_dir):
                if not parent.is_dir():
                    parent.mkdir(exist_ok=True)
                    _fsync_dir(parent.parent)
            if not shard.is_dir():
                shard.mkdir(exist_ok=True)
                if defer_sync:
                    # The caller's sync_dirs makes the new shard durable.
                    with self._lock:
                        self._shards_made += 1
                else:
                    _fsync_dir(self.blobs_dir)
        except OSError as exc:
            raise BlobStoreIOError("create directory", shard, exc) from exc

    def _step(self, step: str, digest: str) -> None:
        if self.hook is not None:
            self.hook(step, digest)

    def get(self, digest: str, *, verify: bool = True) -> bytearray:
        """The bytes of a blob, hash-checked unless `verify=False`."""
        buffer = bytearray(self.size_of(digest))
        self.read_into(digest, buffer, verify=verify)
        return buffer

    def read_into(
        self,
        digest: str,
        out: bytearray | memoryview,
        *,
        verify: bool = True,
    ) -> None:
        """Fill `out` (exactly the blob's size) with its bytes, hashing as it reads.

        Each chunk is hashed right after it lands, while it is still in cache,
        so the bytes are touched once.

        Raises:
            MissingBlobError: no such blob.
            CorruptBlobError: wrong size, or the bytes do not hash to `digest`;
                UnreadableBlobError (a CorruptBlobError) when the OS refuses
                to read it.
        """
        view = memoryview(out).cast("B")
        path = self.path_of(digest)
        hasher = new_hasher(0)
        with _reading(digest, path):
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != view.nbytes:
                    raise CorruptBlobError(
                        digest, path, f"size {size} bytes, expected {view.nbytes}"
                    )
                pos = 0
                while pos < size:
                    n = f.readinto(view[pos : pos + _CHUNK])
                    if not n:
                        raise CorruptBlobError(digest, path, f"ends at byte {pos}")
                    if verify:
                        hasher.update(view[pos : pos + n])
                    pos += n
        if verify and hasher.hexdigest() != digest:
            raise CorruptBlobError(digest, path, "hash mismatch")

    def stream(self, digest: str, *, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Yield a blob in chunks; the last step raises CorruptBlobError on a
        hash mismatch, so a consumer must read to the end before trusting it."""
        path = self.path_of(digest)
        hasher = new_hasher(0)
        with _reading(digest, path), open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                hasher.update(chunk)
                yield chunk
        if hasher.hexdigest() != digest:
            raise CorruptBlobError(digest, path, "hash mismatch")

    def verify(self, digest: str) -> None:
        """Raise MissingBlobError or CorruptBlobError unless the blob is sound."""
        for _ in self.stream(digest):
            pass

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob file on disk, in no particular order.

        Files whose names are not digests (strays) are skipped.
        """
        if not self.blobs_dir.is_dir():
            return
        with os.scandir(self.blobs_dir) as shards:
            for shard in shards:
                if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        name = entry.name
                        if len(name) != 64 or not name.startswith(shard.name):
                            continue
                        try:
                            check_digest(name)
                            st = entry.stat(follow_symlinks=False)
                        except (ValueError, FileNotFoundError):
                            continue
                        yield BlobInfo(name, st.st_size, st.st_mtime)

    def verify_all(
        self, progress: Callable[[int, int], None] | None = None
    ) -> list[CorruptBlobError]:
        """Hash-check every blob; return the problems found.

        `progress(done, total)` is called after each blob.
        """
        blobs = list(self.iter_blobs())
        problems: list[CorruptBlobError] = []
        for i, info in enumerate(blobs, 1):
            try:
                self.verify(info.digest)
            except CorruptBlobError as exc:
                problems.append(exc)
            except MissingBlobError:
                pass  # removed between listing and reading: nothing to judge
            if progress is not None:
                progress(i, len(blobs))
        return problems

    def delete(self, digest: str) -> int:
        """Remove a blob; return the bytes freed (0 if it was absent)."""
        path = self.path_of(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def quarantine(self, digest: str) -> Path | None:
        """Move a damaged blob out of `blobs/` into `quarantine/`, keeping it.

        Presence is judged by size, so a damaged blob of the right size would
        otherwise be trusted by the next save of the same bytes; once it is
        moved, that save writes it anew. Whatever sits at the blob's name (a
        file or a directory) is moved. Returns where it went, or None if
        nothing was there.

        Raises:
            OSError: the move failed (a read-only store, for one).
        """
        src = self.path_of(digest)
        dest_dir = self.root / "quarantine"
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{digest}.{time.time_ns()}"
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            return None
        _fsync_dir(src.parent)
        _fsync_dir(dest_dir)
        log.warning("blob %s was damaged and is kept at %s", digest, dest)
        return dest

    def sweep_tmp(self, *, older_than: float = 0.0) -> tuple[int, int]:
        """Remove temp files left by dead writers; return (files, bytes).

        A file whose writer is alive holds a lock on it and is kept, whatever
        its age. `older_than` (seconds) spares files that are too young.
        """
        if not self.tmp_dir.is_dir():
            return 0, 0
        now = time.time()
        count = freed = 0
        with os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                size = self._sweep_one(entry.path, now - older_than)
                if size is not None:
                    count += 1
                    freed += size
        return count, freed

    def _sweep_one(self, path: str, cutoff: float) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # a live writer holds it
            st = os.fstat(fd)
            if st.st_mtime > cutoff:
                return None
            # Unlinked while we hold the lock, so a writer that locks it after
            # us sees st_nlink == 0 and starts over with a new temp file.
            os.unlink(path)
            return st.st_size
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)


@contextmanager
def _reading(digest: str, path: Path) -> Iterator[None]:
    # Every OS error while reading a blob names the blob; a missing file is the
    # one failure readers tell apart from damage.
    try:
        yield
    except FileNotFoundError:
        raise MissingBlobError(digest, path) from None
    except OSError as exc:
        raise UnreadableBlobError(digest, path, exc) from exc


def _fsync_dirs(paths: list[Path]) -> None:
    # Concurrent fsyncs share journal commits and device flushes.
    def sync(path: Path) -> None:
        try:
            _fsync_dir(path)
        except OSError as exc:
            raise BlobStoreIOError("fsync directory", path, exc) from exc

    if len(paths) < 2:
        for path in paths:
            sync(path)
        return
    with ThreadPoolExecutor(min(_DIR_SYNC_THREADS, len(paths))) as pool:
        futures = []
        for path in paths:
            try:
                futures.append(pool.submit(sync, path))
            except RuntimeError:  # the interpreter is exiting: pools take no work
                sync(path)
        for future in futures:
            future.result()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; the rename is still atomic.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
