"""Garbage collection and verification of a whole store.

Runs share blobs, so both work over every run's references at once. gc marks
every digest an unexpired save or an unexpired lease needs, then sweeps the
rest, all under the ledger's write lock: no save can commit mid-sweep, and a
save in flight is protected by its lease. The cost is that saves wait while a
large sweep runs.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cas import CorruptBlobError, MissingBlobError
from ledger._errors import ManifestError
from ledger._schema import LedgerReadError, explain

if TYPE_CHECKING:
    from ledger._codec import TensorRef
    from ledger._store import Store

log = logging.getLogger(__name__)

_LIVE_REFS = """
SELECT r.digest AS digest, r.size AS size, r.seq AS seq, e.run AS run
FROM refs r JOIN events e ON e.seq = r.seq
WHERE e.kind = 'save'
  AND r.seq NOT IN (
    SELECT target FROM events WHERE kind = 'expire' AND target IS NOT NULL)
"""

_LIVE_SAVES = """
SELECT seq, run, manifest FROM events
WHERE kind = 'save' AND seq NOT IN (
    SELECT target FROM events WHERE kind = 'expire' AND target IS NOT NULL)
"""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the store, tied to the event that suffers from it."""

    seq: int | None
    run: str | None
    digest: str | None
    message: str

    def __str__(self) -> str:
        where = f"event #{self.seq}" if self.seq is not None else "store"
        where += f" ({self.run})" if self.run else ""
        blob = f" blob {self.digest}" if self.digest else ""
        return f"{where}:{blob} {self.message}"


@dataclass
class GcReport:
    """What a gc did (or, with dry_run, would do)."""

    blobs_removed: int = 0
    bytes_freed: int = 0
    tmp_removed: int = 0
    tmp_bytes: int = 0
    kept_young: int = 0
    live_blobs: int = 0
    leased_blobs: int = 0
    dry_run: bool = False
    missing: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


