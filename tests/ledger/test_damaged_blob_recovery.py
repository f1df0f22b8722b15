"""A resumed run that redoes an epoch heals the blob that made it fall back.

Presence is judged by size, so a damaged blob of the right size would be
trusted by the next save of the same bytes. `resume("auto")` therefore moves a
damaged blob into `quarantine/` when it falls back, and the redone save
writes it anew; a directory squatting on a blob's name is moved the same way.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cas import BlobStore, hash_bytes
from ledger import DamagedCheckpointWarning, Store


def _flip_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _replace_with_directory(path: Path) -> None:
    os.chmod(path, 0o644)
    path.unlink()
    path.mkdir()


def _tensor(epoch: int) -> torch.Tensor:
    return torch.arange(4096, dtype=torch.float32) * epoch


@pytest.mark.parametrize("damage", [_flip_byte, _replace_with_directory])
def test_redone_save_after_auto_fallback_rewrites_the_damaged_blob(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("heal")
    run.save({"w": _tensor(1)}, epoch=1)
    run.save({"w": _tensor(2)}, epoch=2)
    blob = store.blobs.path_of(hash_bytes(_tensor(2).numpy().tobytes()))
    damage(blob)

    with pytest.warns(DamagedCheckpointWarning, match="epoch 2"):
        resumed = run.resume("auto")
    redone = run.save({"w": _tensor(2)}, epoch=2)

    assert resumed is not None and resumed.epoch == 1
    assert redone is not None
    assert blob.is_file()
    assert len(list((tmp_path / "store" / "quarantine").iterdir())) == 1
    assert store.verify() == []
    assert torch.equal(run.load("last")["w"], _tensor(2))
    store.close()


def test_put_moves_a_directory_squatting_on_the_blob_name(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest = hash_bytes(b"payload")
    blobs.path_of(digest).mkdir(parents=True)

    result = blobs.put(b"payload")

    assert result.written
    assert blobs.get(digest) == b"payload"
