"""Writing blobs: digests, layout, idempotence, and refusal of hostile digests."""

import os
import stat
import tempfile

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas import BlobStore, DigestMismatchError, PutResult, hash_bytes

DATA = b"the quick brown fox jumps over the lazy dog"
DATA_DIGEST = blake3.blake3(DATA).hexdigest()


def blob_files(store):
    return sorted(p for p in store.blobs_dir.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda d: memoryview(bytearray(d))],
    ids=["bytes", "bytearray", "memoryview", "bytearray-view"],
)
def test_put_of_any_bytes_like_returns_its_digest_and_size(store, wrap):
    data = wrap(DATA)

    result = store.put(data)

    assert result == PutResult(DATA_DIGEST, len(DATA), written=True)
    assert store.get(result.digest) == DATA


def test_put_reads_a_numpy_array_through_its_memory(store):
    array = np.arange(24, dtype=np.float32).reshape(4, 6)

    result = store.put(memoryview(array))

    assert result.digest == blake3.blake3(array.tobytes()).hexdigest()
    assert result.size == array.nbytes
    assert store.get(result.digest) == array.tobytes()


def test_put_refuses_a_non_contiguous_buffer_before_writing(store):
    array = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]

    with pytest.raises(ValueError, match="C-contiguous"):
        store.put(memoryview(array))

    assert not store.root.exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.arange(24, dtype=np.int16).reshape(4, 6)),
        lambda: memoryview(bytes(range(64)))[::2],
    ],
    ids=["fortran-ordered-array", "strided-memoryview"],
)
def test_put_of_a_non_contiguous_buffer_says_it_must_be_c_contiguous(store, make):
    data = make()

    with pytest.raises(ValueError, match="C-contiguous") as caught:
        store.put(data)

    assert "\n" not in str(caught.value)
    assert not store.root.exists()


def test_put_refuses_bytes_that_do_not_hash_to_the_given_digest(store):
    wrong = "0" * 64

    with pytest.raises(DigestMismatchError) as caught:
        store.put(b"evil", digest=wrong)

    assert caught.value.expected == wrong
    assert caught.value.actual == hash_bytes(b"evil")
    assert "\n" not in str(caught.value)
    assert not store.has_blob(wrong)
    assert os.listdir(store.tmp_dir) == []


@pytest.mark.parametrize(
    ("size", "direct"),
    [(100, True), (3 << 20, True), ((3 << 20) + 5, False)],
    ids=["small", "large", "large-without-o-direct"],
)
def test_put_refuses_a_buffer_changed_between_hashing_and_writing(size, direct):
    # The hook runs once the temp file is open, after the digest was taken:
    # the moment another thread may still be updating a tensor.
    array = np.zeros(size, dtype=np.uint8)
    digest = hash_bytes(array)

    def mutate(step, _digest):
        if step == "tmp_open":
            array[size // 2] = 1

    with tempfile.TemporaryDirectory() as root:
        store = BlobStore(root, hook=mutate)
        store._direct_ok = direct  # as on a filesystem that refuses O_DIRECT

        with pytest.raises(DigestMismatchError, match="changed while being written"):
            store.put(array, digest=digest)

        assert not store.has_blob(digest)
        assert not store.has_blob(hash_bytes(array))
        assert os.listdir(store.tmp_dir) == []


def test_put_of_empty_bytes_stores_an_empty_blob(store):
    result = store.put(b"")

    assert result.size == 0
    assert store.has_blob(result.digest, size=0)
    assert store.get(result.digest) == b""


def test_put_writes_a_read_only_file_under_its_digest_shard(store):
    result = store.put(DATA)

    path = store.blobs_dir / DATA_DIGEST[:2] / DATA_DIGEST
    assert store.path_of(result.digest) == path
    assert blob_files(store) == [path]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert path.read_bytes() == DATA


def test_put_leaves_nothing_in_tmp(store):
    store.put(DATA)
    store.put(b"another blob")

    leftovers = list(store.tmp_dir.iterdir())

    assert leftovers == []


def test_second_put_of_the_same_bytes_writes_nothing(store):
    first = store.put(DATA)
    before = store.path_of(first.digest).stat()

    second = store.put(bytearray(DATA))

    after = store.path_of(first.digest).stat()
    assert second == PutResult(first.digest, first.size, written=False)
    assert len(blob_files(store)) == 1
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_put_rewrites_a_truncated_blob_and_it_then_verifies(store, truncate):
    digest = store.put(DATA).digest
    truncate(store.path_of(digest))
    assert not store.has_blob(digest, size=len(DATA))

    result = store.put(DATA)

    assert result.written
    store.verify(digest)
    assert store.has_blob(digest, size=len(DATA), verify=True)


def test_put_with_a_known_digest_stores_under_that_digest(store):
    result = store.put(DATA, digest=DATA_DIGEST)

    assert result.digest == DATA_DIGEST
    store.verify(DATA_DIGEST)


def test_put_without_dir_sync_is_readable_and_sync_dirs_accepts_it(store):
    results = [store.put(bytes([i]) * 10, sync_dir=False) for i in range(5)]

    store.sync_dirs(r.digest for r in results)

    assert all(store.get(r.digest) == bytes([i]) * 10 for i, r in enumerate(results))


HOSTILE_DIGESTS = [
    "../victim",
    "../../victim",
    DATA_DIGEST.upper(),
    DATA_DIGEST[:-1],
    DATA_DIGEST + "0",
    "..",
    "",
    DATA_DIGEST.encode(),
    int(DATA_DIGEST, 16),
]

DIGEST_METHODS = {
    "path_of": lambda s, d: s.path_of(d),
    "has_blob": lambda s, d: s.has_blob(d),
    "size_of": lambda s, d: s.size_of(d),
    "get": lambda s, d: s.get(d),
    "read_into": lambda s, d: s.read_into(d, bytearray(len(DATA))),
    "stream": lambda s, d: list(s.stream(d)),
    "verify": lambda s, d: s.verify(d),
    "delete": lambda s, d: s.delete(d),
    "put": lambda s, d: s.put(DATA, digest=d),
    "sync_dirs": lambda s, d: s.sync_dirs([d]),
}


@pytest.mark.parametrize("method", DIGEST_METHODS.values(), ids=DIGEST_METHODS)
@pytest.mark.parametrize("digest", HOSTILE_DIGESTS, ids=repr)
def test_every_method_refuses_an_invalid_digest_before_touching_files(
    tmp_path, method, digest
):
    victim = tmp_path / "victim"
    victim.write_bytes(DATA)
    store = BlobStore(tmp_path / "store")

    with pytest.raises(ValueError, match="invalid digest"):
        method(store, digest)

    assert not store.root.exists()
    assert victim.read_bytes() == DATA


def test_delete_refuses_an_uppercase_digest_and_keeps_the_blob(store):
    digest = store.put(DATA).digest

    with pytest.raises(ValueError):
        store.delete(digest.upper())

    assert store.has_blob(digest, size=len(DATA))


@settings(deadline=None)
@given(data=st.binary(max_size=4096))
def test_put_then_get_round_trips_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as root:
        store = BlobStore(root)

        first = store.put(data)
        second = store.put(data)

        assert first.digest == blake3.blake3(data).hexdigest() == hash_bytes(data)
        assert (first.written, second.written) == (True, False)
        assert store.get(first.digest) == data
        assert len(blob_files(store)) == 1
        assert os.listdir(store.tmp_dir) == []
