"""Faults around a save: a full disk, a read-only store, a locked, corrupt or
missing ledger.db, and leases left by a writer that died.

Each fault must give one clear line, leave the ledger and the blobs exactly as
they were, and let the next save succeed once the cause is gone. Faults are
injected through the store's hook; the full disk is also made real with a
small tmpfs when the tests may mount one.
"""

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ledger._gc as gc_module
from cas import BlobStoreIOError, hash_bytes
from ledger import Store
from ledger._errors import LedgerStateError


class _Injector:
    """A store hook that raises `error` at the `nth` call of `step`, once."""

    def __init__(self) -> None:
        self.step: str | None = None
        self.nth = 1
        self.error: BaseException | None = None
        self.calls: dict[str, int] = {}

    def arm(self, step: str, error: BaseException, nth: int = 1) -> None:
        self.step, self.error, self.nth, self.calls = step, error, nth, {}

    def __call__(self, step: str, detail: str) -> None:
        self.calls[step] = self.calls.get(step, 0) + 1
        if step == self.step and self.calls[step] == self.nth:
            error, self.step, self.error = self.error, None, None
            assert error is not None
            raise error


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _checkpoint(*values: float, size: int = 64) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((size,), float(v)) for i, v in enumerate(values)}


def _snapshot(store: Store) -> dict[str, Any]:
    """Everything a failed save must leave alone."""
    files = {
        sub: sorted(
            str(p.relative_to(store.path))
            for p in (store.path / sub).rglob("*")
            if p.is_file()
        )
        for sub in ("blobs", "tmp")
    }
    return {
        "events": [(e.seq, e.hash) for e in store.events()],
        "blobs": files["blobs"],
        "tmp": files["tmp"],
        "leases": store.db.rows("SELECT * FROM leases"),
    }


def _assert_one_line(error: BaseException, *words: str) -> None:
    text = str(error)
    assert "\n" not in text and text.strip() == text and text
    for word in words:
        assert word in text


def _assert_usable(store: Store) -> None:
    run = store.run("r")
    saved = run.save(_checkpoint(41, 42), epoch=99)
    assert saved is not None and run.state().last == saved.seq
    assert torch.equal(run.load(saved.seq)["t1"], torch.full((64,), 42.0))
    assert store.verify() == []


@pytest.fixture
def injector() -> _Injector:
    return _Injector()


@pytest.fixture
def store(tmp_path: Path, injector: _Injector) -> Iterator[Store]:
    opened = Store(tmp_path / "store", hook=injector)
    opened.run("r").save(_checkpoint(1, 2), epoch=1)
    yield opened
    opened.close()


@pytest.mark.parametrize("step", ["write", "fsync", "rename"])
def test_enospc_at_a_blob_step_gives_one_line_and_changes_nothing(
    store: Store, injector: _Injector, step: str
) -> None:
    before = _snapshot(store)
    # The second new blob fails: the first is already published and must go.
    injector.arm(step, _os_error(errno.ENOSPC), nth=2)

    with pytest.raises(BlobStoreIOError) as caught:
        store.run("r").save(_checkpoint(1, 7, 8, 9), epoch=2)

    assert caught.value.errno == errno.ENOSPC
    _assert_one_line(caught.value, "No space left on device", "retry")
    assert _snapshot(store) == before
    _assert_usable(store)


