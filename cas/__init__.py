"""cas: a content-addressed blob store named by blake3 digests.

Knows nothing about checkpoints: it stores bytes durably and answers for them.
"""

from cas._blobstore import BlobInfo, BlobStore, PutResult
from cas._digest import DIGEST_HEX_LEN, check_digest, hash_bytes
from cas._errors import (
    BlobStoreIOError,
    CasError,
    CorruptBlobError,
    DigestMismatchError,
    MissingBlobError,
    UnreadableBlobError,
)

__all__ = [
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
]
