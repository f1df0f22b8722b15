"""Deduplication: identical bytes are stored once, across saves and runs.

Counts are of files under blobs/ and of `SaveResult.bytes_written`, the two
things a user pays for. A manifest changes whenever any tensor does, so a save
that changes one tensor costs exactly one tensor blob plus one manifest.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas import hash_bytes
from ledger import Run, Store


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    store = Store(tmp_path / "store")
    yield store.run("dedup")
    store.close()


def _blob_names(store: Store) -> set[str]:
    return {p.name for p in (store.path / "blobs").rglob("*") if p.is_file()}


def _digest(t: torch.Tensor) -> str:
    return hash_bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        "embed": torch.randn(50, 8),
        "proj": torch.randn(8, 8),
        "bias": torch.zeros(8),
        "table": torch.arange(100, dtype=torch.int64),
    }


def test_saving_the_same_structure_twice_writes_no_new_blob(run: Run) -> None:
    state = {"model": _model_state(0), "epoch": 1, "ids": np.arange(5)}
    first = run.save(state, epoch=1)
    files = _blob_names(run.store)

    second = run.save(state, epoch=2)

    assert second.bytes_written == 0
    assert second.manifest == first.manifest
    assert _blob_names(run.store) == files
    assert first.bytes_written == sum(run.store.blobs.size_of(name) for name in files)


def test_changing_one_tensor_writes_one_tensor_blob_and_one_manifest(
    run: Run,
) -> None:
    state = _model_state(0)
    first = run.save({"model": state}, epoch=1)
    before = _blob_names(run.store)
    changed = dict(state, proj=state["proj"] + 1)

    second = run.save({"model": changed}, epoch=2)

    new = _blob_names(run.store) - before
    assert new == {_digest(changed["proj"]), second.manifest}
    assert second.manifest != first.manifest
    manifest_size = run.store.blobs.size_of(second.manifest)
    assert second.bytes_written == changed["proj"].nbytes + manifest_size


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=6),
    which=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_each_changed_tensor_costs_one_blob_whatever_the_structure(
    sizes: list[int], which: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=generator, dtype=torch.float64) for n in sizes]
    which %= len(tensors)
    changed = list(tensors)
    changed[which] = -changed[which] - 1.0
    # A fresh store per example: a replayed example must not find its blobs.
    with tempfile.TemporaryDirectory() as folder, Store(folder) as store:
        run = store.run("property")
        run.save({"layers": tensors}, epoch=1)
        before = _blob_names(store)

        result = run.save({"layers": changed}, epoch=2)

        new = _blob_names(store) - before
    assert new == {_digest(changed[which]), result.manifest}


def test_identical_tensors_under_different_keys_are_stored_once(run: Run) -> None:
    a, b = torch.ones(32), torch.ones(32)
    assert a.data_ptr() != b.data_ptr()

    result = run.save({"a": a, "b": b, "view": torch.ones(64)[::2]})

    assert _blob_names(run.store) == {_digest(a), result.manifest}


def test_runs_in_one_store_share_the_blobs_of_identical_weights(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    backbone = _model_state(7)
    store.run("first").save({"model": backbone, "head": torch.zeros(4)}, epoch=1)
    before = _blob_names(store)

    second = store.run("second").save(
        {"model": backbone, "head": torch.ones(4)}, epoch=1
    )

    assert _blob_names(store) - before == {_digest(torch.ones(4)), second.manifest}
    store.close()


def test_a_numpy_array_and_a_tensor_with_the_same_bytes_share_a_blob(
    run: Run,
) -> None:
    values = np.arange(16, dtype=np.float32)

    result = run.save({"np": values, "torch": torch.from_numpy(values.copy())})

    assert _blob_names(run.store) == {hash_bytes(values.tobytes()), result.manifest}
