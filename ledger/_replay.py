"""Replay: a run's state is a fold over its events, never stored.

`fold` is pure (it copies the state it starts from), so the state as of any
earlier event is the fold of a prefix, and a state kept incrementally equals a
replay from scratch. Copying costs O(live saves) per call, not per event, so
replaying a run of 100,000 events is one pass. That pass reads only the
columns replay needs, as plain rows (`REPLAY_COLUMNS`), and builds no Event:
a save's metrics stay msgpack bytes until someone reads them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgpack

from ledger._events import Event


@dataclass(frozen=True)
class SaveInfo:
    """What replay keeps of one save.

    `body` is the save event's msgpack body; `metrics` is decoded from it on
    first access, so a replay pays nothing for the metrics nobody reads.
    """

    seq: int
    epoch: int | None
    step: int | None
    manifest: str
    body: bytes = field(repr=False)

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """The metrics recorded with the save."""
        return dict(_body(self.body).get("metrics", {}))


@dataclass
class RunState:
    """A run as derived from its events up to `seq`.

    Attributes:
        last, best, final, resumed_from: sequence numbers of save events.
        best_value: the watched metric's value at `best`.
        saves: every save so far, by sequence number, in append order.
        live: sequence numbers of saves not expired.
        resume_targets: every save a resume ever came from.
    """

    run: str
    seq: int = 0
    events: int = 0
    opened: int | None = None
    config_hash: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    last: int | None = None
    best: int | None = None
    best_value: float | None = None
    final: int | None = None
    resumed_from: int | None = None
    resumes: int = 0
    saves: dict[int, SaveInfo] = field(default_factory=dict)
    live: set[int] = field(default_factory=set)
    resume_targets: set[int] = field(default_factory=set)

    def epoch_of(self, seq: int | None) -> int | None:
        return None if seq is None else self.saves[seq].epoch

    def summary(self) -> dict[str, Any]:
        """The state as plain data (for `ckpt show --json`)."""
        return {
            "run": self.run,
            "as_of_seq": self.seq,
            "events": self.events,
            "config_hash": self.config_hash,
            "last": self.last,
            "last_epoch": self.epoch_of(self.last),
            "best": self.best,
            "best_epoch": self.epoch_of(self.best),
            "best_value": self.best_value,
            "final": self.final,
            "final_epoch": self.epoch_of(self.final),
            "resumed_from": self.resumed_from,
            "resumes": self.resumes,
            "saves": len(self.saves),
            "live_saves": sorted(self.live),
        }


# The columns `replay` reads, in the order it unpacks them.
REPLAY_COLUMNS = "seq, kind, epoch, step, manifest, value, target, body"

Row = tuple[
    int, str, int | None, int | None, str | None, float | None, int | None, bytes
]


def fold(
    events: Iterable[Event], state: RunState | None = None, *, run: str = ""
) -> RunState:
    """Apply events (in sequence order) to a copy of `state` (or a new one)."""
    out = RunState(run=run) if state is None else _copy(state)
    rows = []
    for ev in events:
        if not out.run:
            out.run = ev.run
        rows.append(
            (
                ev.seq,
                ev.kind,
                ev.epoch,
                ev.step,
                ev.manifest,
                ev.value,
                ev.target,
                ev.body_bytes,
            )
        )
    _apply(out, rows)
    return out


def replay(rows: Iterable[Row], state: RunState | None = None, *, run: str) -> RunState:
    """`fold` for rows of `REPLAY_COLUMNS` of one run, read straight from SQL."""
    out = RunState(run=run) if state is None else _copy(state)
    _apply(out, rows)
    return out


def _copy(state: RunState) -> RunState:
    out = copy.copy(state)
    out.saves = dict(state.saves)
    out.live = set(state.live)
    out.resume_targets = set(state.resume_targets)
    return out


def _apply(s: RunState, rows: Iterable[Row]) -> None:
    # One loop with the hot fields in locals: at 100,000 events, attribute
    # writes per event would cost as much as reading the rows.
    saves, live = s.saves, s.live
    last_seq, count, last = s.seq, s.events, s.last
    try:
        for seq, kind, epoch, step, manifest, value, target, body in rows:
            if seq <= last_seq:
                raise ValueError(f"events out of order: {seq} after {last_seq}")
            last_seq = seq
            count += 1
            if kind == "save":
                saves[seq] = SaveInfo(seq, epoch, step, manifest or "", body)
                live.add(seq)
                last = seq
            elif kind == "expire":
                live.discard(target if target is not None else -1)
            elif kind == "promote":
                s.best = target
                s.best_value = value
            elif kind == "open":
                opened = _body(body)
                s.opened = seq
                s.config_hash = opened.get("config_hash")
                s.options = opened.get("options", {})
            elif kind == "final":
                s.final = target
            elif kind == "resume":
                s.resumed_from = target
                s.resumes += 1
                if target is not None:
                    s.resume_targets.add(target)
                config_hash = _body(body).get("config_hash")
                if config_hash:
                    s.config_hash = config_hash
            else:
                raise ValueError(f"unknown event kind {kind!r} at #{seq}")
    finally:
        s.seq, s.events, s.last = last_seq, count, last


def _body(body: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgpack.unpackb(body, raw=False, strict_map_key=False)
    return decoded
