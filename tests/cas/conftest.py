"""Fixtures for the blob store tests: a fresh store and ways to damage its files.

Helpers are fixtures rather than importable functions so the tests run under
any pytest import mode.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cas import BlobStore


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store")


def _rewrite(path: Path, data: bytes) -> None:
    # Blob files are 0o444; a failing disk does not ask for permission.
    os.chmod(path, 0o644)
    path.write_bytes(data)
    os.chmod(path, 0o444)


def _flip_byte(path: Path, index: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0xFF
    _rewrite(path, bytes(data))


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    _rewrite(path, data[: len(data) // 2 if size is None else size])


@pytest.fixture
def flip_byte() -> Callable[..., None]:
    """Flip one byte of a file in place (the size stays the same)."""
    return _flip_byte


@pytest.fixture
def truncate() -> Callable[..., None]:
    """Cut a file to `size` bytes, half its length by default."""
    return _truncate
