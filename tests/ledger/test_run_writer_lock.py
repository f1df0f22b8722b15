"""One writer per run: a second process cannot write to a run another process
is writing, while handles of one process share the run."""

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ledger import PolicyError, RunOptions, Store
from ledger._runlock import RunLockedError

_WRITER = textwrap.dedent(
    """
    import sys, torch
    from ledger import Store
    store = Store(sys.argv[1])
    store.run("r").save({"w": torch.zeros(2)}, epoch=1)
    print("saved", flush=True)
    sys.stdin.read()
    store.close()
    """
)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that has written run "r" and keeps its store open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "s")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
    yield proc
    proc.communicate("")


def _ledger_and_blobs(path: Path) -> tuple[bytes, list[Path]]:
    with Store(path) as store:
        rows = repr(store.db.rows("SELECT * FROM events")).encode()
    return rows, sorted((path / "blobs").rglob("*"))


def test_a_second_process_cannot_save_to_a_run_another_process_is_writing(
    tmp_path: Path, writer: subprocess.Popen[str]
) -> None:
    before = _ledger_and_blobs(tmp_path / "s")

    with Store(tmp_path / "s") as store:
        run = store.run("r")
        with pytest.raises(RunLockedError) as caught:
            run.save({"w": torch.ones(2)}, epoch=2)

    message = str(caught.value)
    assert "'r'" in message and f"pid {writer.pid}" in message
    assert "\n" not in message
    assert _ledger_and_blobs(tmp_path / "s") == before


def test_another_run_of_the_same_store_can_be_written_meanwhile(
    tmp_path: Path, writer: subprocess.Popen[str]
) -> None:
    with Store(tmp_path / "s") as store:
        saved = store.run("other").save({"w": torch.ones(2)}, epoch=1)

    assert saved is not None


def test_a_run_is_writable_again_once_its_writer_closed_the_store(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "s") as first:
        first.run("r").save({"w": torch.zeros(2)}, epoch=1)

    with Store(tmp_path / "s") as second:
        saved = second.run("r").save({"w": torch.ones(2)}, epoch=2)

    assert saved is not None


def test_two_handles_of_one_run_in_one_process_both_write(tmp_path: Path) -> None:
    first, second = Store(tmp_path / "s"), Store(tmp_path / "s")

    first.run("r").save({"w": torch.zeros(2)}, epoch=1)
    second.run("r").save({"w": torch.ones(2)}, epoch=2)
    first.close()
    second.run("r").save({"w": torch.full((2,), 2.0)}, epoch=3)

    assert second.run("r").state().last == 4
    second.close()


def test_the_lock_file_names_the_holder(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        store.run("r").save({"w": torch.zeros(2)}, epoch=1)

        (lock,) = (tmp_path / "s" / "locks").iterdir()
        assert f"pid {os.getpid()}" in lock.read_text()


def test_finalize_refuses_a_second_final_for_another_save(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r", options=RunOptions())
        first = run.save({"w": torch.zeros(2)}, epoch=1)
        run.save({"w": torch.ones(2)}, epoch=2)
        assert first is not None
        final = run.finalize(first.seq)
        events = len(run.history())

        again = run.finalize(first.seq)
        with pytest.raises(PolicyError, match="already has a final checkpoint"):
            run.finalize("last")

        assert again == final
        assert len(run.history()) == events
