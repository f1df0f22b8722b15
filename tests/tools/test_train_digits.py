"""The two-stage digits training, run as users run it: in a subprocess.

A short recipe (4 pre-training epochs, 1 of warm-up) keeps each run to a few
seconds. The kill test holds the ledger's write lock while it counts the saves
and sends SIGKILL, so the training is always stopped mid-run, never after it.
"""

import errno
import fcntl
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ledger
from cas import BlobStoreIOError

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "train_digits.py"
PRETRAIN_EPOCHS = 4
PRETRAIN, FINETUNE = "digits-pretrain", "digits-finetune"


def _command(store: Path) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--store",
        str(store),
        "--seed",
        "7",
        "--pretrain-epochs",
        str(PRETRAIN_EPOCHS),
        "--warmup-epochs",
        "1",
    ]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CKPT_STORE"}


def _train(store: Path) -> str:
    done = subprocess.run(
        _command(store),
        cwd=store.parent,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _accuracy(output: str) -> float:
    found = re.search(r"^test accuracy: ([0-9.]+)", output, re.MULTILINE)
    assert found is not None, output
    return float(found.group(1))


def _saves(store: Path, run: str) -> list[tuple[int | None, str | None]]:
    with ledger.Store(store) as opened:
        return [(ev.epoch, ev.manifest) for ev in opened.events(run, kind="save")]


def _kill_after_saves(store: Path, saves: int, log: Path) -> int:
    """Start the training, SIGKILL it once `saves` pre-training saves are
    committed; return how many there were."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            _command(store), cwd=store.parent, env=_env(), stdout=out, stderr=out
        )
    while not (store / "ledger.db").exists():
        assert proc.poll() is None, log.read_text()
        time.sleep(0.01)
    reader = ledger.Store(store)
    lock = os.open(store / "ledger.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            # Holding the write lock, no save can commit between count and kill.
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                committed = len(reader.events(PRETRAIN, kind="save"))
                if committed >= saves:
                    proc.kill()
                    proc.wait()
                    return committed
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            assert proc.poll() is None, "training ended before it was killed"
            time.sleep(0.005)
    finally:
        os.close(lock)
        reader.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    return store, _train(store)


def test_training_completes_with_test_accuracy_above_chance(
    uninterrupted: tuple[Path, str],
) -> None:
    store, output = uninterrupted

    saves = _saves(store, PRETRAIN)

    assert _accuracy(output) > 0.5
    assert [epoch for epoch, _ in saves] == [1, 2, 3, 4]
    assert "frozen encoder: 6 tensors" in output
    assert "in 5 fine-tuning saves, stored once" in output


def test_finetuning_loads_the_pretraining_best_and_records_epoch_5_as_final(
    uninterrupted: tuple[Path, str],
) -> None:
    store, _ = uninterrupted

    with ledger.Store(store) as opened:
        pre, tuned = opened.get_run(PRETRAIN), opened.get_run(FINETUNE)
        best_seq, state = pre.state().best, tuned.state()
        best = pre.load("best")["model"]["encoder"]
        final = tuned.load("final")["model"]["encoder"]

    assert state.epoch_of(state.final) == 5
    assert tuned.config["pretrain_best_save"] == best_seq
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_rerun_of_a_finished_training_prints_results_again_and_writes_nothing(
    uninterrupted: tuple[Path, str],
) -> None:
    store, first = uninterrupted
    with ledger.Store(store) as opened:
        before = len(opened.events())

    again = _train(store)

    with ledger.Store(store) as opened:
        assert len(opened.events()) == before
    assert f"{PRETRAIN}: finished earlier" in again
    assert _accuracy(again) == _accuracy(first)


def test_training_killed_mid_run_resumes_and_matches_an_uninterrupted_run(
    uninterrupted: tuple[Path, str], tmp_path: Path
) -> None:
    reference, reference_output = uninterrupted
    store = tmp_path / "store"
    killed_at = _kill_after_saves(store, 2, tmp_path / "killed.log")

    output = _train(store)

    assert 2 <= killed_at < PRETRAIN_EPOCHS
    with ledger.Store(store) as opened:
        resumes = opened.events(PRETRAIN, kind="resume")
        ours = opened.get_run(PRETRAIN).load("final")["model"]["encoder"]
    with ledger.Store(reference) as opened:
        theirs = opened.get_run(PRETRAIN).load("final")["model"]["encoder"]
    assert [ev.epoch for ev in resumes] == [killed_at]
    assert f"epoch {killed_at:3d}/{PRETRAIN_EPOCHS}" not in output
    assert _saves(store, PRETRAIN) == _saves(reference, PRETRAIN)
    assert _saves(store, FINETUNE) == _saves(reference, FINETUNE)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert _accuracy(output) == _accuracy(reference_output)


def test_exported_training_checkpoint_loads_with_plain_torch_load(
    uninterrupted: tuple[Path, str], tmp_path: Path
) -> None:
    store, _ = uninterrupted
    out = tmp_path / "last.pt"

    exported = _ckpt(store, "export", f"{PRETRAIN}@last", "-o", str(out))
    reimported = _ckpt(
        tmp_path / "other", "import", str(out), "--run", "back", "--epoch", "4"
    )

    assert exported.returncode == 0, exported.stderr
    assert torch.load(out)["rng"]["numpy"]["bit_generator"] == "MT19937"
    assert reimported.returncode == 0, reimported.stderr


def test_training_model_exports_to_safetensors_with_the_key_the_refusal_hints(
    uninterrupted: tuple[Path, str], tmp_path: Path
) -> None:
    store, _ = uninterrupted
    out = tmp_path / "encoder.safetensors"
    refused = _ckpt(store, "export", f"{PRETRAIN}@best", "-o", str(out))
    hinted = refused.stderr.split("--key ")[1].split(",")[0].strip()

    exported = _ckpt(
        store, "export", f"{PRETRAIN}@best", "-o", str(out), "--key", hinted
    )

    assert refused.returncode == 2 and hinted == "model.encoder"
    assert exported.returncode == 0, exported.stderr
    assert len(load_file(out)) == 6


@pytest.mark.parametrize("seed", ["-1", str(2**32), "seven"])
def test_a_seed_numpy_cannot_take_is_an_argument_error(
    tmp_path: Path, seed: str
) -> None:
    command = [sys.executable, str(SCRIPT), "--store", str(tmp_path / "s")]

    done = subprocess.run(
        [*command, "--seed", seed], capture_output=True, text=True, check=False
    )

    assert done.returncode == 2
    assert "argument --seed" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()


def test_a_damaged_checkpoint_ends_the_training_in_one_error_line(
    uninterrupted: tuple[Path, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(uninterrupted[0], store)
    for blob in (store / "blobs").rglob("*"):
        if blob.is_file():
            blob.chmod(0o644)
            blob.write_bytes(b"damaged")

    done = subprocess.run(
        _command(store),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 1
    assert done.stderr.startswith("error: blob ") and "corrupt" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def _ckpt(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "_ckpt_entry", "--store", str(store), *args],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_full_disk_ends_the_training_in_one_error_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_digits", script)
    spec.loader.exec_module(script)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write_fails(*args: object) -> None:
        raise BlobStoreIOError("write", tmp_path / "store" / "tmp" / "x", full)

    monkeypatch.setattr(script, "pretrain", write_fails)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    code = script.main(["--store", str(tmp_path / "store")])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: could not write") and "No space left" in err
    assert err.count("\n") == 1
