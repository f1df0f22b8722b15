"""Reading and writing a save's blobs: the memory loads land in, pooled hashing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ledger._codec as codec
from cas import hash_bytes
from ledger import Store
from ledger._blobio import tensor_buffer
from ledger._codec import encode


def test_large_buffers_are_tensor_memory_and_small_ones_bytearrays() -> None:
    large = tensor_buffer(4 << 20)
    small = tensor_buffer(100)

    assert isinstance(large, np.ndarray) and large.nbytes == 4 << 20
    assert large.flags.writeable and large.dtype == np.uint8
    assert isinstance(small, bytearray) and len(small) == 100


def test_large_loaded_tensor_is_writable_and_outlives_the_store(
    tmp_path: Path,
) -> None:
    weight = torch.randn(1024, 1024)  # 4 MiB: loaded into unfilled tensor memory
    table = np.arange(1 << 20, dtype=np.int64)
    with Store(tmp_path / "store") as store:
        run = store.run("r")
        run.save({"w": weight, "t": table})
        loaded = run.load("last")

    loaded["w"].mul_(2)
    loaded["t"][0] = -1

    assert torch.equal(loaded["w"], weight * 2)
    assert loaded["t"][0] == -1 and np.array_equal(loaded["t"][1:], table[1:])
    with Store(tmp_path / "store") as store:
        again = store.get_run("r").load("last")
    assert torch.equal(again["w"], weight) and np.array_equal(again["t"], table)


def test_pooled_digests_match_hashing_each_tensor_alone() -> None:
    tensors = {f"t{i}": torch.randn(1 << (15 + i % 4)) for i in range(12)}
    tensors["small"] = torch.arange(3)

    encoded = encode(tensors)

    expected = {hash_bytes(t.numpy().tobytes()) for t in tensors.values()}
    assert set(encoded.blobs) == expected
    assert all(hash_bytes(v) == d for d, v in encoded.blobs.items())


def test_a_save_from_an_atexit_hook_is_written_although_pools_refuse_work(
    tmp_path: Path,
) -> None:
    # Once the interpreter starts exiting, thread pools refuse new work; a save
    # registered with atexit (a common "save on the way out") must not fail.
    script = f"""
import atexit, torch
from ledger import Store
run = Store({str(tmp_path / "store")!r}).run("r")
weights = {{"w": torch.ones(1 << 20), "b": torch.zeros(1 << 19), "n": torch.ones(8)}}
atexit.register(lambda: run.save(weights, epoch=1))
"""

    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )

    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    with Store(tmp_path / "store") as store:
        loaded = store.get_run("r").load("last")
        assert store.verify() == []
    assert torch.equal(loaded["w"], torch.ones(1 << 20))
    assert torch.equal(loaded["b"], torch.zeros(1 << 19))


def test_a_tensor_repeated_in_a_checkpoint_is_copied_and_hashed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def counting_hash(data: memoryview, *, threaded: bool = True) -> str:
        calls.append(data.nbytes)
        return hash_bytes(data, threaded=threaded)

    monkeypatch.setattr(codec, "hash_bytes", counting_hash)
    transposed = torch.randn(512, 512).t()  # 1 MiB, needs a contiguous copy

    encoded = encode({"w": [transposed] * 16, "head": transposed})

    assert calls == [transposed.nbytes]
    assert list(encoded.blobs) == [hash_bytes(transposed.contiguous().numpy())]


def test_a_conjugate_view_is_not_taken_for_the_tensor_it_views(
    tmp_path: Path,
) -> None:
    c = torch.randn(300_000, dtype=torch.complex64)  # pooled: 2.4 MB

    with Store(tmp_path / "store") as store:
        run = store.run("r")
        loaded = run.load(run.save({"c": c, "conj": c.conj()}).seq)

    assert torch.equal(loaded["c"], c)
    assert torch.equal(loaded["conj"], c.conj().resolve_conj())


def test_sub_byte_dtypes_save_strided_and_non_contiguous(tmp_path: Path) -> None:
    raw = torch.arange(6, dtype=torch.uint8)
    bits = raw.view(torch.uint1)  # a placeholder dtype: torch cannot copy it
    checkpoint = {"one": bits[::2][:1], "transposed": bits.reshape(3, 2).t()}

    with Store(tmp_path / "store") as store:
        run = store.run("r")
        loaded = run.load(run.save(checkpoint).seq)

    assert loaded["one"].dtype == torch.uint1
    assert loaded["one"].view(torch.uint8).tolist() == [0]
    assert loaded["transposed"].view(torch.uint8).tolist() == [[0, 2, 4], [1, 3, 5]]
