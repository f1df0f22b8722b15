"""Shared case C03: resuming when the newest save's blobs are damaged.

Resolution reads events only; the damage is found when the checkpoint is read.
`last` must then fail naming the blob, and `auto` must warn and fall back.
"""

import os
from pathlib import Path

import pytest
import torch

import ledger
from cas import CorruptBlobError, MissingBlobError
from ledger import Store


def _store_with_four_saves(path: Path) -> tuple[Store, ledger.Run, list[int]]:
    store = Store(path)
    run = store.run("c03")
    seqs = []
    for epoch in (1, 2, 3, 4):
        result = run.save(
            {"w": torch.full((16,), float(epoch)), "epoch": epoch}, epoch=epoch
        )
        assert result is not None
        seqs.append(result.seq)
    return store, run, seqs


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_c03_resume_last_names_the_corrupt_manifest_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store, run, seqs = _store_with_four_saves(tmp_path / "store")
    manifest = store.event(seqs[3]).manifest or ""
    _flip_one_byte(store.blobs.path_of(manifest))
    events_before = len(store.events())

    with pytest.raises(CorruptBlobError) as raised:
        run.resume("last")

    assert manifest in str(raised.value) and "ckpt verify" in str(raised.value)
    assert len(store.events()) == events_before
    store.close()


def test_c03_resume_auto_warns_about_e4_and_falls_back_to_e3(tmp_path: Path) -> None:
    store, run, seqs = _store_with_four_saves(tmp_path / "store")
    _flip_one_byte(store.blobs.path_of(store.event(seqs[3]).manifest or ""))

    with pytest.warns(ledger.DamagedCheckpointWarning, match="epoch 4") as caught:
        resumed = run.resume("auto")

    assert len(caught) == 1 and f"#{seqs[3]}" in str(caught[0].message)
    assert resumed is not None and resumed.seq == seqs[2] and resumed.epoch == 3
    assert torch.equal(resumed.state["w"], torch.full((16,), 3.0))
    resume = run.history("resume")
    assert [ev.target for ev in resume] == [seqs[2]]
    assert run.state().last == seqs[3]
    store.close()


def test_c03_damaged_tensor_blob_is_caught_like_a_damaged_manifest(
    tmp_path: Path,
) -> None:
    store, run, seqs = _store_with_four_saves(tmp_path / "store")
    manifest = store.event(seqs[3]).manifest
    tensor = store.db.rows(
        "SELECT digest FROM refs WHERE seq = ? AND digest != ?", [seqs[3], manifest]
    )[0]["digest"]
    _flip_one_byte(store.blobs.path_of(tensor))

    with pytest.raises(CorruptBlobError, match=tensor):
        run.resume("last")
    with pytest.warns(ledger.DamagedCheckpointWarning, match="epoch 4"):
        resumed = run.resume("auto")

    assert resumed is not None and resumed.epoch == 3
    store.close()


def test_c03_auto_skips_a_missing_blob_too(tmp_path: Path) -> None:
    store, run, seqs = _store_with_four_saves(tmp_path / "store")
    store.blobs.path_of(store.event(seqs[3]).manifest or "").unlink()

    with pytest.raises(MissingBlobError):
        run.resume("last")
    with pytest.warns(ledger.DamagedCheckpointWarning, match="epoch 4"):
        resumed = run.resume("auto")

    assert resumed is not None and resumed.epoch == 3
    store.close()


def test_c03_resolution_uses_events_only(tmp_path: Path) -> None:
    store, run, seqs = _store_with_four_saves(tmp_path / "store")
    _flip_one_byte(store.blobs.path_of(store.event(seqs[3]).manifest or ""))

    resolved = run.resolve("last")

    assert resolved.seq == seqs[3] and resolved.epoch == 4
    assert [p.seq for p in store.verify()] == [seqs[3]]
    store.close()
