"""Readers of a ledger never wait for the write lock, and SQLite errors name
their real cause."""

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ledger import Store
from ledger._errors import LedgerStateError
from ledger._schema import explain


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "s"
    with Store(path) as store:
        store.run("r").save({"w": torch.zeros(3)}, epoch=1)
    return path


@pytest.fixture
def held_lock(store_path: Path) -> Iterator[None]:
    """ledger.lock held as by another process (flock is per open file)."""
    fd = os.open(store_path / "ledger.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
    os.close(fd)


def test_reading_a_store_while_another_process_holds_the_write_lock_does_not_wait(
    store_path: Path, held_lock: None
) -> None:
    with Store(store_path, lock_timeout=0.05) as store:
        runs = store.runs()
        state = store.get_run("r").state()
        problems = store.verify()
        report = store.gc(dry_run=True)

    assert runs == ["r"]
    assert state.last == 2
    assert problems == []
    assert report.dry_run


def test_writing_while_another_process_holds_the_write_lock_still_waits(
    store_path: Path, held_lock: None
) -> None:
    with (
        Store(store_path, lock_timeout=0.05) as store,
        pytest.raises(LedgerStateError, match="locked"),
    ):
        store.run("r").save({"w": torch.ones(3)}, epoch=2)


def test_gc_dry_run_works_on_a_read_only_store(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode)
    )
    before = sorted((store_path / "blobs").rglob("*"))
    ledger = (store_path / "ledger.db").read_bytes()

    with Store(store_path) as store:
        report = store.gc(grace=0, dry_run=True)

    assert report.dry_run and report.ok
    assert sorted((store_path / "blobs").rglob("*")) == before
    assert (store_path / "ledger.db").read_bytes() == ledger


@pytest.mark.parametrize(
    ("message", "advice"),
    [
        ("database is locked", "another process"),
        ("database or disk is full", "free space"),
        ("disk I/O error", "check the disk"),
        ("database disk image is malformed", "restore it from a backup"),
        ("file is not a database", "restore it from a backup"),
    ],
)
def test_sqlite_errors_are_explained_by_their_cause(message: str, advice: str) -> None:
    text = explain(sqlite3.OperationalError(message), Path("/s/ledger.db"))

    assert advice in text
    if "backup" not in advice:
        assert "backup" not in text
