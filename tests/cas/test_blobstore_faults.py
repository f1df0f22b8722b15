"""Faults during a write: an error or a killed writer at any step of the durable
write leaves either no blob or a complete one under the digest's name."""

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest

import cas
from cas import BlobStore, BlobStoreIOError

DATA = bytes(range(256)) * 64
DIGEST = blake3.blake3(DATA).hexdigest()
STEPS = ["tmp_open", "write", "fsync", "rename", "dir_fsync"]
PUBLISHED = {"rename", "dir_fsync"}


class InjectedFault(Exception):
    pass


def fail_at(step, error):
    def hook(current, _name):
        if current == step:
            raise error

    return hook


def assert_no_misnamed_blob(store):
    for info in store.iter_blobs():
        path = store.path_of(info.digest)
        assert blake3.blake3(path.read_bytes()).hexdigest() == info.digest


def test_hook_sees_each_step_of_a_write_in_order(tmp_path):
    seen = []
    store = BlobStore(tmp_path, hook=lambda step, _name: seen.append(step))

    store.put(DATA)

    assert seen == STEPS


def test_hook_sees_no_directory_sync_when_the_caller_defers_it(tmp_path):
    seen = []
    store = BlobStore(tmp_path, hook=lambda step, _name: seen.append(step))

    store.put(DATA, sync_dir=False)

    assert seen == STEPS[:-1]


@pytest.mark.parametrize("step", STEPS)
def test_an_error_at_any_step_leaves_no_temp_file_and_no_misnamed_blob(tmp_path, step):
    store = BlobStore(tmp_path, hook=fail_at(step, InjectedFault(step)))

    with pytest.raises(InjectedFault):
        store.put(DATA)

    assert os.listdir(store.tmp_dir) == []
    assert_no_misnamed_blob(store)
    assert store.has_blob(DIGEST, verify=True) == (step in PUBLISHED)


@pytest.mark.parametrize("step", ["tmp_open", "write", "fsync", "rename"])
def test_an_os_error_during_the_write_surfaces_as_blob_store_io_error(tmp_path, step):
    refusal = OSError(errno.EIO, os.strerror(errno.EIO))
    store = BlobStore(tmp_path, hook=fail_at(step, refusal))

    with pytest.raises(BlobStoreIOError) as caught:
        store.put(DATA)

    assert caught.value.errno == errno.EIO
    assert caught.value.__cause__ is refusal
    assert os.listdir(store.tmp_dir) == []
    assert_no_misnamed_blob(store)


def test_a_full_disk_is_one_line_error_and_a_later_put_succeeds(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    store = BlobStore(tmp_path, hook=fail_at("write", full))

    with pytest.raises(BlobStoreIOError) as caught:
        store.put(DATA)
    store.hook = None
    result = store.put(DATA)

    error = caught.value
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert "\n" not in str(error)
    assert str(error).startswith("could not write ")
    assert os.strerror(errno.ENOSPC) in str(error)
    assert result.written
    assert store.get(DIGEST) == DATA
    assert os.listdir(store.tmp_dir) == []


def test_a_read_only_filesystem_refuses_the_put_and_leaves_no_blob(tmp_path):
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    store = BlobStore(tmp_path, hook=fail_at("tmp_open", read_only))

    with pytest.raises(BlobStoreIOError) as caught:
        store.put(DATA)

    assert caught.value.errno == errno.EROFS
    assert not store.path_of(DIGEST).exists()
    assert os.listdir(store.tmp_dir) == []


def test_a_store_whose_tmp_is_not_a_directory_refuses_the_put(tmp_path):
    store = BlobStore(tmp_path)
    store.tmp_dir.write_bytes(b"not a directory")

    with pytest.raises(BlobStoreIOError) as caught:
        store.put(DATA)

    assert "\n" not in str(caught.value)
    assert not store.path_of(DIGEST).exists()


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    from cas import BlobStore

    def hook(step, _name):
        if step == sys.argv[2]:
            os._exit(9)

    BlobStore(sys.argv[1], hook=hook).put(bytes(range(256)) * 64)
    os._exit(0)
    """
)


def run_writer_killed_at(root, step):
    repo = Path(cas.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(root), step],
        env=env,
        check=False,
        capture_output=True,
    )


@pytest.mark.parametrize("step", STEPS)
def test_a_writer_killed_at_any_step_leaves_garbage_only_in_tmp(tmp_path, step):
    store = BlobStore(tmp_path)

    writer = run_writer_killed_at(tmp_path, step)

    assert writer.returncode == 9, writer.stderr.decode()
    assert_no_misnamed_blob(store)
    assert store.has_blob(DIGEST, verify=True) == (step in PUBLISHED)
    swept_files, _ = store.sweep_tmp()
    assert swept_files == (0 if step in PUBLISHED else 1)
    assert os.listdir(store.tmp_dir) == []
    assert store.put(DATA).written == (step not in PUBLISHED)
    store.verify(DIGEST)


def test_concurrent_puts_of_the_same_bytes_leave_one_sound_blob(tmp_path):
    store = BlobStore(tmp_path)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: store.put(DATA), range(16)))

    assert {r.digest for r in results} == {DIGEST}
    assert any(r.written for r in results)
    assert [info.digest for info in store.iter_blobs()] == [DIGEST]
    assert os.listdir(store.tmp_dir) == []
    store.verify(DIGEST)


def test_a_sweep_between_temp_file_creation_and_its_lock_does_not_fail_the_put(
    tmp_path, monkeypatch
):
    # A writer creates its temp file, then locks it: a sweep that lands between
    # the two finds an unlocked file, which it must not take for a dead writer's.
    store = BlobStore(tmp_path)
    store.put(b"a first blob, so tmp/ exists")
    real_flock = fcntl.flock
    sweeps = []

    def sweep_then_flock(fd, operation):
        if operation == fcntl.LOCK_EX and not sweeps:
            sweeps.append(store.sweep_tmp())
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", sweep_then_flock)

    result = store.put(DATA)

    assert sweeps, "the sweep did not run inside the write"
    assert result.written
    store.verify(DIGEST)
