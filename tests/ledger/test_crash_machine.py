"""The save protocol under crashes and concurrent gc, against a simple model.

A hypothesis state machine saves (fresh and deduplicating content), promotes,
resumes, expires and collects garbage, and crashes a save at any step of the
protocol. A crash is a private exception raised by the store's hook; an
"abrupt" one first closes the ledger connection, so no cleanup can run, as
after SIGKILL. Then the store is reopened. After every step: no live save
points at a missing blob, gc spared every blob a save or a lease needed, and
the replayed state equals the model. `tools/crashtest.py` does the same with
real SIGKILLs; the torture test at the end runs it.
"""

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ledger import (
    BestPolicy,
    PolicyError,
    RunOptions,
    Store,
    UnknownReferenceError,
)
from ledger._replay import fold

STEPS = [
    "leased",
    "tmp_open",
    "write",
    "fsync",
    "rename",
    "dir_fsync",
    "blobs_written",
    "committed",
]
OPTIONS = RunOptions(best=BestPolicy("loss", mode="min"), keep_last=2)
TOLERANCE = 1e-12
REPO = Path(__file__).resolve().parents[2]

losses = st.floats(0.0, 10.0, allow_nan=False)


class _Crash(BaseException):
    """Stands in for the process dying at a step of the save protocol."""


class _Faults:
    """The store's hook: at the `nth` call of `step`, run `action` once."""

    def __init__(self) -> None:
        self.step: str | None = None
        self.nth = 1
        self.calls = 0
        self.action: Any = None

    def arm(self, step: str, nth: int, action: Any) -> None:
        self.step, self.nth, self.calls, self.action = step, nth, 0, action

    def disarm(self) -> None:
        self.step = self.action = None

    def __call__(self, step: str, detail: str) -> None:
        if step != self.step:
            return
        self.calls += 1
        if self.calls == self.nth:
            action = self.action
            self.disarm()
            action()


def _fast_dir() -> str:
    # Crashes are about ordering, not durability: tmpfs spares slow fsyncs.
    shm = "/dev/shm"
    return tempfile.mkdtemp(dir=shm if os.access(shm, os.W_OK) else None)


class SaveProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = _fast_dir()
        self.path = Path(self.root) / "store"
        self.faults = _Faults()
        self.counter = 0
        # The model: what every committed save holds, and the run's state.
        self.payloads: dict[int, dict[str, torch.Tensor]] = {}
        self.live: set[int] = set()
        self.last: int | None = None
        self.best: int | None = None
        self.best_value: float | None = None
        self.resume_targets: set[int] = set()

    @initialize(lease_ttl=st.sampled_from([3600.0, 0.0]))
    def open_store(self, lease_ttl: float) -> None:
        # lease_ttl=0: every lease has lapsed by the time a gc looks at it.
        self.lease_ttl = lease_ttl
        self.sweeper = Store(self.path)
        self._open()

    def _open(self) -> None:
        self.store = Store(self.path, hook=self.faults, lease_ttl=self.lease_ttl)
        self.run = self.store.run("r", options=OPTIONS)

    def teardown(self) -> None:
        try:
            if hasattr(self, "store"):
                self._close_store()
                self.sweeper.close()
        finally:
            shutil.rmtree(self.root)

    def _close_store(self) -> None:
        db = self.store.db
        try:
            db.db.conn.execute("SELECT 1")
        except sqlite3.ProgrammingError:  # closed by an abrupt crash
            os.close(db._lock_fd)
            return
        self.store.close()

    def _fresh(self) -> dict[str, torch.Tensor]:
        self.counter += 1
        return {
            "frozen": torch.ones(48),
            "w": torch.full((32,), float(self.counter)),
            "b": torch.arange(8, dtype=torch.float64) * self.counter,
        }

    def _record(self, seq: int, payload: dict[str, torch.Tensor], loss: float) -> Any:
        """Apply a committed save to the model; return (promoted, expired)."""
        self.payloads[seq] = payload
        self.live.add(seq)
        self.last = seq
        promoted = self.best_value is None or loss < self.best_value - TOLERANCE
        if promoted:
            self.best, self.best_value = seq, loss
        protected = {self.best, self.last} | self.resume_targets
        ordered = sorted(self.live)
        expired = {s for s in ordered[:-2] if s not in protected}
        self.live -= expired
        return promoted, expired

    def _save(self, payload: dict[str, torch.Tensor], loss: float) -> None:
        saved = self.run.save(payload, epoch=self.counter, metrics={"loss": loss})
        assert saved is not None
        promoted, expired = self._record(saved.seq, payload, loss)
        assert saved.promoted == promoted
        assert set(saved.expired) == expired

    def _needed(self) -> set[str]:
        """Digests of every unexpired save (as replay, not gc, sees them) and
        every unexpired lease."""
        digests = {
            r["digest"]
            for seq in self.run.state().live
            for r in self.store.db.rows("SELECT digest FROM refs WHERE seq = ?", [seq])
        }
        leased = self.store.db.rows(
            "SELECT digest FROM leases WHERE expires > ?", [time.time()]
        )
        return digests | {r["digest"] for r in leased}

    def _on_disk(self) -> set[str]:
        return {info.digest for info in self.store.blobs.iter_blobs()}

    def _snapshot(self) -> dict[str, Any]:
        tmp = self.store.blobs.tmp_dir
        return {
            "events": [e.hash for e in self.store.events()],
            "blobs": self._on_disk(),
            "tmp": sorted(os.listdir(tmp)) if tmp.is_dir() else [],
            "leases": self.store.db.rows("SELECT * FROM leases ORDER BY id"),
        }

    def _held_by_leases(self) -> set[str]:
        rows = self.store.db.rows(
            "SELECT digest FROM leases WHERE expires > ?", [time.time()]
        )
        return {r["digest"] for r in rows}

    @rule(loss=losses)
    def save_fresh(self, loss: float) -> None:
        self._save(self._fresh(), loss)

    @precondition(lambda self: self.payloads)
    @rule(data=st.data(), loss=losses, change=st.booleans())
    def save_again(self, data: st.DataObject, loss: float, change: bool) -> None:
        # Deduplicating: content of an earlier save, perhaps expired and
        # collected by now, with one tensor changed or not.
        seq = data.draw(st.sampled_from(sorted(self.payloads)))
        self.counter += 1
        payload = dict(self.payloads[seq])
        if change:
            payload["b"] = payload["b"] + 1
        self._save(payload, loss)

    @precondition(lambda self: self.best_value is not None)
    @rule()
    def promote_by_improving_metric(self) -> None:
        assert self.best_value is not None
        self._save(self._fresh(), self.best_value / 2 - 1e-3)
        assert self.best == self.last

    @rule(which=st.sampled_from(["last", "best"]))
    def resume(self, which: str) -> None:
        target = self.last if which == "last" else self.best
        if target is None or target not in self.live:
            with pytest.raises(UnknownReferenceError):
                self.run.resume(which)
            return

        resumed = self.run.resume(which)

        assert resumed is not None and resumed.seq == target
        for key, tensor in self.payloads[target].items():
            assert torch.equal(resumed.state[key], tensor)
        self.resume_targets.add(target)

    def _protected(self) -> set[int | None]:
        return {self.best, self.last} | self.resume_targets

    @precondition(lambda self: self.live - self._protected())
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live - self._protected())))

        self.run.expire(seq)

        self.live.discard(seq)

    @precondition(lambda self: self.live & self._protected())
    @rule(data=st.data())
    def expire_protected_is_refused(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live & self._protected())))

        with pytest.raises(PolicyError, match="cannot be expired"):
            self.run.expire(seq)

    @rule()
    def collect(self) -> None:
        needed = self._needed() & self._on_disk()

        report = self.store.gc(grace=0)

        assert report.ok, report.missing
        assert needed <= self._on_disk()

    @rule(step=st.sampled_from(STEPS), nth=st.integers(1, 3), loss=losses)
    def collect_during_save(self, step: str, nth: int, loss: float) -> None:
        # C12 inside the machine: another process's gc at a step of the save.
        def sweep() -> None:
            needed = self._needed() & self._on_disk()
            report = self.sweeper.gc(grace=0)
            assert report.ok, report.missing
            assert needed <= self._on_disk()

        self.faults.arm(step, nth, sweep)

        self._save(self._fresh(), loss)

        self.faults.disarm()

    @rule(
        step=st.sampled_from(STEPS),
        nth=st.integers(1, 3),
        abrupt=st.booleans(),
        loss=losses,
        reuse=st.booleans(),
    )
    def crash(
        self, step: str, nth: int, abrupt: bool, loss: float, reuse: bool
    ) -> None:
        payload = self._fresh()
        if reuse and self.payloads:
            payload["w"] = self.payloads[max(self.payloads)]["w"]
        before = self._snapshot()
        saves_before = len(self.run.history("save"))

        def die() -> None:
            if abrupt:
                self.store.db.db.conn.close()  # as after SIGKILL: no cleanup
            raise _Crash(step)

        self.faults.arm(step, nth, die)
        try:
            self._save(payload, loss)
        except _Crash:
            crashed = True
        else:
            crashed = False
        self.faults.disarm()
        if crashed and not abrupt and step != "committed":
            # A failed save leaves no trace, but for new blobs that another
            # (dead, yet unexpired) save's lease holds, as gc would keep them.
            after = self._snapshot()
            blobs_before, blobs_after = before.pop("blobs"), after.pop("blobs")
            assert after == before
            assert blobs_before <= blobs_after
            assert blobs_after - blobs_before <= self._held_by_leases()
        self._close_store()
        self._open()

        if crashed and step == "committed":
            saves = self.run.history("save")
            assert len(saves) == saves_before + 1
            self._record(saves[-1].seq, payload, loss)
        elif crashed:
            assert len(self.run.history("save")) == saves_before

    @rule()
    def reopen(self) -> None:
        self._close_store()
        self._open()

    @invariant()
    def no_live_save_points_at_a_missing_or_corrupt_blob(self) -> None:
        if hasattr(self, "store"):
            assert self.store.verify() == []

    @invariant()
    def no_blob_file_holds_bytes_of_another_name(self) -> None:
        if hasattr(self, "store"):
            assert self.store.blobs.verify_all() == []

    @invariant()
    def replayed_state_equals_the_model(self) -> None:
        if not hasattr(self, "store"):
            return
        state = self.run.state()
        assert state == fold(self.store.events("r"), run="r")
        assert state.last == self.last
        assert state.best == self.best
        assert state.best_value == self.best_value
        assert state.live == self.live
        assert state.resume_targets == self.resume_targets


SaveProtocolMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None
)
test_save_protocol_survives_crashes_and_gc_like_the_model = SaveProtocolMachine.TestCase


@pytest.mark.torture
def test_crashtest_with_50_kills_loses_nothing() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "crashtest.py"),
            "--kills",
            "50",
            "--seed",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )

    last = done.stdout.strip().splitlines()[-1]
    assert last == (
        "kills: 50, committed events lost: 0, dangling references: 0, "
        "corrupt blobs accepted: 0"
    ), done.stderr[-2000:]
    assert done.returncode == 0
