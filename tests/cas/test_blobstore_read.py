"""Reading blobs: every read is hash-checked, and damage is named, not returned."""

import errno
import os
import stat

import numpy as np
import pytest

from cas import (
    CasError,
    CorruptBlobError,
    MissingBlobError,
    UnreadableBlobError,
    _blobstore,
)

DATA = bytes(range(256)) * 40


def test_get_returns_the_stored_bytes(store):
    digest = store.put(DATA).digest

    data = store.get(digest)

    assert data == DATA


def test_get_of_a_blob_with_a_flipped_byte_names_digest_path_and_remedy(
    store, flip_byte
):
    digest = store.put(DATA).digest
    path = store.path_of(digest)
    flip_byte(path, 1234)

    with pytest.raises(CorruptBlobError) as caught:
        store.get(digest)

    message = str(caught.value)
    assert (caught.value.digest, caught.value.path) == (digest, path)
    assert digest in message
    assert str(path) in message
    assert "ckpt verify" in message
    assert "\n" not in message


def test_get_of_a_truncated_blob_raises_corrupt_blob_error(store, truncate):
    digest = store.put(DATA).digest
    truncate(store.path_of(digest))

    with pytest.raises(CorruptBlobError, match=digest):
        store.get(digest)


def test_get_without_verify_returns_damaged_bytes_as_they_are(store, flip_byte):
    digest = store.put(DATA).digest
    flip_byte(store.path_of(digest), 0)

    data = store.get(digest, verify=False)

    assert data[1:] == DATA[1:]
    assert data[0] == DATA[0] ^ 0xFF


def test_get_of_a_deleted_blob_raises_missing_blob_error_a_key_error(store):
    digest = store.put(DATA).digest
    os.unlink(store.path_of(digest))

    with pytest.raises(KeyError) as caught:
        store.get(digest)

    assert isinstance(caught.value, MissingBlobError)
    assert isinstance(caught.value, CasError)
    assert caught.value.digest == digest
    assert digest in str(caught.value)


def test_stream_yields_the_blob_in_chunks(store):
    digest = store.put(DATA).digest

    chunks = list(store.stream(digest, chunk_size=1000))

    assert b"".join(chunks) == DATA
    assert [len(c) for c in chunks] == [1000] * 10 + [240]


def test_stream_of_a_damaged_blob_raises_only_after_the_last_chunk(store, flip_byte):
    digest = store.put(DATA).digest
    flip_byte(store.path_of(digest), len(DATA) - 1)
    received = bytearray()

    with pytest.raises(CorruptBlobError, match="hash mismatch"):
        for chunk in store.stream(digest, chunk_size=1000):
            received += chunk

    assert len(received) == len(DATA)


def test_stream_of_a_missing_blob_raises_missing_blob_error(store):
    digest = store.put(DATA).digest
    os.unlink(store.path_of(digest))

    with pytest.raises(MissingBlobError):
        next(store.stream(digest))


def test_read_into_fills_a_bytearray(store):
    digest = store.put(DATA).digest
    out = bytearray(len(DATA))

    store.read_into(digest, out)

    assert out == DATA


def test_read_into_fills_a_numpy_array_in_place(store):
    array = np.linspace(-1.0, 1.0, 640, dtype=np.float32).reshape(10, 64)
    digest = store.put(memoryview(array)).digest
    out = np.zeros_like(array)

    store.read_into(digest, memoryview(out))

    np.testing.assert_array_equal(out, array)


def test_read_into_a_buffer_of_the_wrong_size_raises_corrupt_blob_error(store):
    digest = store.put(DATA).digest
    out = bytearray(len(DATA) + 1)

    with pytest.raises(CorruptBlobError, match="size"):
        store.read_into(digest, out)


def test_has_blob_with_verify_counts_a_damaged_blob_as_absent(store, flip_byte):
    digest = store.put(DATA).digest
    flip_byte(store.path_of(digest))

    present = store.has_blob(digest, size=len(DATA))
    sound = store.has_blob(digest, size=len(DATA), verify=True)

    assert (present, sound) == (True, False)


def test_size_of_reports_the_blob_size_and_refuses_a_missing_blob(store):
    digest = store.put(DATA).digest
    other = store.put(b"x").digest
    store.delete(other)

    size = store.size_of(digest)

    assert size == len(DATA)
    with pytest.raises(MissingBlobError):
        store.size_of(other)


@pytest.fixture
def read_only_store(store):
    digests = [store.put(bytes([i]) * 100).digest for i in range(3)]
    tree = [store.root, *store.root.rglob("*")]
    for path in tree:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    yield store, digests
    for path in tree:
        if path.is_dir():
            os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP)


def test_a_read_only_store_can_still_be_read_and_verified(read_only_store):
    store, digests = read_only_store

    contents = [store.get(d) for d in digests]
    problems = store.verify_all()
    listed = {info.digest for info in store.iter_blobs()}

    assert contents == [bytes([i]) * 100 for i in range(3)]
    assert problems == []
    assert listed == set(digests)
    assert all(store.has_blob(d, size=100, verify=True) for d in digests)


def _replace_with_directory(path):
    os.chmod(path, 0o644)
    os.unlink(path)
    os.mkdir(path)


@pytest.mark.parametrize(
    "read",
    [
        lambda store, digest: store.get(digest),
        lambda store, digest: store.verify(digest),
        lambda store, digest: store.read_into(digest, bytearray(len(DATA))),
    ],
    ids=["get", "verify", "read_into"],
)
def test_a_blob_the_os_cannot_read_raises_unreadable_blob_error_naming_it(store, read):
    digest = store.put(DATA).digest
    path = store.path_of(digest)
    _replace_with_directory(path)

    with pytest.raises(UnreadableBlobError) as caught:
        read(store, digest)

    message = str(caught.value)
    assert isinstance(caught.value, CorruptBlobError)
    assert (caught.value.digest, caught.value.path) == (digest, path)
    assert isinstance(caught.value.cause, IsADirectoryError)
    assert "ckpt verify" in message
    assert "\n" not in message


def test_verify_all_reports_a_blob_the_os_cannot_read(store):
    digest = store.put(DATA).digest
    _replace_with_directory(store.path_of(digest))
    sound = store.put(b"sound").digest

    problems = store.verify_all()

    assert [p.digest for p in problems] == [digest]
    assert store.get(sound) == b"sound"


def test_an_io_error_while_reading_a_blob_names_the_blob_and_the_os_reason(
    store, monkeypatch
):
    digest = store.put(DATA).digest

    def failing_open(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_blobstore, "open", failing_open, raising=False)

    with pytest.raises(UnreadableBlobError, match="Input/output error") as caught:
        store.get(digest)

    assert caught.value.digest == digest
    assert caught.value.cause.errno == errno.EIO
