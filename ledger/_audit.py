"""Audit: proof that a store's history is intact and followed the run's rules.

One pass over the events in sequence order recomputes the hash chain and replays
each run under the options of its open event, re-deriving every promote, final,
resume and expire from the saved metrics; `ledger._gc.verify` then reads the
blobs. A chain rebuilt by whoever rewrote history is self-consistent: only a
head kept elsewhere, or the policy replay, exposes it. The cost is a full read.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blake3
import msgpack

from ledger._errors import LedgerError, PolicyError, UnknownReferenceError
from ledger._events import (
    GENESIS_HASH,
    KINDS,
    Event,
    chain_hash,
    event_from_row,
    hashed_fields,
)
from ledger._gc import Problem, damaged_ledger
from ledger._gc import verify as verify_blobs
from ledger._policies import RunOptions
from ledger._schema import LedgerReadError

if TYPE_CHECKING:
    from ledger._store import Store

Progress = Callable[[int, int], None]

_HASH = re.compile(r"[0-9a-f]{64}")
_RETENTION = re.compile(r"retention keep_last=(\d+)")
_ALTERED = "the ledger was altered outside ckpt-ledger; restore ledger.db from a backup"
_NONE = type(None)
_COLUMN_TYPES: dict[str, tuple[type, ...]] = {
    "run": (str,),
    "kind": (str,),
    "epoch": (int, _NONE),
    "step": (int, _NONE),
    "manifest": (str, _NONE),
    "metric": (str, _NONE),
    "value": (float, int, _NONE),
    "target": (int, _NONE),
    "body": (bytes,),
    "time": (str,),
    "host": (str,),
    "pid": (int,),
}


class HeadError(LedgerError, ValueError):
    """A head that is not `SEQ HASH` as `ckpt head` writes it."""


@dataclass(frozen=True)
class Head:
    """The newest event of a ledger: its sequence number and hash.

    Kept outside the store (`ckpt head > head.txt`), it pins the history up to
    that event: a ledger that still extends it holds the same hash there.
    """

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq} {self.hash}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """Read `SEQ HASH`, the line `str(head)` and `ckpt head` write."""
        parts = text.split()
        if (
            len(parts) != 2
            or not parts[0].isdigit()
            or _HASH.fullmatch(parts[1]) is None
        ):
            raise HeadError(
                f"not a ledger head: {text.strip()[:80]!r}; expected 'SEQ HASH' "
                "as written by `ckpt head`"
            )
        return cls(int(parts[0]), parts[1])


def head(store: Store) -> Head:
    """The chain head: the newest event's number and hash (0 and the genesis
    hash while the ledger is empty)."""
    rows = store.db.rows("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
    if not rows:
        return Head(0, GENESIS_HASH)
    return Head(int(rows[0]["seq"]), str(rows[0]["hash"]))


def audit(
    store: Store,
    *,
    run: str | None = None,
    head: Head | tuple[int, str] | None = None,
    progress: Progress | None = None,
) -> list[Problem]:
    """Everything `Store.verify` proves, as one list of problems in sequence order.

    The hash chain and the head concern the whole ledger, so they are checked
    even when `run` names one run; the policy replay and the blobs cover `run`
    only. At one sequence number chain problems come first, so the first
    problem names the first bad event. `progress(done, total)` is called as
    events, then blobs, are checked.

    Raises:
        UnknownReferenceError: no event belongs to `run`.
    """
    try:
        return _audit(store, run, head, progress)
    except (sqlite3.DatabaseError, LedgerReadError) as exc:
        return [damaged_ledger(store, exc)]


def _audit(
    store: Store,
    run: str | None,
    head: Head | tuple[int, str] | None,
    progress: Progress | None,
) -> list[Problem]:
    pinned = head if head is None or isinstance(head, Head) else Head(*head)
    if run is not None and not store.db.rows(
        "SELECT 1 FROM events WHERE run = ? LIMIT 1", [run]
    ):
        raise UnknownReferenceError(f"no run {run!r} in {store.path}")
    count = store.db.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    blobs = store.db.db.execute("SELECT COUNT(DISTINCT digest) FROM refs").fetchone()
    total = count + blobs[0]

    # 1. One pass over the ledger: the chain always, the policies of `run`.
    chain, policy = _Chain(pinned), _Policy()
    policy_problems: list[Problem] = []
    for done, row in enumerate(store.db.db.query("SELECT * FROM events ORDER BY seq")):
        chain.check(row)
        if run is None or row["run"] == run:
            policy_problems.extend(policy.check(row))
        if progress is not None and done % 256 == 0:
            progress(done, total)
    policy_problems.extend(policy.finish())

    # 2. The blobs every unexpired save needs.
    reached = [total]

    def blob_progress(done: int, of: int) -> None:
        reached[0] = count + of
        if progress is not None:
            progress(count + done, count + of)

    blob_problems = verify_blobs(store, run=run, progress=blob_progress)
    if progress is not None:
        progress(reached[0], reached[0])
    found = chain.finish() + policy_problems + blob_problems
    return sorted(found, key=lambda p: (p.seq is None, p.seq or 0))


class _Chain:
    """Recomputes each event's hash and checks it links to the one before."""

    def __init__(self, pinned: Head | None) -> None:
        self.pinned = pinned
        self.pinned_found: tuple[str, str] | None = None
        self.expected = 1
        self.prev_hash = GENESIS_HASH
        self.problems: list[Problem] = []

    def check(self, row: Mapping[str, Any]) -> None:
        seq, run = row["seq"], _text(row["run"])
        reasons = []
        gap = seq > self.expected
        if gap:
            self.problems.append(
                Problem(
                    self.expected,
                    None,
                    None,
                    f"missing: the sequence jumps from #{self.expected - 1} to "
                    f"#{seq}, so rows were deleted or renumbered",
                )
            )
        elif seq < self.expected:
            reasons.append(f"sequence number {seq}, but they start at 1")
        if not gap and row["prev_hash"] != self.prev_hash:
            reasons.append(
                "its prev_hash is not the hash of the event before it, so an "
                "event was removed, inserted or reordered"
            )
        try:
            intact = chain_hash(row["prev_hash"], hashed_fields(dict(row)))
        except (TypeError, ValueError):
            intact = None
        if intact != row["hash"]:
            reasons.append("its hash does not match its fields, so it was changed")
        if reasons:
            self.problems.append(Problem(seq, run, None, "; ".join(reasons)))
        if self.pinned is not None and seq == self.pinned.seq:
            self.pinned_found = (_text(row["hash"]), run)
        self.prev_hash = row["hash"]
        self.expected = max(self.expected, seq + 1)

    def finish(self) -> list[Problem]:
        out = [
            Problem(
                p.seq,
                p.run,
                p.digest,
                f"hash chain broken: {p.message}"
                + (" (first break: later events are unproven)" if i == 0 else "")
                + f"; {_ALTERED}",
            )
            for i, p in enumerate(self.problems)
        ]
        pinned = self.pinned
        if pinned is None or pinned.seq == 0:
            return out
        if self.pinned_found is None:
            out.append(
                Problem(
                    pinned.seq,
                    None,
                    None,
                    f"the head file names event #{pinned.seq} but the ledger ends "
                    f"at #{self.expected - 1}: history was cut or rewritten; "
                    f"{_ALTERED}",
                )
            )
        elif self.pinned_found[0] != pinned.hash:
            out.append(
                Problem(
                    pinned.seq,
                    self.pinned_found[1],
                    None,
                    f"hash {self.pinned_found[0][:16]}... differs from the head "
                    f"file's {pinned.hash[:16]}...: history up to here was "
                    f"rewritten; {_ALTERED}",
                )
            )
        return out


