"""Digests: blake3-256 as 64 lowercase hex characters.

Every digest that enters the store from outside passes `check_digest` before a
path is built from it, so a hostile name cannot escape `blobs/`. Large buffers
are hashed on every core (blake3's own threads release the GIL); below
`_THREADED_MIN` the thread start-up costs more than it saves.
"""

from __future__ import annotations

import re

import blake3

DIGEST_HEX_LEN = 64
_HEX = re.compile(r"[0-9a-f]{64}")
_THREADED_MIN = 4 << 20


def check_digest(digest: object) -> str:
    """Return `digest` if it is 64 lowercase hex characters, else raise ValueError."""
    if not isinstance(digest, str) or _HEX.fullmatch(digest) is None:
        raise ValueError(
            f"invalid digest {digest!r}: expected {DIGEST_HEX_LEN} lowercase hex "
            "characters (a blake3-256 digest)"
        )
    return digest


Hasher = blake3.blake3


def new_hasher(size_hint: int = 0) -> Hasher:
    """A blake3 hasher, multithreaded when `size_hint` bytes justify it."""
    threads = blake3.blake3.AUTO if size_hint >= _THREADED_MIN else 1
    return blake3.blake3(max_threads=threads)


def hash_bytes(data: bytes | bytearray | memoryview, *, threaded: bool = True) -> str:
    """The blake3-256 hex digest of a bytes-like object, without copying it.

    `threaded=False` keeps a large buffer on the calling thread, for callers
    that already hash several buffers at once on a pool of their own.
    """
    view = memoryview(data).cast("B")
    hasher = new_hasher(view.nbytes if threaded else 0)
    hasher.update(view)
    return hasher.hexdigest()
