"""Reading and writing a save's blobs: the memory loads land in, pooled hashing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

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