@dataclass(frozen=True)
class _Save:
    seq: int
    epoch: int | None
    step: int | None
    value: float | None  # the watched metric as saved; None when missing


@dataclass(frozen=True)
class _Promotion:
    """A promote that replay says must directly follow its save."""

    save: _Save
    previous: int | None
    previous_value: float | None


@dataclass
class _Replay:
    """One run re-derived from its events; `best` is what the policy says, never
    what a promote claims."""

    options: RunOptions | None
    config_hash: str | None
    last_event: int
    saves: dict[int, _Save] = field(default_factory=dict)
    live: set[int] = field(default_factory=set)
    expired: dict[int, int] = field(default_factory=dict)
    resume_targets: set[int] = field(default_factory=set)
    best: int | None = None
    best_value: float | None = None
    final: int | None = None
    last: int | None = None
    pending: _Promotion | None = None


class _Policy:
    """Replays every run under its recorded options and judges each event."""

    def __init__(self) -> None:
        self.runs: dict[str, _Replay] = {}
        self.opened_at: dict[str, int] = {}
        self.orphans: set[str] = set()

    def check(self, row: Mapping[str, Any]) -> list[Problem]:
        ev, error = _typed(row)
        if ev is None:
            return [Problem(row["seq"], _text(row["run"]), None, error)]
        if ev.kind == "open":
            return _problems(ev, self._open(ev))
        replay = self.runs.get(ev.run)
        if replay is None:
            if ev.run in self.orphans:
                return []
            self.orphans.add(ev.run)
            return _problems(
                ev,
                [
                    f"run {ev.run!r} has no open event before it, so its "
                    "policies cannot be checked; " + _ALTERED
                ],
            )
        said = []
        pending = replay.pending
        if pending is not None and (ev.kind, ev.target) != (
            "promote",
            pending.save.seq,
        ):
            said.append(_unpromoted(pending, replay, "found " + ev.kind))
            replay.pending = None
        judge = {
            "save": self._save,
            "promote": self._promote,
            "final": self._final,
            "resume": self._resume,
            "expire": self._expire,
        }[ev.kind]
        said.extend(judge(replay, ev))
        replay.last_event = ev.seq
        return _problems(ev, said)

    def finish(self) -> list[Problem]:
        """Saves that should have been promoted by the end of the ledger."""
        out = []
        for run, replay in self.runs.items():
            if replay.pending is not None:
                save = replay.pending.save
                message = _unpromoted(replay.pending, replay, "the ledger ends")
                out.append(Problem(save.seq, run, None, message))
        return out

    def _open(self, ev: Event) -> list[str]:
        if ev.run in self.runs:
            return [f"run {ev.run!r} was already opened by #{self.opened_at[ev.run]}"]
        body, error = _body(ev)
        out = [error] if error else []
        options = None
        if not error:
            try:
                options = RunOptions.from_record(body.get("options") or {})
            except (PolicyError, TypeError, ValueError) as exc:
                out.append(
                    f"its options cannot be read ({exc}), so the run's policies "
                    "cannot be checked"
                )
            out.extend(_config_problems(body))
        self.runs[ev.run] = _Replay(options, body.get("config_hash"), ev.seq)
        self.opened_at[ev.run] = ev.seq
        return out

    def _save(self, r: _Replay, ev: Event) -> list[str]:
        out = []
        if ev.manifest is None or _HASH.fullmatch(ev.manifest) is None:
            out.append(f"names no manifest digest ({ev.manifest!r})")
        body, error = _body(ev)
        metrics = body.get("metrics", {})
        if error or not isinstance(metrics, dict):
            out.append(error or "its metrics are not a map")
            metrics = {}
        best = r.options.best if r.options is not None else None
        value = None
        if best is not None:
            raw = metrics.get(best.metric)
            if raw is not None and type(raw) not in (int, float):
                out.append(f"its {best.metric!r} is {raw!r}, not a number")
            elif raw is not None:
                value = float(raw)
            column = value if value is not None and math.isfinite(value) else None
            metric = best.metric if raw is not None else None
            if ev.metric != metric or not _same(ev.value, column):
                out.append(
                    f"its metric columns ({ev.metric!r}, {ev.value!r}) disagree with "
                    f"its recorded metrics ({metric!r}, {column!r})"
                )
        save = _Save(ev.seq, ev.epoch, ev.step, value)
        r.saves[ev.seq] = save
        r.live.add(ev.seq)
        r.last = ev.seq
        if (
            best is not None
            and value is not None
            and best.is_eligible(ev.epoch)
            and best.improves(value, r.best_value)
        ):
            r.pending = _Promotion(save, r.best, r.best_value)
            r.best, r.best_value = ev.seq, value
        return out

    def _promote(self, r: _Replay, ev: Event) -> list[str]:
        save, out = _target(r, ev)
        if save is None or r.options is None:
            return out
        best = r.options.best
        pending, r.pending = r.pending, None
        if best is None:
            return [*out, "the run has no best-policy, so nothing may be promoted"]
        if pending is None or pending.save.seq != save.seq:
            return [*out, _not_promotable(r, save)]
        body, error = _body(ev)
        wrong = [error] if error else []
        if ev.metric != best.metric:
            wrong.append(
                f"metric {ev.metric!r}, but the policy watches {best.metric!r}"
            )
        if not _same(ev.value, save.value):
            wrong.append(f"value {ev.value!r}, but the save recorded {save.value!r}")
        if body.get("previous") != pending.previous or not _same(
            body.get("previous_value"), pending.previous_value
        ):
            wrong.append(
                f"previous best #{body.get('previous')} ({body.get('previous_value')})"
                f", but replay gives #{pending.previous} ({pending.previous_value})"
            )
        if (body.get("mode"), body.get("tolerance")) != (best.mode, best.tolerance):
            wrong.append(
                f"mode {body.get('mode')!r} tolerance {body.get('tolerance')!r}, but "
                f"the policy has {best.mode!r} {best.tolerance!r}"
            )
        if wrong:
            out.append(f"promote of save #{save.seq}: " + "; ".join(wrong))
        return out

    def _final(self, r: _Replay, ev: Event) -> list[str]:
        save, out = _target(r, ev)
        if save is None:
            return out
        want = r.options.final_epoch if r.options is not None else None
        if want is not None and save.epoch != want:
            out.append(
                f"marks save #{save.seq} (epoch {save.epoch}) final, but the run's "
                f"final epoch is {want}"
            )
        if save.seq in r.expired:
            out.append(
                f"marks save #{save.seq} final after #{r.expired[save.seq]} expired it"
            )
        r.final = save.seq
        return out

    def _resume(self, r: _Replay, ev: Event) -> list[str]:
        body, error = _body(ev)
        save: _Save | None
        out: list[str]
        if ev.target is None and body.get("mode") in ("none", "auto"):
            # A fresh start (or an auto resume that found no save) names none.
            save, out = None, []
        else:
            save, out = _target(r, ev)
        if save is not None:
            if save.seq in r.expired:
                out.append(
                    f"resumes from save #{save.seq} after #{r.expired[save.seq]} "
                    "expired it"
                )
            r.resume_targets.add(save.seq)
        if error:
            return [*out, error]
        out.extend(_config_problems(body))
        now = body.get("config_hash")
        if now and now != r.config_hash:
            if not body.get("config_diff"):
                out.append(
                    f"the config hash changed ({str(r.config_hash)[:12]}... -> "
                    f"{str(now)[:12]}...) but no differences are recorded"
                )
            r.config_hash = now
        return out

    def _expire(self, r: _Replay, ev: Event) -> list[str]:
        save, out = _target(r, ev)
        if save is None:
            return out
        if save.seq in r.expired:
            return [
                *out,
                f"save #{save.seq} was already expired by #{r.expired[save.seq]}",
            ]
        roles = [
            role
            for role, seq in (("best", r.best), ("final", r.final))
            if seq == save.seq
        ]
        if roles:
            out.append(f"releases save #{save.seq}, the run's {' and '.join(roles)}")
        body, error = _body(ev)
        reason = body.get("reason")
        match = _RETENTION.fullmatch(reason) if isinstance(reason, str) else None
        if error:
            out.append(error)
        elif match is not None and r.options is not None:
            out.extend(_retention_problems(r, save, int(match[1])))
        r.live.discard(save.seq)
        r.expired[save.seq] = ev.seq
        return out


