"""Cases C01 and C02: a writer killed mid-save, a full disk, and a complete temp
file that was never renamed. The killed writer is a real child process, stopped
with SIGKILL from a fault hook at an exact step of the blob protocol; the store
is then judged through `ckpt`, as an operator would."""

import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cas import BlobStoreIOError, hash_bytes
from ledger import Store
from ledger.cli import main

# Saves e1, then e2 with three new tensors; when the temp file of e2's second
# tensor blob is open, writes half its bytes into it and dies by SIGKILL.
C01_WRITER = """
import os, signal, sys
from pathlib import Path
import torch
from cas import hash_bytes
from ledger import Store

store_path = Path(sys.argv[1])
e2 = {
    "a": torch.full((4096,), 1.0),
    "b": torch.full((4096,), 2.0),
    "c": torch.full((4096,), 3.0),
}
data = {hash_bytes(t.numpy().tobytes()): t.numpy().tobytes() for t in e2.values()}
opened = []

def hook(step, digest):
    if step != "tmp_open" or digest not in data:
        return
    opened.append(digest)
    if len(opened) == 2:
        (tmp,) = (store_path / "tmp").glob(digest[:16] + "*")
        with open(tmp, "r+b") as f:
            f.write(data[digest][: len(data[digest]) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

run = Store(store_path, hook=hook).run("r")
run.save({"w": torch.arange(4096, dtype=torch.float32)}, epoch=1)
run.save(e2, epoch=2)
sys.exit(3)
"""

# Saves e1..e6, then dies by SIGKILL once e7's tensor is written and fsync'd to
# its temp file, before the rename: a complete temp file that is no blob.
C02_WRITER = """
import os, signal, sys
import torch
from cas import hash_bytes
from ledger import Store

e7 = torch.full((4096,), 7.0)
digest = hash_bytes(e7.numpy().tobytes())

def hook(step, written):
    if step == "fsync" and written == digest:
        os.kill(os.getpid(), signal.SIGKILL)

run = Store(sys.argv[1], hook=hook).run("r")
for epoch in range(1, 7):
    run.save({"w": torch.full((4096,), float(epoch))}, epoch=epoch)
run.save({"w": e7}, epoch=7)
sys.exit(3)
"""


def _kill_a_writer(script: str, store_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", script, str(store_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr


@pytest.fixture(scope="module")
def c01_crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store_path = tmp_path_factory.mktemp("c01") / "store"
    _kill_a_writer(C01_WRITER, store_path)
    return store_path


@pytest.fixture
def c01_store(c01_crashed: Path, tmp_path: Path) -> Path:
    """A private copy of the store the killed writer left (each test may change it)."""
    copy = tmp_path / "store"
    shutil.copytree(c01_crashed, copy)
    return copy


@pytest.fixture
def ckpt(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    def call(store_path: Path, *args: str) -> tuple[int, str]:
        code = main(["--store", str(store_path), *args])
        return code, capsys.readouterr().out

    return call


def _blob_files(store_path: Path) -> list[Path]:
    return [p for p in (store_path / "blobs").rglob("*") if p.is_file()]


def test_c01_sigkill_mid_blob_leaves_only_blobs_that_hash_to_their_names(
    c01_store: Path,
) -> None:
    blobs = _blob_files(c01_store)

    names_and_hashes = [(p.name, hash_bytes(p.read_bytes())) for p in blobs]

    assert len(blobs) == 3  # e1's tensor and manifest, e2's first tensor
    assert all(name == digest for name, digest in names_and_hashes)
    leftovers = list((c01_store / "tmp").iterdir())
    assert len(leftovers) == 1
    assert leftovers[0].stat().st_size == 4096 * 4 // 2


def test_c01_after_sigkill_there_is_no_e2_and_auto_resumes_e1(
    c01_store: Path,
) -> None:
    with Store(c01_store) as store:
        run = store.run("r")
        saves = [ev.epoch for ev in run.history("save")]

        resumed = run.resume("auto")

    assert saves == [1]
    assert resumed is not None and resumed.epoch == 1
    assert torch.equal(resumed.state["w"], torch.arange(4096, dtype=torch.float32))


def test_c01_after_sigkill_verify_exits_0_and_gc_removes_the_half_written_file(
    c01_store: Path, ckpt: Callable[..., tuple[int, str]]
) -> None:
    verified, _ = ckpt(c01_store, "verify")

    collected, report = ckpt(c01_store, "gc")

    assert verified == 0
    assert collected == 0
    assert "1 temp files (8.0 KiB)" in report
    assert list((c01_store / "tmp").iterdir()) == []
    assert ckpt(c01_store, "verify")[0] == 0


def test_c01_enospc_raises_one_clear_error_and_the_store_works_once_space_is_freed(
    tmp_path: Path, ckpt: Callable[..., tuple[int, str]]
) -> None:
    disk = {"full": False}

    def hook(step: str, detail: str) -> None:
        if step == "write" and disk["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = Store(tmp_path / "store", hook=hook)
    run = store.run("r")
    run.save({"w": torch.zeros(64)}, epoch=1)
    e2 = {name: torch.full((64,), value) for name, value in (("a", 1.0), ("b", 2.0))}
    disk["full"] = True

    with pytest.raises(BlobStoreIOError) as refused:
        run.save(e2, epoch=2)
    disk["full"] = False
    retried = run.save(e2, epoch=2)

    assert refused.value.errno == errno.ENOSPC
    message = str(refused.value)
    assert "\n" not in message
    assert "No space left on device" in message and "nothing was committed" in message
    assert retried is not None
    assert [ev.epoch for ev in run.history("save")] == [1, 2]
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    store.close()
    assert ckpt(tmp_path / "store", "verify")[0] == 0


def test_c02_a_complete_unrenamed_temp_file_is_never_a_candidate_nor_an_error(
    tmp_path: Path, ckpt: Callable[..., tuple[int, str]]
) -> None:
    store_path = tmp_path / "store"
    _kill_a_writer(C02_WRITER, store_path)
    (leftover,) = (store_path / "tmp").iterdir()
    e7 = torch.full((4096,), 7.0)
    e7_digest = hash_bytes(e7.numpy().tobytes())

    with Store(store_path) as store:
        run = store.run("r")
        resumed = run.resume("auto")
        same = run.save({"w": e7}, epoch=7)
        other = run.save({"w": e7 + 1}, epoch=7)
        assert same is not None and other is not None
        loaded = (run.load(same.seq)["w"], run.load(other.seq)["w"])
        blob = store.blobs.path_of(e7_digest)

    assert leftover.name.startswith(e7_digest[:16])
    assert hash_bytes(leftover.read_bytes()) == e7_digest
    assert resumed is not None and resumed.epoch == 6
    assert same.manifest != other.manifest
    assert hash_bytes(blob.read_bytes()) == e7_digest
    assert torch.equal(loaded[0], e7) and torch.equal(loaded[1], e7 + 1)
    assert ckpt(store_path, "verify")[0] == 0
    assert ckpt(store_path, "gc")[0] == 0
    assert not leftover.exists()
