"""Upkeep of a store: listing, deleting, verifying everything, sweeping tmp/."""

import fcntl
import os

from cas import BlobStore, CorruptBlobError

BLOBS = [b"alpha", b"beta" * 100, b"gamma" * 1000]


def test_iter_blobs_lists_each_blob_with_its_size_and_mtime(store):
    digests = [store.put(data).digest for data in BLOBS]

    infos = sorted(store.iter_blobs(), key=lambda info: digests.index(info.digest))

    assert [info.digest for info in infos] == digests
    assert [info.size for info in infos] == [len(data) for data in BLOBS]
    assert [info.mtime for info in infos] == [
        store.path_of(d).stat().st_mtime for d in digests
    ]


def test_iter_blobs_skips_files_whose_names_are_not_digests(store):
    digest = store.put(b"kept").digest
    shard = store.path_of(digest).parent
    strays = [
        store.blobs_dir / "README",
        shard / "notes.txt",
        shard / (digest + ".tmp"),
        shard / digest.upper(),
        shard / (digest[:2] + "z" * 62),
        store.blobs_dir / "zz" / ("zz" + digest[2:]),
        store.blobs_dir / "abc" / ("abc" + digest[3:]),
        store.blobs_dir / ("00" if digest[:2] != "00" else "11") / digest,
    ]
    for stray in strays:
        stray.parent.mkdir(exist_ok=True)
        stray.write_bytes(b"stray")

    listed = [info.digest for info in store.iter_blobs()]

    assert listed == [digest]


def test_iter_blobs_of_an_empty_store_yields_nothing(tmp_path):
    store = BlobStore(tmp_path / "never-written")

    listed = list(store.iter_blobs())

    assert listed == []
    assert not store.root.exists()


def test_delete_returns_the_bytes_freed_and_zero_when_absent(store):
    digest = store.put(BLOBS[2]).digest

    freed = store.delete(digest)
    freed_again = store.delete(digest)

    assert (freed, freed_again) == (len(BLOBS[2]), 0)
    assert not store.has_blob(digest)


def test_delete_leaves_other_blobs_alone(store):
    kept, gone = (store.put(data).digest for data in BLOBS[:2])

    store.delete(gone)

    assert [info.digest for info in store.iter_blobs()] == [kept]


def test_verify_all_returns_each_damaged_blob_and_reports_progress(
    store, flip_byte, truncate
):
    sound, flipped, cut = (store.put(data).digest for data in BLOBS)
    flip_byte(store.path_of(flipped))
    truncate(store.path_of(cut))
    calls = []

    problems = store.verify_all(progress=lambda *call: calls.append(call))

    assert all(isinstance(p, CorruptBlobError) for p in problems)
    assert {p.digest for p in problems} == {flipped, cut}
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert sound not in {p.digest for p in problems}


def test_verify_all_of_a_sound_store_finds_nothing(store):
    for data in BLOBS:
        store.put(data)

    problems = store.verify_all()

    assert problems == []


def leftover(store, name="0123456789abcdef.host.999.deadbeef.tmp", size=100):
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    path = store.tmp_dir / name
    path.write_bytes(b"\0" * size)
    return path


def test_sweep_tmp_removes_the_leftover_of_a_dead_writer(store):
    store.put(b"a blob, so the layout exists")
    path = leftover(store, size=123)

    swept = store.sweep_tmp()

    assert swept == (1, 123)
    assert not path.exists()


def test_sweep_tmp_keeps_a_file_whose_writer_holds_its_lock(store):
    path = leftover(store)
    fd = os.open(path, os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        swept_while_locked = store.sweep_tmp()
        still_there = path.exists()
    finally:
        os.close(fd)

    swept_after = store.sweep_tmp()

    assert swept_while_locked == (0, 0)
    assert still_there
    assert swept_after == (1, 100)


def test_sweep_tmp_spares_files_younger_than_asked(store):
    young, old = leftover(store, "young.tmp"), leftover(store, "old.tmp", size=7)
    an_hour_ago = young.stat().st_mtime - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    swept = store.sweep_tmp(older_than=600)

    assert swept == (1, 7)
    assert young.exists()
    assert not old.exists()


def test_sweep_tmp_leaves_blobs_alone(store):
    digests = [store.put(data).digest for data in BLOBS]
    leftover(store)

    store.sweep_tmp()

    assert all(store.has_blob(d, verify=True) for d in digests)


def test_sweep_tmp_of_a_store_never_written_removes_nothing(tmp_path):
    store = BlobStore(tmp_path / "never-written")

    swept = store.sweep_tmp()

    assert swept == (0, 0)
    assert not store.root.exists()


def test_sweep_tmp_survives_a_stray_directory_in_tmp(store):
    store.put(b"a blob, so the layout exists")
    (store.tmp_dir / "stray-directory").mkdir()
    path = leftover(store)

    store.sweep_tmp()

    assert not path.exists()