def _retention_problems(r: _Replay, save: _Save, keep: int) -> list[str]:
    assert r.options is not None
    if r.options.keep_last != keep:
        return [
            f"cites retention keep_last={keep}, but the run keeps {r.options.keep_last}"
        ]
    why = []
    if save.seq in sorted(r.live)[-keep:]:
        why.append(f"among the newest {keep} saves")
    if save.seq == r.last:
        why.append("the last save")
    if save.seq in r.resume_targets:
        why.append("a save the run resumed from")
    if not why:
        return []
    return [f"retention may not release save #{save.seq}: it is " + ", ".join(why)]


def _target(r: _Replay, ev: Event) -> tuple[_Save | None, list[str]]:
    save = r.saves.get(ev.target) if ev.target is not None else None
    if save is None:
        return None, [f"names #{ev.target}, which is not an earlier save of its run"]
    if (ev.epoch, ev.step) != (save.epoch, save.step):
        return save, [
            f"names epoch {ev.epoch} step {ev.step}, but save #{save.seq} is epoch "
            f"{save.epoch} step {save.step}"
        ]
    return save, []


def _not_promotable(r: _Replay, save: _Save) -> str:
    assert r.options is not None and r.options.best is not None
    best = r.options.best
    head = f"promote of save #{save.seq} is not allowed by the best-policy: "
    if save.seq != r.last_event:
        return head + "it does not directly follow its save, as every promote does"
    if save.value is None or not math.isfinite(save.value):
        return head + f"its {best.metric!r} is {save.value}, which never promotes"
    if not best.is_eligible(save.epoch):
        return head + (
            f"epoch {save.epoch} is before the first eligible epoch {best.first_epoch}"
        )
    return head + (
        f"{best.metric} {save.value!r} does not beat the best {r.best_value!r} "
        f"(#{r.best}) by more than {best.tolerance} (mode {best.mode})"
    )


