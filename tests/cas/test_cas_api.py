"""The public surface of `cas`: the names it exports and its exception tree."""

import errno
import pickle
from pathlib import Path

import cas
from cas import (
    BlobStoreIOError,
    CasError,
    CorruptBlobError,
    DigestMismatchError,
    MissingBlobError,
    UnreadableBlobError,
)

DIGEST = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_all_lists_exactly_the_public_names():
    expected = {
        "DIGEST_HEX_LEN",
        "BlobInfo",
        "BlobStore",
        "BlobStoreIOError",
        "CasError",
        "CorruptBlobError",
        "DigestMismatchError",
        "MissingBlobError",
        "PutResult",
        "UnreadableBlobError",
        "check_digest",
        "hash_bytes",
    }

    exported = set(cas.__all__)

    assert exported == expected
    assert len(cas.__all__) == len(exported)
    assert all(hasattr(cas, name) for name in cas.__all__)


def test_public_names_are_documented():
    undocumented = [
        name
        for name in cas.__all__
        if callable(getattr(cas, name)) and not getattr(cas, name).__doc__
    ]

    assert undocumented == []


def test_missing_blob_error_is_a_key_error_that_names_the_digest_and_path():
    error = MissingBlobError(DIGEST, Path("blobs/af") / DIGEST)

    message = str(error)

    assert isinstance(error, CasError)
    assert isinstance(error, KeyError)
    assert DIGEST in message
    assert str(Path("blobs/af") / DIGEST) in message
    assert "ckpt verify" in message


def test_corrupt_blob_error_message_gives_cause_place_and_remedy():
    error = CorruptBlobError(DIGEST, Path("blobs/af") / DIGEST, "hash mismatch")

    message = str(error)

    assert isinstance(error, CasError)
    assert (error.digest, error.reason) == (DIGEST, "hash mismatch")
    assert "hash mismatch" in message
    assert str(Path("blobs/af") / DIGEST) in message
    assert "ckpt verify" in message


def test_blob_store_io_error_is_an_os_error_with_the_cause_errno():
    cause = OSError(errno.ENOSPC, "No space left on device")

    error = BlobStoreIOError("write", Path("tmp/x.tmp"), cause)

    assert isinstance(error, CasError)
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert str(error).startswith("could not write tmp/x.tmp: No space left")
    assert "\n" not in str(error)


def test_unreadable_blob_error_is_damage_that_names_the_os_reason():
    cause = OSError(errno.EIO, "Input/output error")

    error = UnreadableBlobError(DIGEST, Path("blobs/af") / DIGEST, cause)

    assert isinstance(error, CorruptBlobError)
    assert error.cause is cause
    assert "Input/output error" in str(error)
    assert "ckpt verify" in str(error)
    assert "\n" not in str(error)


def test_errors_survive_pickling_with_their_fields():
    errors = [
        UnreadableBlobError(DIGEST, Path("b"), OSError(errno.EACCES, "denied")),
        DigestMismatchError(DIGEST, "0" * 64),
    ]

    copies = [pickle.loads(pickle.dumps(e)) for e in errors]

    assert [str(c) for c in copies] == [str(e) for e in errors]


def test_digest_mismatch_error_is_a_value_error_naming_both_digests():
    error = DigestMismatchError(DIGEST, "0" * 64)

    assert isinstance(error, CasError)
    assert isinstance(error, ValueError)
    assert DIGEST in str(error) and "0" * 64 in str(error)
    assert "\n" not in str(error)
