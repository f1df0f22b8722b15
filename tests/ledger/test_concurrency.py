"""Concurrent processes on one store: C10 (a brand-new store opened by eight
processes at once) and the cross-process write lock that guards SQLite's
WAL-reset bug (several writers appending at once).

Workers are forked from the test process, so torch is imported once, and a
multiprocessing Barrier releases them together; every check is made afterwards
on the ledger itself, never on timings.
"""

import logging
import multiprocessing
import sqlite3
from contextlib import closing
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
import torch

from ledger import Store
from ledger._events import GENESIS_HASH, chain_hash, hashed_fields

_FORK = multiprocessing.get_context("fork")
_WAIT = 120.0  # seconds before a stuck barrier or join fails the test


def _open_and_save_each_round(
    index: int, root: Path, rounds: int, barrier: Barrier
) -> None:
    for number in range(rounds):
        barrier.wait(_WAIT)
        with Store(root / f"round{number}") as store:
            run = store.run(f"worker{index}", config={"worker": index})
            run.save({"w": torch.full((4,), float(index))}, epoch=1)


def _append_saves(index: int, path: Path, saves: int, barrier: Barrier) -> None:
    with Store(path) as store:
        run = store.run(f"writer{index}")
        barrier.wait(_WAIT)
        for epoch in range(1, saves + 1):
            run.save({"w": torch.tensor([index, epoch])}, epoch=epoch)


def _run_all(target: object, args: list[tuple[object, ...]]) -> list[int | None]:
    procs = [_FORK.Process(target=target, args=a) for a in args]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(4 * _WAIT)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def _assert_chain_unbroken(store: Store) -> None:
    previous = GENESIS_HASH
    for ev in store.events():
        assert ev.prev_hash == previous, f"chain broken at #{ev.seq}"
        assert ev.hash == chain_hash(previous, hashed_fields(ev))
        previous = ev.hash


def _integrity(path: Path) -> str:
    with closing(sqlite3.connect(path / "ledger.db")) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def test_c10_eight_processes_open_a_brand_new_store_at_once(tmp_path: Path) -> None:
    workers, rounds = 8, 20
    barrier = _FORK.Barrier(workers)

    exitcodes = _run_all(
        _open_and_save_each_round,
        [(i, tmp_path, rounds, barrier) for i in range(workers)],
    )

    assert exitcodes == [0] * workers
    for number in range(rounds):
        path = tmp_path / f"round{number}"
        assert _integrity(path) == "ok"
        with Store(path) as store:
            assert sorted(store.runs()) == sorted(f"worker{i}" for i in range(workers))
            saves = store.events(kind="save")
            assert sorted(ev.run for ev in saves) == sorted(store.runs())
            assert len(store.events()) == 2 * workers
            _assert_chain_unbroken(store)
            tables = store.db.rows(
                "SELECT type, name FROM sqlite_master "
                "WHERE type IN ('table', 'trigger')"
            )
            assert len(tables) == len({(t["type"], t["name"]) for t in tables}) == 8
            meta = store.db.rows("SELECT key FROM meta ORDER BY key")
            assert meta == [{"key": "created"}, {"key": "schema_version"}]


def test_concurrent_writers_keep_the_wal_ledger_intact(tmp_path: Path) -> None:
    writers, saves = 4, 50
    barrier = _FORK.Barrier(writers)
    path = tmp_path / "store"

    exitcodes = _run_all(
        _append_saves, [(i, path, saves, barrier) for i in range(writers)]
    )

    assert exitcodes == [0] * writers
    assert _integrity(path) == "ok"
    with Store(path) as store:
        events = store.events()
        assert len(events) == writers * (1 + saves)
        assert [ev.seq for ev in events] == list(range(1, len(events) + 1))
        _assert_chain_unbroken(store)
        for i in range(writers):
            run = store.get_run(f"writer{i}")
            history = run.history("save")
            assert [ev.epoch for ev in history] == list(range(1, saves + 1))
            assert torch.equal(run.load("last")["w"], torch.tensor([i, saves]))
        assert store.db.rows("SELECT * FROM leases") == []
        assert store.verify() == []


def test_store_on_a_network_filesystem_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("ledger._schema._filesystem_type", lambda path: "nfs4")

    with caplog.at_level(logging.WARNING, logger="ledger._schema"):
        Store(tmp_path / "store").close()

    assert any("nfs4" in r.getMessage() for r in caplog.records)