def _unpromoted(pending: _Promotion, r: _Replay, found: str) -> str:
    assert r.options is not None and r.options.best is not None
    best = r.options.best
    save = pending.save
    return (
        f"save #{save.seq} ({best.metric} {save.value!r}) strictly improves on "
        + (
            "no best yet"
            if pending.previous is None
            else f"the best {pending.previous_value!r} (#{pending.previous})"
        )
        + f", so a promote of it must follow it, but {found}"
    )


def _config_problems(body: Mapping[str, Any]) -> list[str]:
    from ledger._store import canonical_json

    config, recorded = body.get("config"), body.get("config_hash")
    if not isinstance(config, dict) or recorded is None:
        return []
    try:
        digest = blake3.blake3(canonical_json(config).encode()).hexdigest()
    except PolicyError:
        return ["its config is not JSON"]
    if digest != recorded:
        return [f"its config_hash {str(recorded)[:12]}... is not the config's hash"]
    return []


def _typed(row: Mapping[str, Any]) -> tuple[Event | None, str]:
    for column, types in _COLUMN_TYPES.items():
        value = row[column]
        if type(value) not in types:
            allowed = " or ".join(t.__name__ for t in types)
            return None, (
                f"column {column} holds {type(value).__name__} {value!r:.40}, not "
                f"{allowed}; {_ALTERED}"
            )
    if row["kind"] not in KINDS:
        return None, f"unknown event kind {row['kind']!r:.40}; {_ALTERED}"
    return event_from_row(dict(row)), ""


def _body(ev: Event) -> tuple[dict[str, Any], str]:
    try:
        body = ev.body
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        return {}, f"its body cannot be decoded ({exc})"
    if not isinstance(body, dict):
        return {}, "its body is not a map"
    return body, ""


def _problems(ev: Event, said: list[str]) -> list[Problem]:
    """One Problem for everything wrong with one event (none if nothing is)."""
    if not said:
        return []
    what = ev.kind + (f" e{ev.epoch}" if ev.epoch is not None else "")
    if ev.step is not None:
        what += f" step {ev.step}"
    return [Problem(ev.seq, ev.run, None, f"{what}: " + "; ".join(said))]


def _same(a: Any, b: Any) -> bool:
    """Equal, with None only equal to None and NaN equal to NaN."""
    if a is None or b is None:
        return a is b
    if type(a) in (int, float) and type(b) in (int, float):
        return bool(a == b or (math.isnan(a) and math.isnan(b)))
    return bool(a == b)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
