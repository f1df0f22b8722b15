"""Garbage collection and verification of a whole store.

Runs share blobs, so both work over every run's references at once. gc marks
every digest an unexpired save or an unexpired lease needs, then sweeps the
rest, all under the ledger's write lock: no save can commit mid-sweep, and a
save in flight is protected by its lease. The cost is that saves wait while a
large sweep runs.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cas import CorruptBlobError, MissingBlobError
from ledger._codec import decode_manifest
from ledger._errors import ManifestError

if TYPE_CHECKING:
    from ledger._store import Store

log = logging.getLogger(__name__)

_LIVE_REFS = """
SELECT r.digest AS digest, r.size AS size, r.seq AS seq, e.run AS run
FROM refs r JOIN events e ON e.seq = r.seq
WHERE e.kind = 'save'
  AND r.seq NOT IN (SELECT target FROM events WHERE kind = 'expire')
"""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the store, tied to the event that suffers from it."""

    seq: int | None
    run: str | None
    digest: str | None
    message: str

    def __str__(self) -> str:
        where = f"event #{self.seq} ({self.run})" if self.seq is not None else "store"
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
    report = GcReport(dry_run=dry_run)
    with store.db.write() as db:
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
    """Check every blob an unexpired save needs: present, sized right, hashing to
    its name, and every manifest decodable. One Problem per (event, blob)."""
    rows = store.db.rows(
        _LIVE_REFS + (" AND e.run = ?" if run else ""), [run] if run else []
    )
    needed_by: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row in rows:
        needed_by[row["digest"]].append((row["seq"], row["run"]))
    manifests = {
        r["manifest"]
        for r in store.db.rows(
            "SELECT manifest FROM events WHERE kind = 'save'"
            + (" AND run = ?" if run else ""),
            [run] if run else [],
        )
    }
    problems: list[Problem] = []
    digests = sorted(needed_by)
    for i, digest in enumerate(digests, 1):
        reason = None
        try:
            if digest in manifests:
                decode_manifest(bytes(store.blobs.get(digest)))
            else:
                store.blobs.verify(digest)
        except MissingBlobError:
            reason = "is missing"
        except CorruptBlobError as exc:
            reason = f"is corrupt ({exc.reason})"
        except ManifestError as exc:
            reason = f"is not a readable manifest ({exc})"
        if reason is not None:
            for seq, run_name in needed_by[digest]:
                problems.append(
                    Problem(
                        seq,
                        run_name,
                        digest,
                        reason + ": restore it or expire the save",
                    )
                )
        if progress is not None:
            progress(i, len(digests))
    problems.sort(key=lambda p: (p.seq or 0, p.digest or ""))
    return problems
