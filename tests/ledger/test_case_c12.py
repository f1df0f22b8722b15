"""Case C12: gc with a zero grace period runs while a save is between writing
its blobs and committing its event.

The interleaving is forced, never slept into: process A's hook runs B's gc at
the chosen step (B is a second Store on the same directory, with its own lock
file descriptor, so the ledger's flock excludes the two as it would two
processes). Then two real processes play the race at least 200 times.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from cas import hash_bytes
from ledger import RunOptions, Store

STEPS = [
    "leased",
    "tmp_open",
    "write",
    "fsync",
    "rename",
    "dir_fsync",
    "blobs_written",
    "committed",
]


def _digest(tensor: torch.Tensor) -> str:
    return hash_bytes(tensor.numpy().tobytes())


def _gc_at(step: str, sweeper: Store, reports: list) -> Callable[[str, str], None]:
    def hook(current: str, detail: str) -> None:
        if current == step:
            reports.append(sweeper.gc(grace=0))

    return hook


def test_c12_gc_before_commit_keeps_blob_of_inflight_save(tmp_path: Path) -> None:
    path = tmp_path / "store"
    process_b = Store(path)
    reports: list = []
    process_a = Store(path, hook=_gc_at("blobs_written", process_b, reports))
    run = process_a.run("a")
    blob_d = torch.arange(256, dtype=torch.float32)

    saved = run.save({"d": blob_d}, epoch=1)

    assert len(reports) == 1 and reports[0].ok
    assert reports[0].blobs_removed == 0 and reports[0].leased_blobs == 2
    assert process_a.blobs.has_blob(_digest(blob_d), verify=True)
    assert saved is not None and run.state().last == saved.seq
    assert process_b.verify() == []
    assert torch.equal(run.load("last")["d"], blob_d)
    process_a.close()
    process_b.close()


def test_c12_gc_keeps_an_old_unreferenced_blob_a_save_found_present(
    tmp_path: Path,
) -> None:
    # D is garbage by every measure but one: the save about to reference it
    # found it present (so did not write it) and holds a lease on it.
    path = tmp_path / "store"
    process_b = Store(path)
    blob_d = torch.arange(256, dtype=torch.float32)
    digest = process_b.blobs.put(blob_d.numpy().tobytes()).digest
    then = time.time() - 86400
    os.utime(process_b.blobs.path_of(digest), (then, then))
    reports: list = []
    process_a = Store(path, hook=_gc_at("blobs_written", process_b, reports))

    saved = process_a.run("a").save({"d": blob_d}, epoch=1)

    assert saved is not None and saved.bytes_written < blob_d.nbytes
    assert reports[0].blobs_removed == 0
    assert process_a.blobs.has_blob(digest, verify=True)
    assert process_b.verify() == []
    process_a.close()
    process_b.close()


@pytest.mark.parametrize("step", STEPS)
def test_c12_gc_at_any_step_of_a_save_removes_nothing_it_needs(
    tmp_path: Path, step: str
) -> None:
    path = tmp_path / "store"
    process_b = Store(path)
    reports: list = []
    process_a = Store(path, hook=_gc_at(step, process_b, reports))
    run = process_a.run("a", options=RunOptions(keep_last=1))
    run.save({"kept": torch.ones(64), "old": torch.zeros(64)}, epoch=1)

    saved = run.save({"kept": torch.ones(64), "new": torch.full((64,), 2.0)}, epoch=2)

    assert reports and all(r.ok for r in reports)
    assert saved is not None and saved.expired
    assert process_b.verify() == []
    assert torch.equal(run.load("last")["new"], torch.full((64,), 2.0))
    process_a.close()
    process_b.close()


_PROCESS_A = """
import sys
import torch
from ledger import RunOptions, Store

def hold_before_commit(step, detail):
    if step == "blobs_written":
        print("ready", flush=True)
        if sys.stdin.readline() != "go\\n":
            raise SystemExit("process A: expected go")

store = Store(sys.argv[1], hook=hold_before_commit)
run = store.run("c12", options=RunOptions(keep_last=1))
while line := sys.stdin.readline():
    i = int(line.split()[1])
    # A fresh blob, and the fresh blob of save i-2: expired by now, unreferenced,
    # present, so this save finds it and only leases it.
    checkpoint = {"fresh": torch.full((256,), float(i)),
                  "old": torch.full((256,), float(i - 2))}
    saved = run.save(checkpoint, epoch=i + 1)
    print("saved", saved.seq, saved.bytes_written, flush=True)
"""

_PROCESS_B = """
import json, sys
from ledger import Store

store = Store(sys.argv[1])
while sys.stdin.readline():
    r = store.gc(grace=0)
    print(json.dumps({"ok": r.ok, "removed": r.blobs_removed,
                      "leased": r.leased_blobs}), flush=True)
"""


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the race is about ordering, not
    durability, and 200 rounds of fsyncs on a busy disk would take minutes."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        where = Path(tempfile.mkdtemp(dir=shm))
        yield where
        shutil.rmtree(where)
    else:
        yield tmp_path


def _spawn(script: str, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _say(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline()


def _hear(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline()


def _stop(proc: subprocess.Popen[str]) -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    code = proc.wait()
    proc.stdout.close()
    return code


def test_c12_race_between_two_real_processes_200_times(fast_dir: Path) -> None:
    path = fast_dir / "store"
    Store(path).close()
    process_a = _spawn(_PROCESS_A, path)
    process_b = _spawn(_PROCESS_B, path)
    checker = Store(path)
    rounds = []

    for i in range(200):
        ready = _say(process_a, f"save {i}")
        swept = json.loads(_say(process_b, "gc"))
        committed = _say(process_a, "go").split()
        rounds.append((ready, swept, committed[0], checker.verify()))
    codes = _stop(process_a), _stop(process_b)

    assert codes == (0, 0)
    assert all(ready == "ready\n" for ready, _, _, _ in rounds)
    assert all(swept["ok"] and swept["leased"] >= 2 for _, swept, _, _ in rounds)
    assert all(saved == "saved" for _, _, saved, _ in rounds)
    assert all(problems == [] for _, _, _, problems in rounds)
    # gc really swept every round: the manifest of the save expired last time.
    assert sum(swept["removed"] for _, swept, _, _ in rounds) >= 199
    assert len(checker.events("c12", kind="save")) == 200
    assert checker.verify() == []
    checker.close()
