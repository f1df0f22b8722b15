"""Blobs the OS cannot read, and tensors changed while a save writes them.

An unreadable blob is damage like a corrupt one: `load` names it, and
`resume("auto")` warns and falls back. A tensor changed between hashing and
writing is refused, and the ledger is left as it was.
"""

import os
from pathlib import Path

import pytest
import torch

import ledger
from cas import DigestMismatchError, UnreadableBlobError
from ledger import Store


def _replace_with_directory(path: Path) -> None:
    os.chmod(path, 0o644)
    os.unlink(path)
    os.mkdir(path)


def _store_with_two_saves(path: Path) -> tuple[Store, ledger.Run, list[int]]:
    store = Store(path)
    run = store.run("unreadable")
    seqs = []
    for epoch in (1, 2):
        result = run.save({"w": torch.full((8,), float(epoch))}, epoch=epoch)
        assert result is not None
        seqs.append(result.seq)
    return store, run, seqs


def test_load_of_a_save_whose_manifest_is_unreadable_names_the_blob(
    tmp_path: Path,
) -> None:
    store, run, seqs = _store_with_two_saves(tmp_path / "store")
    manifest = store.event(seqs[1]).manifest or ""
    _replace_with_directory(store.blobs.path_of(manifest))

    with pytest.raises(UnreadableBlobError) as raised:
        run.load("last")

    assert raised.value.digest == manifest
    assert "ckpt verify" in str(raised.value)
    store.close()


def test_resume_auto_warns_about_an_unreadable_save_and_falls_back(
    tmp_path: Path,
) -> None:
    store, run, seqs = _store_with_two_saves(tmp_path / "store")
    _replace_with_directory(store.blobs.path_of(store.event(seqs[1]).manifest or ""))

    with pytest.warns(ledger.DamagedCheckpointWarning, match="unreadable"):
        resumed = run.resume("auto")

    assert resumed is not None and resumed.seq == seqs[0]
    assert torch.equal(resumed.state["w"], torch.full((8,), 1.0))
    store.close()


def test_save_of_a_tensor_changed_while_written_is_refused_and_records_nothing(
    tmp_path: Path,
) -> None:
    weights = torch.zeros(64)

    def change_weights(step: str, _detail: str) -> None:
        # Runs after the codec hashed the tensor, before its bytes are written.
        if step == "tmp_open":
            weights[0] = 1.0

    store = Store(tmp_path / "store", hook=change_weights)
    run = store.run("racy")
    events_before = len(store.events())

    with pytest.raises(DigestMismatchError, match="modified during the save"):
        run.save({"w": weights}, epoch=1)

    assert len(store.events()) == events_before
    assert run.state().last is None
    assert list(store.blobs.iter_blobs()) == []
    store.close()
