"""Events: the immutable rows of the ledger and their chained hashes.

An event's hash is blake3 over the previous event's hash and a canonical
msgpack encoding of its own fields, so changing, reordering or inserting any
row, or dropping one that later rows follow, breaks the chain from that row on.
Cutting off the newest rows leaves a sound, shorter chain: only a head kept
elsewhere (`ckpt verify --head`) shows it. The body (config,
metrics, provenance) is stored as msgpack bytes and hashed as stored, so the
hash never depends on how a dict happens to be ordered when read back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import blake3
import msgpack

KINDS = ("open", "save", "promote", "final", "resume", "expire")
GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class Event:
    """One row of the ledger.

    `target` is the sequence number of the save an event acts on (promote,
    final, resume, expire). `value` is the watched metric's value when finite.
    """

    seq: int
    run: str
    kind: str
    epoch: int | None
    step: int | None
    manifest: str | None
    metric: str | None
    value: float | None
    target: int | None
    body_bytes: bytes
    time: str
    host: str
    pid: int
    prev_hash: str
    hash: str

    @property
    def body(self) -> dict[str, Any]:
        """The event's msgpack body, decoded."""
        decoded: dict[str, Any] = msgpack.unpackb(
            self.body_bytes, raw=False, strict_map_key=False
        )
        return decoded

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics recorded with a save (empty for other kinds)."""
        return dict(self.body.get("metrics", {}))

    def label(self) -> str:
        """A short human name: `#12 save e3`."""
        where = f" e{self.epoch}" if self.epoch is not None else ""
        if self.step is not None:
            where += f" step {self.step}"
        return f"#{self.seq} {self.kind}{where}"


COLUMNS = (
    "seq",
    "run",
    "kind",
    "epoch",
    "step",
    "manifest",
    "metric",
    "value",
    "target",
    "body",
    "time",
    "host",
    "pid",
    "prev_hash",
    "hash",
)


def chain_hash(prev_hash: str, fields: tuple[Any, ...]) -> str:
    """The hash of an event: blake3(previous hash + canonical fields)."""
    hasher = blake3.blake3(bytes.fromhex(prev_hash))
    hasher.update(msgpack.packb(list(fields), use_bin_type=True))
    return hasher.hexdigest()


def hashed_fields(row: dict[str, Any] | Event) -> tuple[Any, ...]:
    """The fields of an event that its hash covers, in a fixed order."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    body = get("body") if isinstance(row, dict) else row.body_bytes
    return (
        get("seq"),
        get("run"),
        get("kind"),
        get("epoch"),
        get("step"),
        get("manifest"),
        get("metric"),
        get("value"),
        get("target"),
        body,
        get("time"),
        get("host"),
        get("pid"),
    )


def event_from_row(row: dict[str, Any]) -> Event:
    """Build an Event from a row of the events table."""
    return Event(
        seq=row["seq"],
        run=row["run"],
        kind=row["kind"],
        epoch=row["epoch"],
        step=row["step"],
        manifest=row["manifest"],
        metric=row["metric"],
        value=row["value"],
        target=row["target"],
        body_bytes=bytes(row["body"]),
        time=row["time"],
        host=row["host"],
        pid=row["pid"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


_FIELDS = tuple(f.name for f in fields(Event))


def events_from_tuples(rows: Iterable[tuple[Any, ...]]) -> list[Event]:
    """Build Events from rows of `COLUMNS`, selected in that order."""
    # Filling __dict__ directly skips the frozen dataclass's __init__, which
    # sets each of the 15 fields through object.__setattr__: at 100,000 rows
    # that is most of the cost of reading a run's history.
    new = object.__new__
    out = []
    for row in rows:
        ev = new(Event)
        ev.__dict__.update(zip(_FIELDS, row, strict=True))
        out.append(ev)
    return out
