"""The SQLite ledger file: schema, connection settings and the write lock.

SQLite 3.7.0 to 3.51.2 can corrupt a WAL database when two connections write or
checkpoint at the same moment (the WAL-reset bug). The ledger is therefore
never written without holding an exclusive `flock` on `ledger.lock` beside it:
every write transaction, and every checkpoint (they run inside COMMIT or at the
close of a writing connection), happens under that lock, one process at a time.
Readers take no lock: WAL mode and the schema are set only when missing, and a
connection that never wrote checkpoints at close only if the lock is free.
The cost is that writers of one store queue behind each other, which a
checkpoint ledger (one append per save) never notices.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from ledger._errors import LedgerStateError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "lustre", "gpfs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    run TEXT NOT NULL,
    kind TEXT NOT NULL,
    epoch INTEGER,
    step INTEGER,
    manifest TEXT,
    metric TEXT,
    value REAL,
    target INTEGER,
    body BLOB NOT NULL,
    time TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run, seq);
CREATE INDEX IF NOT EXISTS events_target ON events (target);
CREATE TABLE IF NOT EXISTS refs (
    seq INTEGER NOT NULL REFERENCES events (seq),
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (seq, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_digest ON refs (digest);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_digest ON leases (digest);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS refs_no_update BEFORE UPDATE ON refs
    BEGIN SELECT RAISE(ABORT, 'refs are append-only'); END;
CREATE TRIGGER IF NOT EXISTS refs_no_delete BEFORE DELETE ON refs
    BEGIN SELECT RAISE(ABORT, 'refs are append-only'); END;
"""


class LedgerReadError(LedgerStateError):
    """SQLite could not read the ledger: a damaged file, a failing disk."""