def test_enospc_at_directory_sync_changes_nothing(
    store: Store, injector: _Injector
) -> None:
    before = _snapshot(store)
    injector.arm("dir_fsync", _os_error(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        store.run("r").save(_checkpoint(5, 6), epoch=2)

    assert _snapshot(store) == before
    _assert_usable(store)


def test_read_only_store_gives_one_line_and_changes_nothing(
    store: Store, injector: _Injector
) -> None:
    before = _snapshot(store)
    injector.arm("tmp_open", _os_error(errno.EROFS))

    with pytest.raises(BlobStoreIOError) as caught:
        store.run("r").save(_checkpoint(5, 6), epoch=2)

    assert caught.value.errno == errno.EROFS
    _assert_one_line(caught.value, "Read-only file system")
    assert _snapshot(store) == before
    _assert_usable(store)


def test_interrupt_right_after_leasing_drops_the_leases(
    store: Store, injector: _Injector
) -> None:
    before = _snapshot(store)
    injector.arm("leased", KeyboardInterrupt())

    with pytest.raises(KeyboardInterrupt):
        store.run("r").save(_checkpoint(5, 6), epoch=2)

    assert _snapshot(store) == before


def test_failed_save_keeps_a_fresh_blob_another_writer_leased(
    store: Store, injector: _Injector
) -> None:
    # Another writer (its own Store, as another process) leased the content
    # this save writes first; the failing save must not delete it under it.
    content = torch.full((64,), 3.0)
    digest = hash_bytes(content.numpy().tobytes())
    other = Store(store.path)
    leases = other._lease([digest])
    injector.arm("write", _os_error(errno.ENOSPC), nth=2)

    with pytest.raises(BlobStoreIOError):
        store.run("r").save({"t0": content, "t1": torch.zeros(9)}, epoch=3)

    assert store.blobs.has_blob(digest, verify=True)
    with other.db.write():
        other._release(leases)
    other.close()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
    )
    return done.returncode == 0


def test_save_onto_a_filesystem_that_fills_up_changes_nothing(
    tmp_path: Path, injector: _Injector
) -> None:
    # A real 2 MiB tmpfs when the container lets root mount one (and no hook,
    # so the blobs are written on several threads at once); otherwise the
    # same save meets an injected ENOSPC. Either way the test runs.
    disk = tmp_path / "disk"
    real = _mount_tmpfs(disk, "2m")
    try:
        store = Store(disk / "store", hook=None if real else injector)
        run = store.run("r")
        run.save(_checkpoint(1), epoch=1)
        filler = disk / "filler"
        if real:
            room = os.statvfs(disk)
            spare = room.f_bavail * room.f_frsize - (600 << 10)
            filler.write_bytes(b"\0" * max(spare, 0))
        else:
            filler.write_bytes(b"\0")
            injector.arm("write", _os_error(errno.ENOSPC), nth=2)
        before = _snapshot(store)

        # Three new blobs of 256 KiB outgrow the 600 KiB left.
        with pytest.raises(BlobStoreIOError) as caught:
            run.save(_checkpoint(7, 8, 9, size=64 << 10), epoch=2)
        after = _snapshot(store)
        filler.unlink()
        saved = run.save(_checkpoint(7, 8, 9, size=64 << 10), epoch=2)

        assert caught.value.errno == errno.ENOSPC
        _assert_one_line(caught.value, "No space left on device")
        assert after == before
        assert saved is not None and store.verify() == []
        store.close()
    finally:
        if real:
            subprocess.run(["umount", "-l", str(disk)], check=True)


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait()
    proc.stdout.close()


def test_locked_ledger_refuses_a_save_in_one_line_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store", lock_timeout=0.5)
    run = store.run("r")
    run.save(_checkpoint(1), epoch=1)
    before = _snapshot(store)
    holder = _start_lock_holder(tmp_path)

    with pytest.raises(LedgerStateError) as caught:
        run.save(_checkpoint(5, 6), epoch=2)
    after = _snapshot(store)
    _release(holder)

    _assert_one_line(caught.value, "locked", "ledger.lock")
    assert after == before
    _assert_usable(store)
    store.close()


def test_store_opens_but_cannot_write_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    Store(tmp_path / "store").close()
    holder = _start_lock_holder(tmp_path)

    with (
        Store(tmp_path / "store", lock_timeout=0.2) as store,
        pytest.raises(LedgerStateError) as caught,
    ):
        store.run("r")
    _release(holder)

    _assert_one_line(caught.value, "locked")
    with Store(tmp_path / "store") as store:
        _assert_usable(store)


def _start_lock_holder(tmp_path: Path) -> subprocess.Popen[str]:
    script = (
        "import fcntl, sys\n"
        "f = open(sys.argv[1], 'a')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "store" / "ledger.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def _ledger_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name.startswith("ledger.db")]


def _move_ledger_aside(path: Path, backup: Path) -> None:
    backup.mkdir()
    for p in _ledger_files(path):
        p.rename(backup / p.name)


def _restore_ledger(path: Path, backup: Path) -> None:
    for p in _ledger_files(path):
        p.unlink()
    for p in backup.iterdir():
        p.rename(path / p.name)


def test_corrupt_ledger_gives_one_line_until_restored(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store(path) as store:
        store.run("r").save(_checkpoint(1, 2), epoch=1)
        events = [e.hash for e in store.events()]
    _move_ledger_aside(path, tmp_path / "backup")
    (path / "ledger.db").write_bytes(bytes(range(256)) * 64)

    with pytest.raises(LedgerStateError) as caught:
        Store(path)
    _restore_ledger(path, tmp_path / "backup")

    _assert_one_line(caught.value, "ledger.db", "backup")
    with Store(path) as store:
        assert [e.hash for e in store.events()] == events
        _assert_usable(store)


def test_missing_ledger_beside_blobs_gives_one_line_and_creates_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    with Store(path) as store:
        store.run("r").save(_checkpoint(1, 2), epoch=1)
        events = [e.hash for e in store.events()]
    _move_ledger_aside(path, tmp_path / "backup")

    with pytest.raises(LedgerStateError) as caught:
        Store(path)
    created = _ledger_files(path)
    _restore_ledger(path, tmp_path / "backup")

    _assert_one_line(caught.value, "ledger.db", "missing")
    assert created == []
    with Store(path) as store:
        assert [e.hash for e in store.events()] == events
        _assert_usable(store)


_DYING_WRITER = """
import os, signal, sys
import torch
import ledger._gc as gc_module
from ledger import Store

def die(step, detail):
    if step == "blobs_written":
        os.kill(os.getpid(), signal.SIGKILL)

store = Store(sys.argv[1], lease_ttl=float(sys.argv[2]), hook=die)
shared = torch.full((64,), 1.0)
store.run("w").save({"t0": shared, "new": torch.full((64,), 5.0)}, epoch=2)
"""


def test_leases_of_a_dead_writer_lapse_and_gc_then_removes_only_its_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store"
    store = Store(path)
    kept = store.run("r").save(_checkpoint(1, 2), epoch=1)
    before = {i.digest for i in store.blobs.iter_blobs()}
    died = subprocess.run(
        [sys.executable, "-c", _DYING_WRITER, str(path), "2.0"], capture_output=True
    )
    orphans = {i.digest for i in store.blobs.iter_blobs()} - before
    leases = store.db.rows("SELECT digest, expires FROM leases")
    # gc reads the clock through its module: set it within, then past, the TTL.
    clock = {"now": min(lease["expires"] for lease in leases) - 1.0}
    monkeypatch.setattr(gc_module, "time", SimpleNamespace(time=lambda: clock["now"]))

    during = store.gc(grace=0)
    on_disk_during = {i.digest for i in store.blobs.iter_blobs()}
    clock["now"] = max(lease["expires"] for lease in leases) + 0.001
    after = store.gc(grace=0)

    assert died.returncode == -9 and len(orphans) == 2  # tensor 5.0 and manifest
    assert {lease["digest"] for lease in leases} >= orphans
    assert during.blobs_removed == 0 and on_disk_during == before | orphans
    assert after.blobs_removed == 2
    assert {i.digest for i in store.blobs.iter_blobs()} == before
    assert store.db.rows("SELECT * FROM leases") == []
    assert store.verify() == [] and kept is not None
    store.close()


def test_save_slower_than_its_lease_keeps_blobs_a_gc_removed(tmp_path: Path) -> None:
    # lease_ttl=0: the lease has lapsed by the time gc (another Store, as a
    # second process would) runs in the window before the commit.
    path = tmp_path / "store"
    sweeper = Store(path)
    reports = []

    def gc_before_commit(step: str, detail: str) -> None:
        if step == "blobs_written":
            reports.append(sweeper.gc(grace=0))

    store = Store(path, lease_ttl=0, hook=gc_before_commit)
    run = store.run("r")

    saved = run.save(_checkpoint(3, 4), epoch=1)

    assert reports[0].blobs_removed == 3  # gc did take them
    assert saved is not None and store.verify() == []
    assert torch.equal(run.load("last")["t1"], torch.full((64,), 4.0))
    store.close()
    sweeper.close()
