"""The exception tree of the blob store.

CasError
 +-- MissingBlobError (also KeyError)
 +-- CorruptBlobError
 |    +-- UnreadableBlobError: the OS refused to read it (EIO, EACCES, a
 |                             directory in its place): damage all the same
 +-- DigestMismatchError (also ValueError): bytes written do not hash to the
 |                                          digest they were to be stored under
 +-- BlobStoreIOError (also OSError): a write or rename the OS refused
"""

from __future__ import annotations

import os
from pathlib import Path


class CasError(Exception):
    """Root of every error raised by `cas`."""


class MissingBlobError(CasError, KeyError):
    """No blob with this digest is in the store."""

    def __init__(self, digest: str, path: Path) -> None:
        self.digest = digest
        self.path = path
        super().__init__(digest)

    def __reduce__(self) -> tuple[type, tuple[str, Path]]:
        return (type(self), (self.digest, self.path))

    def __str__(self) -> str:
        return (
            f"blob {self.digest} is missing (expected at {self.path}): "
            "run `ckpt verify` to list what references it"
        )


class CorruptBlobError(CasError):
    """A blob's bytes do not hash to its name, or its size is wrong."""

    def __init__(self, digest: str, path: Path, reason: str) -> None:
        self.digest = digest
        self.path = path
        self.reason = reason
        super().__init__(
            f"blob {digest} is corrupt ({reason}) at {path}: run `ckpt verify` "
            "to list what references it"
        )

    def __reduce__(self) -> tuple[type, tuple[str, Path, str]]:
        return (type(self), (self.digest, self.path, self.reason))


class UnreadableBlobError(CorruptBlobError):
    """The operating system could not read a blob; readers treat it as damage."""

    def __init__(self, digest: str, path: Path, cause: OSError) -> None:
        self.cause = cause
        super().__init__(digest, path, f"unreadable: {_reason(cause)}")

    def __reduce__(self) -> tuple[type, tuple[str, Path, OSError]]:  # type: ignore[override]
        return (type(self), (self.digest, self.path, self.cause))


class DigestMismatchError(CasError, ValueError):
    """The bytes written for a blob do not hash to the digest it was put under."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"bytes changed while being written: expected digest {expected}, got "
            f"{actual}; the data was modified during the save (or the digest "
            "passed to put is wrong), nothing was stored"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.expected, self.actual))


class BlobStoreIOError(CasError, OSError):
    """The operating system refused a write (full disk, read-only store, ...)."""

    def __init__(self, action: str, path: Path, cause: OSError) -> None:
        self.action = action
        self.path = path
        self.cause = cause
        super().__init__(
            cause.errno,
            f"could not {action} {path}: {_reason(cause)}; "
            "nothing was committed, free space or fix permissions and retry",
        )

    def __reduce__(self) -> tuple[type, tuple[str, Path, OSError]]:
        return (type(self), (self.action, self.path, self.cause))

    def __str__(self) -> str:
        return str(self.args[1])


def _reason(cause: OSError) -> str:
    if cause.strerror:
        return cause.strerror
    if cause.errno:
        return os.strerror(cause.errno)
    return str(cause) or type(cause).__name__