class LedgerDB:
    """One connection to `<store>/ledger.db`, with the cross-process write lock.

    Args:
        path: the database file.
        lock_timeout: seconds to wait for the write lock before giving up.
        create: create the schema if the file is new.
    """

    def __init__(
        self, path: Path, *, lock_timeout: float = 120.0, create: bool = True
    ) -> None:
        self.path = path
        self.lock_path = path.with_name("ledger.lock")
        self.lock_timeout = lock_timeout
        self._lock_fd = -1
        self._depth = 0
        self.has_written = False
        self.read_only = not create and not os.access(path.parent, os.W_OK)
        conn: sqlite3.Connection | None = None
        try:
            if self.read_only:
                conn = _connect_read_only(path)
            else:
                conn = sqlite3.connect(path, isolation_level=None, timeout=60.0)
            conn.execute("PRAGMA busy_timeout = 60000")
            self.db = sqlite_utils.Database(conn)
            if not self.read_only:
                self._prepare(create)
        except sqlite3.DatabaseError as exc:
            self._abandon(conn)
            raise LedgerStateError(
                f"cannot open ledger {path}: {explain(exc, path)}"
            ) from exc
        except BaseException:
            self._abandon(conn)
            raise

    def _abandon(self, conn: sqlite3.Connection | None) -> None:
        # Cleanup of a failed open; the caller re-raises the original error.
        if conn is not None:
            conn.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _prepare(self, create: bool) -> None:
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("PRAGMA foreign_keys = ON")
        has_schema = (
            self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            is not None
        )
        is_wal = self.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        if not is_wal or (create and not has_schema):
            # journal_mode must be set outside a transaction, yet under the lock;
            # a ledger already in WAL with its schema needs neither, so readers
            # never wait for a writer here.
            self._lock()
            try:
                mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    log.warning("ledger %s is in %s mode, not WAL", self.path, mode)
                if create:
                    # executescript runs the script as one transaction of its own.
                    self.db.conn.executescript(
                        "BEGIN IMMEDIATE;"
                        + _SCHEMA
                        + "INSERT OR IGNORE INTO meta VALUES "
                        + f"('schema_version', '{SCHEMA_VERSION}');"
                        # Marks a ledger created empty by this code (never
                        # beside blobs); see Store's check of an empty ledger.
                        + "INSERT OR IGNORE INTO meta VALUES ('created', "
                        + "strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));"
                        + "COMMIT;"
                    )
                    self.has_written = True
            finally:
                self._unlock()
        version = self.meta("schema_version")
        if version is not None and version != str(SCHEMA_VERSION):
            raise LedgerStateError(
                f"ledger {self.path} has schema version {version}, this ckpt-ledger "
                f"reads version {SCHEMA_VERSION}: upgrade ckpt-ledger"
            )
        warn_if_network_fs(self.path.parent)

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return None if row is None else str(row[0])

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction (BEGIN IMMEDIATE) under the cross-process lock.

        Commits on success, rolls back on any exception. Nesting is refused.
        """
        if self.read_only:
            raise LedgerStateError(
                f"ledger {self.path} is read-only: make the store writable to change it"
            )
        if self._depth:
            raise RuntimeError("nested ledger write transaction")
        self._lock()
        self._depth += 1
        self.has_written = True
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise LedgerStateError(
                f"ledger {self.path} write failed: {explain(exc, self.path)}"
            ) from exc
        finally:
            self._depth -= 1
            self._unlock()

    def _lock(self) -> None:
        if self._lock_fd < 0:
            try:
                self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise LedgerStateError(
                    f"cannot open lock file {self.lock_path}: {exc.strerror}; "
                    "check that the store is writable"
                ) from exc
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerStateError(
                        f"ledger {self.path} is locked by another process for more "
                        f"than {self.lock_timeout:g}s: find it with "
                        f"`fuser {self.lock_path}`, or retry later"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite_utils.Database]:
        """One read transaction: a consistent snapshot, taking no lock."""
        self.db.execute("BEGIN")
        try:
            yield self.db
        finally:
            self.db.execute("COMMIT")

    def _try_lock(self) -> bool:
        try:
            if self._lock_fd < 0:
                self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def rows(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """Run a query and return its rows as dicts.

        Raises:
            LedgerReadError: SQLite could not read the ledger.
        """
        with self._reading():
            return list(self.db.query(sql, params))

    def tuples(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Run a query and return its rows as tuples, in the order selected:
        for reads of many rows, where building a dict per row is the cost.

        Raises:
            LedgerReadError: SQLite could not read the ledger.
        """
        with self._reading():
            return self.db.conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise LedgerReadError(
                f"cannot read ledger {self.path}: {explain(exc, self.path)}"
            ) from exc

    def close(self) -> None:
        """Close the connection; the final WAL checkpoint runs under the lock.

        A connection that never wrote does not wait for the lock: if another
        process holds it, that process has the ledger open, so this close is
        not the last one and runs no checkpoint.
        """
        if self.read_only:
            self.db.conn.close()
            return
        if self.has_written:
            self._lock()
            locked = True
        else:
            locked = self._try_lock()
        try:
            self.db.conn.close()
        finally:
            if locked:
                self._unlock()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            self._lock_fd = -1


def explain(exc: sqlite3.DatabaseError, path: Path) -> str:
    """The likely cause of an SQLite error on `path`, and what to do."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return (
            f"{text}: another process holds a write transaction on it; find it "
            f"with `fuser {path}`, or retry later"
        )
    if "full" in lowered:
        return f"{text}: free space on the disk holding {path.parent}, then retry"
    if "malformed" in lowered or "not a database" in lowered:
        return (
            f"{text}: the file is damaged; restore it from a backup (the blobs "
            "are intact)"
        )
    if "i/o" in lowered:
        return f"{text}: check the disk (dmesg, SMART) and that the store is mounted"
    return text


def _connect_read_only(path: Path) -> sqlite3.Connection:
    # A WAL database in a read-only directory opens read-only only if its -shm
    # file can be used; otherwise it is read as immutable (nobody can write it).
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    return sqlite3.connect(f"file:{path}?immutable=1", uri=True, isolation_level=None)


def warn_if_network_fs(path: Path) -> None:
    """Log a warning when `path` sits on a network filesystem."""
    fs = _filesystem_type(path)
    if fs is not None and fs in _NETWORK_FS:
        log.warning(
            "store %s is on a %s filesystem: SQLite locking and fsync may not be "
            "reliable there; put the store on a local disk",
            path,
            fs,
        )


def _filesystem_type(path: Path) -> str | None:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    resolved = str(path.resolve())
    best, fs = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1]
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(
            point
        ) > len(best):
            best, fs = point, parts[2]
    return fs