def collect(store: Store, *, grace: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove blobs no unexpired save or lease needs, older than `grace` seconds,
    and temp files of dead writers.

    Refuses to delete anything when a referenced blob is missing or has the
    wrong size (the report lists them): the store needs repair first.
    """
    if grace < 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace}")
    try:
        return _collect(store, grace, dry_run)
    except (sqlite3.DatabaseError, LedgerReadError) as exc:
        # Every query runs before the first deletion, so nothing was deleted.
        return GcReport(dry_run=dry_run, missing=[damaged_ledger(store, exc)])


def damaged_ledger(
    store: Store, exc: sqlite3.DatabaseError | LedgerReadError
) -> Problem:
    """The Problem that a ledger.db SQLite cannot read stands for."""
    cause = exc.__cause__ if isinstance(exc, LedgerReadError) else exc
    reason = (
        explain(cause, store.db.path)
        if isinstance(cause, sqlite3.DatabaseError)
        else str(exc)
    )
    return Problem(
        None,
        None,
        None,
        f"{store.db.path} cannot be read ({reason}); gc deletes nothing until it "
        "is repaired",
    )


def _collect(store: Store, grace: float, dry_run: bool) -> GcReport:
    report = GcReport(dry_run=dry_run)
    # A dry run reads a snapshot and takes no lock, so it works on a read-only
    # store and beside a writer.
    with store.db.read() if dry_run else store.db.write() as db:
        now = time.time()

        # 1. Mark: digests of unexpired saves, and of leases still running.
        if not dry_run:
            db.execute("DELETE FROM leases WHERE expires <= ?", [now])
        live: dict[str, int] = {}
        needed_by: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for row in db.query(_LIVE_REFS):
            live[row["digest"]] = row["size"]
            needed_by[row["digest"]].append((row["seq"], row["run"]))
        leased = {
            row["digest"]
            for row in db.query("SELECT digest FROM leases WHERE expires > ?", [now])
        }
        report.live_blobs = len(live)
        report.leased_blobs = len(leased - set(live))

        # 2. Refuse to sweep a store that already lost referenced blobs.
        on_disk = {info.digest: info for info in store.blobs.iter_blobs()}
        for digest, size in live.items():
            info = on_disk.get(digest)
            if info is None or info.size != size:
                reason = (
                    "missing"
                    if info is None
                    else (f"has {info.size} bytes, expected {size}")
                )
                for seq, run in needed_by[digest]:
                    report.missing.append(Problem(seq, run, digest, reason))
        if report.missing:
            log.warning("gc refused: %d referenced blobs missing", len(report.missing))
            return report

        # 3. Sweep blobs nobody needs, once they are older than the grace.
        for digest, info in on_disk.items():
            if digest in live or digest in leased:
                continue
            if now - info.mtime < grace:
                report.kept_young += 1
                continue
            report.blobs_removed += 1
            report.bytes_freed += info.size
            if not dry_run:
                store.blobs.delete(digest)

        # 4. Temp files of dead writers (live writers hold a lock on theirs).
        if not dry_run:
            report.tmp_removed, report.tmp_bytes = store.blobs.sweep_tmp()
    log.info(
        "gc %s: %d blobs (%d bytes) and %d temp files removed",
        "dry run" if dry_run else "finished",
        report.blobs_removed,
        report.bytes_freed,
        report.tmp_removed,
    )
    return report


def verify(
    store: Store,
    *,
    run: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Problem]:
    """Check every blob an unexpired save needs.

    What a save needs is read from its manifest, whose digest the hash chain
    covers, as well as from the refs table: every blob must be present, have
    the size the manifest gives and hash to its name; every manifest must
    decode; and the refs table must list each blob, since gc keeps only what
    it lists. One Problem per (save, blob), in sequence order.
    `progress(done, total)` is called after each distinct blob.
    """
    where, params = (" AND run = ?", [run]) if run else ("", [])
    saves = store.db.rows(_LIVE_SAVES + where + " ORDER BY seq", params)
    listed: dict[int, dict[str, int]] = defaultdict(dict)
    for row in store.db.rows(
        _LIVE_REFS + (" AND e.run = ?" if run else ""), [run] if run else []
    ):
        listed[row["seq"]][row["digest"]] = row["size"]
    known = {s["manifest"] for s in saves} | {d for ds in listed.values() for d in ds}
    blobs = _BlobCheck(store, len(known), progress)
    problems: list[Problem] = []
    for save in saves:
        seq, run_name, manifest = save["seq"], save["run"], save["manifest"]
        refs, reason = blobs.manifest(manifest)
        needed = {manifest: None} | {ref.digest: ref.nbytes for ref in refs}
        needed |= {d: needed.get(d) for d in listed[seq]}
        for digest, nbytes in needed.items():
            reason = blobs.blob(digest, nbytes) if digest != manifest else reason
            if reason is not None:
                problems.append(
                    Problem(
                        seq,
                        run_name,
                        digest,
                        f"{reason}: restore it or expire the save",
                    )
                )
            size = blobs.expected_size(digest, nbytes)
            if digest in listed[seq] and size is not None:
                if listed[seq][digest] != size:
                    problems.append(
                        Problem(
                            seq,
                            run_name,
                            digest,
                            f"the refs table records {listed[seq][digest]} bytes, "
                            f"the save needs {size}: gc checks blobs by that size; "
                            "restore ledger.db from a backup",
                        )
                    )
            if digest not in listed[seq]:
                problems.append(
                    Problem(
                        seq,
                        run_name,
                        digest,
                        "is needed by the save but missing from the refs table, so "
                        "gc would not keep it: restore ledger.db from a backup",
                    )
                )
    if problems:
        # A save expired while its blobs were read may have been collected by
        # a gc meanwhile: it needs nothing any more.
        expired = {
            row["target"]
            for row in store.db.rows("SELECT target FROM events WHERE kind = 'expire'")
        }
        problems = [p for p in problems if p.seq not in expired]
    problems.sort(key=lambda p: (p.seq or 0, p.digest or ""))
    return problems


class _BlobCheck:
    """Reads each distinct blob once and remembers what was wrong with it."""

    def __init__(
        self,
        store: Store,
        total: int,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.blobs = store.blobs
        self.total = total
        self.progress = progress
        self.seen: dict[str, str | None] = {}
        self.manifests: dict[str, list[TensorRef]] = {}

    def manifest(self, digest: object) -> tuple[list[TensorRef], str | None]:
        """The tensor refs of a manifest, or why it cannot be read."""
        if not isinstance(digest, str):
            return [], f"is not a manifest digest ({digest!r})"
        # Imported here, not above: the codec imports torch (about a second),
        # which readers of the ledger that import this module never need.
        from ledger._codec import decode_manifest

        if digest not in self.seen:
            reason = None
            try:
                _, self.manifests[digest] = decode_manifest(
                    bytes(self.blobs.get(digest))
                )
            except ManifestError as exc:
                reason = f"is not a readable manifest ({exc})"
            except (MissingBlobError, CorruptBlobError, OSError, ValueError) as exc:
                reason = _blob_reason(exc)
            self._seen(digest, reason)
        return self.manifests.get(digest, []), self.seen[digest]

    def blob(self, digest: str, nbytes: int | None) -> str | None:
        """Why a blob is unusable, or None when it is sound."""
        if digest not in self.seen:
            reason = None
            try:
                size = self.blobs.size_of(digest)
                if nbytes is not None and size != nbytes:
                    reason = f"has {size} bytes, the manifest says {nbytes}"
                else:
                    self.blobs.verify(digest)
            except (MissingBlobError, CorruptBlobError, OSError, ValueError) as exc:
                reason = _blob_reason(exc)
            self._seen(digest, reason)
        return self.seen[digest]

    def expected_size(self, digest: str, nbytes: int | None) -> int | None:
        """The size a blob must have: the manifest's word for a tensor, the
        blob's own size for a sound manifest (its digest proves it)."""
        if nbytes is not None:
            return nbytes
        if digest in self.manifests and self.seen.get(digest) is None:
            try:
                return self.blobs.size_of(digest)
            except (MissingBlobError, OSError, ValueError):
                return None
        return None

    def _seen(self, digest: str, reason: str | None) -> None:
        self.seen[digest] = reason
        self.total = max(self.total, len(self.seen))
        if self.progress is not None:
            self.progress(len(self.seen), self.total)


def _blob_reason(exc: Exception) -> str:
    if isinstance(exc, MissingBlobError):
        return "is missing"
    if isinstance(exc, CorruptBlobError):
        return f"is corrupt ({exc.reason})"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or exc})"
    return f"is not a valid digest ({exc})"
