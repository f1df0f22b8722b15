"""The store: one directory holding the blob store and the ledger of many runs.

`Store` owns the on-disk layout (`ledger.db`, `blobs/`, `tmp/`), opens runs,
and answers store-wide questions (runs, usage). Runs share blobs, so garbage
collection and verification live at this level, never in a run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import msgpack

from cas import BlobStore
from ledger._dist import agree_on_seq
from ledger._errors import (
    ConfigMismatchError,
    LedgerStateError,
    PolicyError,
    UnknownReferenceError,
)
from ledger._events import (
    COLUMNS,
    GENESIS_HASH,
    Event,
    chain_hash,
    event_from_row,
    events_from_tuples,
    hashed_fields,
)
from ledger._policies import Contract, RunOptions
from ledger._provenance import provenance
from ledger._replay import RunState
from ledger._runlock import release
from ledger._schema import LedgerDB

if TYPE_CHECKING:
    from ledger._audit import Head
    from ledger._gc import Problem
    from ledger._run import Run

log = logging.getLogger(__name__)

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Hook = Callable[[str, str], None]


@dataclass(frozen=True)
class Usage:
    """Logical bytes (every save counted whole) against bytes on disk."""

    logical_bytes: int
    physical_bytes: int
    blobs: int
    saves: int

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.physical_bytes if self.physical_bytes else 1.0


def default_store_path() -> Path:
    """`$CKPT_STORE` if set, else `./.ckpt`."""
    return Path(os.environ.get("CKPT_STORE") or ".ckpt")


class Store:
    """A checkpoint store: the ledger and the blobs of any number of runs.

    A Store object belongs to the thread that opened it (its SQLite connection
    does); threads that save at once each open their own Store of the same
    directory.

    Args:
        path: the store directory; default `$CKPT_STORE`, else `./.ckpt`.
        lease_ttl: seconds a save's lease on its blobs protects them from gc; a
            lease of a process that died lapses after this long.
        lock_timeout: seconds to wait for another process's write transaction.
        hook: fault-injection callback `hook(step, detail)` run at each step of
            the save protocol ("leased", "blobs_written", "committed") and of
            each blob write.

    Raises:
        LedgerStateError: ledger.db is missing beside existing blobs, corrupt,
            or locked for longer than `lock_timeout`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        lease_ttl: float = 6 * 3600.0,
        lock_timeout: float = 120.0,
        hook: Hook | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self.lease_ttl = lease_ttl
        self.hook = hook
        db_path = self.path / "ledger.db"
        if _has_any_blob(self.path / "blobs"):
            # An empty history beside blobs would let gc delete every one of
            # them: a lost or emptied ledger.db is refused, never re-created.
            lack = _not_a_ledger(db_path)
            if lack is not None:
                raise LedgerStateError(
                    f"{db_path} {lack} but {self.path / 'blobs'} holds blobs: "
                    "restore ledger.db from a backup; refusing to start an empty "
                    "history"
                )
        writable = True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if not self.path.is_dir():
                raise LedgerStateError(
                    f"cannot create store {self.path}: {exc.strerror}"
                ) from exc
        if not os.access(self.path, os.W_OK):
            writable = False
            if not db_path.exists():
                raise LedgerStateError(
                    f"store {self.path} is read-only and holds no ledger.db"
                )
        self.blobs = BlobStore(self.path, hook=hook)
        self.db = LedgerDB(db_path, lock_timeout=lock_timeout, create=writable)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ledger connection and give up the runs this store wrote."""
        release(self)
        self.db.close()

    def _step(self, step: str, detail: str = "") -> None:
        if self.hook is not None:
            self.hook(step, detail)

    def run(
        self,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        options: RunOptions | None = None,
        contract: Contract | None = None,
        allow_config_change: bool = False,
        seed: int | None = None,
    ) -> Run:
        """Open a run, creating it (an open event) if it is new.

        Args:
            name: the run id: letters, digits, `.`, `_`, `-`.
            config: the run's config (JSON-serialisable); hashed and recorded.
            options: the run's policies (best, final epoch, retention); fixed
                at creation. Reopening with other options is refused.
            contract: config keys and required values; checked before anything
                is written. A contract recorded at creation applies to every
                reopening.
            allow_config_change: reopen an existing run whose config changed;
                the next resume records the differences.
            seed: the random seed, recorded in the provenance.

        Raises:
            ContractViolationError, ConfigMismatchError, PolicyError.
        """
        from ledger._run import Run

        if not isinstance(name, str) or _RUN_NAME.fullmatch(name) is None:
            raise PolicyError(
                f"invalid run name {name!r}: use letters, digits, '.', '_' and '-' "
                "(up to 128 characters, starting with a letter or digit)"
            )
        config = dict(config or {})
        _check_config(config)
        canonical = canonical_json(config)
        config_hash = blake3.blake3(canonical.encode()).hexdigest()
        options = options if options is not None else RunOptions()
        if not isinstance(options, RunOptions):
            raise PolicyError(f"options must be a RunOptions, got {options!r}")
        if contract is not None:
            contract.check(config)
        run = Run(self, name, config, config_hash)
        run.seed = seed

        def work() -> int:
            with self.db.write():
                state = run.refresh()
                if state.opened is None:
                    record = {
                        "config": json.loads(canonical),
                        "config_hash": config_hash,
                        "options": options.to_record(),
                        "contract": contract.to_record() if contract else None,
                        "provenance": provenance(seed),
                    }
                    ev = self._append(name, "open", body=record)
                    log.info("run %s opened (#%d)", name, ev.seq)
                    return ev.seq
                self._check_reopen(run, state, options, contract, allow_config_change)
                return state.opened

        agree_on_seq(work, f"open run {name}")
        run.refresh()
        return run

    def _check_reopen(
        self,
        run: Run,
        state: RunState,
        options: RunOptions,
        contract: Contract | None,
        allow_config_change: bool,
    ) -> None:
        if state.options != options.to_record():
            raise PolicyError(
                f"run {run.name!r} was opened with options {state.options}; a run's "
                f"policies cannot change (got {options.to_record()}): open a new run"
            )
        opened = self.event(state.opened or 0).body
        recorded = opened.get("contract")
        if recorded:
            Contract(recorded["name"], recorded["required"]).check(run.config)
        if contract is not None:
            contract.check(run.config)
        if run.config_hash != state.config_hash:
            before = self._current_config(run.name)
            diff = config_diff(before, run.config)
            if not allow_config_change:
                raise ConfigMismatchError(run.name, diff)
            run.config_diff = diff

    def _current_config(self, run: str) -> dict[str, Any]:
        rows = self.db.rows(
            "SELECT * FROM events WHERE run = ? AND kind IN ('open', 'resume') "
            "ORDER BY seq",
            [run],
        )
        config: dict[str, Any] = {}
        for row in rows:
            body = event_from_row(row).body
            if "config" in body:
                config = body["config"]
        return config

    def _append(
        self,
        run: str,
        kind: str,
        *,
        epoch: int | None = None,
        step: int | None = None,
        manifest: str | None = None,
        metric: str | None = None,
        value: float | None = None,
        target: int | None = None,
        body: Mapping[str, Any] | None = None,
        refs: Iterable[tuple[str, int]] = (),
    ) -> Event:
        """Append one event (and its digest rows) inside an open write transaction."""
        head = self.db.db.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        seq = 1 if head is None else head[0] + 1
        prev = GENESIS_HASH if head is None else head[1]
        row: dict[str, Any] = {
            "seq": seq,
            "run": run,
            "kind": kind,
            "epoch": epoch,
            "step": step,
            "manifest": manifest,
            "metric": metric,
            # SQLite's REAL keeps no sign of zero: store (and hash) what it reads
            # back, or the chain breaks on -0.0. The body keeps the exact value.
            "value": None if value is None else float(value) + 0.0,
            "target": target,
            "body": msgpack.packb(dict(body or {}), use_bin_type=True),
            "time": utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "prev_hash": prev,
        }
        row["hash"] = chain_hash(prev, hashed_fields(row))
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.db.db.execute(
            f"INSERT INTO events ({cols}) VALUES ({marks})", list(row.values())
        )
        ref_rows = [(seq, d, size) for d, size in refs]
        if ref_rows:
            self.db.db.conn.executemany("INSERT INTO refs VALUES (?, ?, ?)", ref_rows)
        return event_from_row(row)

    def _lease(self, digests: Iterable[str]) -> list[int]:
        """Lease digests against gc for `lease_ttl` seconds (its own transaction)."""
        holder = f"{socket.gethostname()}:{os.getpid()}"
        expires = time.time() + self.lease_ttl
        ids = []
        with self.db.write() as db:
            for digest in digests:
                cur = db.execute(
                    "INSERT INTO leases (digest, holder, expires) VALUES (?, ?, ?)",
                    [digest, holder, expires],
                )
                ids.append(int(cur.lastrowid or 0))
        return ids

    def _release(self, lease_ids: list[int]) -> int:
        """Drop leases inside an open write transaction; return how many were
        still there (gc deletes leases that lapsed)."""
        cur = self.db.db.conn.executemany(
            "DELETE FROM leases WHERE id = ?", [(i,) for i in lease_ids]
        )
        return cur.rowcount

    def event(self, seq: int) -> Event:
        """One event by sequence number."""
        rows = self.db.rows("SELECT * FROM events WHERE seq = ?", [seq])
        if not rows:
            raise UnknownReferenceError(f"no event #{seq} in the ledger")
        return event_from_row(rows[0])

    def events(self, run: str | None = None, *, kind: str | None = None) -> list[Event]:
        """Events in sequence order, of one run or all, optionally of one kind."""
        where, params = [], []
        if run is not None:
            where.append("run = ?")
            params.append(run)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        sql = f"SELECT {', '.join(COLUMNS)} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return events_from_tuples(self.db.tuples(sql + " ORDER BY seq", params))

    def runs(self) -> list[str]:
        """Run ids in the order they were opened."""
        rows = self.db.rows("SELECT run FROM events WHERE kind = 'open' ORDER BY seq")
        return [r["run"] for r in rows]

    def get_run(self, name: str) -> Run:
        """An existing run, for reading (no event is written)."""
        from ledger._run import Run

        if name not in self.runs():
            raise unknown_run(self, name)
        run = Run(self, name, {}, "")
        state = run.refresh()
        run.config = self._current_config(name)
        run.config_hash = state.config_hash or ""
        return run

    def head(self) -> Head:
        """The head of the hash chain: the newest event's number and hash.

        Kept outside the store (`ckpt head > head.txt`), it lets `verify(head=...)`
        prove that no event up to it was changed, dropped or re-chained.
        """
        from ledger._audit import head

        return head(self)

    def usage(self) -> Usage:
        """Logical against physical bytes: how much deduplication saves."""
        (logical,) = self.db.rows(
            "SELECT COALESCE(SUM(r.size), 0) AS bytes, COUNT(DISTINCT r.seq) AS saves "
            "FROM refs r JOIN events e ON e.seq = r.seq WHERE e.kind = 'save'"
        )
        physical = blobs = 0
        for info in self.blobs.iter_blobs():
            physical += info.size
            blobs += 1
        return Usage(int(logical["bytes"]), physical, blobs, int(logical["saves"]))

    def gc(self, *, grace: float = 3600.0, dry_run: bool = False) -> Any:
        """Collect garbage: see `ledger._gc.collect`."""
        from ledger._gc import collect

        return collect(self, grace=grace, dry_run=dry_run)

    def verify(
        self,
        run: str | None = None,
        *,
        head: Head | tuple[int, str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Problem]:
        """Prove the store: the hash chain is intact (and extends `head`, a
        `(seq, hash)` kept elsewhere), every promote, final, resume and expire
        follows from the run's recorded policies, and every blob an unexpired
        save needs is sound. See `ledger._audit.audit`.

        Returns one Problem per finding, in sequence order; empty when all is
        well. `progress(done, total)` is called as events and blobs are checked.

        Without `head`, a ledger whose newest events were cut off, or whose
        history was rewritten and chained again by someone with this code,
        verifies unless the rewrite breaks a policy: keep the head elsewhere.

        Raises:
            UnknownReferenceError: `run` names no run of the store.
        """
        from ledger._audit import audit

        return audit(self, run=run, head=head, progress=progress)


def unknown_run(store: Store, name: str) -> UnknownReferenceError:
    """The error for a run the store does not hold, naming those it does."""
    known = ", ".join(store.runs()) or "none"
    return UnknownReferenceError(f"no run {name!r} in {store.path} (runs: {known})")


def _not_a_ledger(db_path: Path) -> str | None:
    """Why `db_path` is no ledger (missing, empty, not ours), or None."""
    if not db_path.exists():
        return "is missing"
    if db_path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        conn = sqlite3.connect(
            f"file:{db_path}?mode=ro", uri=True, isolation_level=None
        )
    except sqlite3.Error:
        return None  # LedgerDB reports why it cannot be opened
    try:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        if "events" not in tables:
            return "has no events table"
        if "meta" not in tables:
            return "is not a ckpt ledger (no meta table)"
        # A ledger created by this code (marked `created`) with no events yet
        # is a new store whose first save may be in flight. Without the mark,
        # its schema was written over an emptied file by an older version.
        created = conn.execute("SELECT 1 FROM meta WHERE key = 'created'").fetchone()
        if created is None and conn.execute("SELECT 1 FROM events").fetchone() is None:
            return "holds no events (its schema was written over an emptied file)"
    except sqlite3.DatabaseError:
        return None  # damaged or locked: LedgerDB reports the real cause
    finally:
        conn.close()
    return None


def _has_any_blob(blobs: Path) -> bool:
    if not blobs.is_dir():
        return False
    return any(any(shard.iterdir()) for shard in blobs.iterdir() if shard.is_dir())


def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds and a `Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(config: Mapping[str, Any]) -> str:
    """Sorted-key compact JSON: the form a config is hashed in."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise PolicyError(
            f"config must be JSON-serialisable (dicts, lists, str, numbers, bool, "
            f"None): {exc}"
        ) from exc


def _check_config(value: Any, path: str = "") -> None:
    """Refuse what a config cannot hold faithfully: NaN and infinities (not
    JSON), and strings with lone surrogates (not UTF-8), naming the key."""
    where = path or "<root>"
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(
            f"config key {where} is {value}: a config must hold finite numbers "
            "(use None or a string)"
        )
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise PolicyError(
                f"config key {where} holds a string that is not valid UTF-8 (a "
                f"lone surrogate): {value!r:.60}"
            ) from None
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_config(
                key, f"{path}.<key {key!r:.40}>" if path else f"<key {key!r:.40}>"
            )
            _check_config(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_config(item, f"{path}.{index}" if path else str(index))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def config_diff(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> dict[str, list[Any]]:
    """Keys whose values differ, as `{key: [before, after]}` (None when absent)."""
    a, b = flatten(before), flatten(after)
    return {
        k: [a.get(k), b.get(k)]
        for k in sorted(set(a) | set(b))
        if canonical_json({"v": a.get(k)}) != canonical_json({"v": b.get(k)})
    }
