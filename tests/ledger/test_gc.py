"""Garbage collection of a whole store: what gc keeps, what it removes, and when
it refuses to remove anything at all.

Blob ages are set with `os.utime`, never waited for, so every test is instant
and no assertion depends on the clock of a busy machine.
"""

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ledger import Store


def _checkpoint(*values: float) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((64,), float(v)) for i, v in enumerate(values)}


def _digests(store: Store, seq: int) -> set[str]:
    rows = store.db.rows("SELECT digest FROM refs WHERE seq = ?", [seq])
    return {r["digest"] for r in rows}


def _on_disk(store: Store) -> set[str]:
    return {info.digest for info in store.blobs.iter_blobs()}


def _age(store: Store, seconds: float = 7200.0) -> None:
    then = time.time() - seconds
    for info in store.blobs.iter_blobs():
        os.utime(store.blobs.path_of(info.digest), (then, then))


def _leftover(store: Store, name: str = "dead.tmp") -> Path:
    store.blobs.tmp_dir.mkdir(parents=True, exist_ok=True)
    path = store.blobs.tmp_dir / name
    path.write_bytes(b"half a blob")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "store")
    yield opened
    opened.close()


def test_gc_keeps_every_blob_of_unexpired_saves(store: Store) -> None:
    run = store.run("r")
    first = run.save(_checkpoint(1, 2), epoch=1)
    second = run.save(_checkpoint(2, 3), epoch=2)
    _age(store)

    report = store.gc(grace=0)

    assert report.ok and report.blobs_removed == 0
    assert _digests(store, first.seq) | _digests(store, second.seq) == _on_disk(store)
    assert store.verify() == []


def test_gc_removes_blobs_only_an_expired_save_needed(store: Store) -> None:
    run = store.run("r")
    old = run.save(_checkpoint(1, 2), epoch=1)
    new = run.save(_checkpoint(2, 3), epoch=2)
    run.expire(old.seq)
    _age(store)

    report = store.gc(grace=60)

    assert _on_disk(store) == _digests(store, new.seq)
    gone = _digests(store, old.seq) - _digests(store, new.seq)
    assert report.blobs_removed == len(gone) == 2  # tensor 1.0 and the manifest
    assert store.verify() == []


def test_gc_removes_unreferenced_blob_older_than_grace(store: Store) -> None:
    digest = store.blobs.put(b"nobody needs me").digest
    _age(store, 120)

    report = store.gc(grace=60)

    assert report.blobs_removed == 1 and report.kept_young == 0
    assert not store.blobs.has_blob(digest)


def test_gc_keeps_unreferenced_blob_younger_than_grace(store: Store) -> None:
    digest = store.blobs.put(b"just written").digest
    _age(store, 30)

    report = store.gc(grace=60)

    assert report.blobs_removed == 0 and report.kept_young == 1
    assert store.blobs.has_blob(digest)


def test_gc_keeps_blob_leased_by_inflight_save(store: Store) -> None:
    digest = store.blobs.put(b"about to be referenced").digest
    leases = store._lease([digest])
    _age(store)

    kept = store.gc(grace=0)
    with store.db.write():
        store._release(leases)
    released = store.gc(grace=0)

    assert kept.leased_blobs == 1 and kept.blobs_removed == 0
    assert released.blobs_removed == 1 and not store.blobs.has_blob(digest)


def test_gc_removes_blob_whose_lease_lapsed_and_drops_the_lease(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store", lease_ttl=0)
    digest = store.blobs.put(b"leased by a writer that died").digest
    store._lease([digest])
    _age(store)

    report = store.gc(grace=0)

    assert report.leased_blobs == 0 and report.blobs_removed == 1
    assert store.db.rows("SELECT * FROM leases") == []
    store.close()


def test_gc_counts_references_of_every_run(store: Store) -> None:
    shared = 7.0
    a = store.run("a").save(_checkpoint(shared, 1), epoch=1)
    b = store.run("b").save(_checkpoint(shared, 2), epoch=1)
    a_last = store.run("a").save(_checkpoint(3.0, 3), epoch=2)  # last can't expire
    store.get_run("a").expire(a.seq)
    _age(store)

    store.gc(grace=0)

    assert _on_disk(store) == _digests(store, b.seq) | _digests(store, a_last.seq)
    assert _digests(store, a.seq) & _on_disk(store)  # the shared tensor stays
    assert store.verify() == []


def test_gc_sweeps_temp_files_of_dead_writers(store: Store) -> None:
    leftover = _leftover(store)

    report = store.gc(grace=3600)

    assert report.tmp_removed == 1 and report.tmp_bytes == len(b"half a blob")
    assert not leftover.exists()


def test_gc_spares_temp_file_of_live_writer_until_it_lets_go(store: Store) -> None:
    inflight = _leftover(store, "live.tmp")
    fd = os.open(inflight, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)

    during = store.gc(grace=0)
    survived = inflight.exists()
    os.close(fd)
    after = store.gc(grace=0)

    assert during.tmp_removed == 0 and survived
    assert after.tmp_removed == 1 and not inflight.exists()


def test_gc_refuses_and_deletes_nothing_when_referenced_blob_is_missing(
    store: Store,
) -> None:
    save = store.run("r").save(_checkpoint(1, 2), epoch=1)
    lost = sorted(_digests(store, save.seq))[0]
    garbage = store.blobs.put(b"garbage").digest
    leftover = _leftover(store)
    _age(store)
    store.blobs.delete(lost)

    report = store.gc(grace=0)

    assert not report.ok
    assert [(p.seq, p.run, p.digest) for p in report.missing] == [(save.seq, "r", lost)]
    assert "missing" in str(report.missing[0])
    assert report.blobs_removed == 0 and store.blobs.has_blob(garbage)
    assert leftover.exists()


def test_gc_refuses_when_referenced_blob_has_wrong_size(store: Store) -> None:
    save = store.run("r").save(_checkpoint(1), epoch=1)
    damaged = sorted(_digests(store, save.seq))[0]
    garbage = store.blobs.put(b"garbage").digest
    _age(store)
    path = store.blobs.path_of(damaged)
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes()[:-1])

    report = store.gc(grace=0)

    assert [p.digest for p in report.missing] == [damaged]
    assert "expected" in report.missing[0].message
    assert store.blobs.has_blob(garbage)


def test_gc_dry_run_reports_but_deletes_nothing(store: Store) -> None:
    run = store.run("r")
    old = run.save(_checkpoint(1), epoch=1)
    run.save(_checkpoint(2), epoch=2)
    run.expire(old.seq)
    leftover = _leftover(store)
    _age(store)
    before = _on_disk(store)

    report = store.gc(grace=0, dry_run=True)

    assert report.dry_run and report.blobs_removed == 2 and report.bytes_freed > 0
    assert _on_disk(store) == before
    assert leftover.exists()


def test_gc_dry_run_keeps_lapsed_leases(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", lease_ttl=0)
    store._lease([store.blobs.put(b"x").digest])

    store.gc(grace=0, dry_run=True)

    assert len(store.db.rows("SELECT * FROM leases")) == 1
    store.close()


def test_gc_refuses_negative_grace(store: Store) -> None:
    with pytest.raises(ValueError, match="grace"):
        store.gc(grace=-1)
