"""Shared cases C04-C08 and C11 (shared/cases/README.md): best, order, retention.

Each test restates one case's input and checks its right answer through the
public API; C06 kills a real writer process with SIGKILL, since what is tested
is that the best survives in the ledger and nowhere else.
"""

import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ledger
from ledger import BestPolicy, RunOptions, Store


def _best_epochs_after_each_save(
    run: ledger.Run, values: list[Any]
) -> list[int | None]:
    out = []
    for epoch, value in enumerate(values, start=1):
        metrics = {} if value is None else {"m": value}
        weights = {"w": torch.tensor([float(epoch)])}
        if value is None or not math.isfinite(value):
            with pytest.warns(ledger.MetricWarning, match=f"epoch {epoch}:"):
                run.save(weights, epoch=epoch, metrics=metrics)
        else:
            run.save(weights, epoch=epoch, metrics=metrics)
        state = run.state()
        out.append(state.epoch_of(state.best))
    return out


def test_c04_best_is_strict_improvement_from_the_start_epoch(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run(
        "first", options=RunOptions(best=BestPolicy("m", mode="min", start_epoch=2))
    )

    bests = _best_epochs_after_each_save(run, [0.90, 0.80, math.nan, 0.70, 0.70, 0.65])

    assert bests == [None, 2, 2, 4, 4, 6]
    saves = run.history("save")
    assert len(saves) == 6 and math.isnan(saves[2].metrics["m"])
    assert [ev.epoch for ev in run.history("promote")] == [2, 4, 6]
    store.close()


def test_c04_nan_first_is_never_the_value_to_beat(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run(
        "second", options=RunOptions(best=BestPolicy("m", mode="max", start_epoch=1))
    )

    bests = _best_epochs_after_each_save(run, [math.nan, 0.40, 0.50])

    assert bests == [None, 2, 3]
    store.close()


def test_c04_minus_infinity_is_never_promoted_in_min_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run(
        "third", options=RunOptions(best=BestPolicy("m", mode="min", start_epoch=1))
    )

    bests = _best_epochs_after_each_save(run, [0.5, -math.inf, 0.6, 0.4])

    assert bests == [1, 1, 1, 4]
    assert run.state().best_value == 0.4
    assert run.history("save")[1].metrics["m"] == -math.inf
    store.close()


def _c05_run(tmp_path: Path) -> tuple[Store, ledger.Run]:
    store = Store(tmp_path / "store")
    return store, store.run(
        "seg", options=RunOptions(best=BestPolicy("val_iou", mode="max"))
    )


def test_c05_missing_and_nan_val_iou_are_saved_with_one_warning_each(
    tmp_path: Path,
) -> None:
    store, run = _c05_run(tmp_path)
    bests = []

    run.save({"w": torch.full((2,), 1.0)}, epoch=1, metrics={"val_iou": 0.2})
    bests.append(run.state().epoch_of(run.state().best))
    with pytest.warns(ledger.MetricWarning, match="epoch 2:") as second:
        run.save({"w": torch.full((2,), 2.0)}, epoch=2, metrics={})
    bests.append(run.state().epoch_of(run.state().best))
    with pytest.warns(ledger.MetricWarning, match="epoch 3:") as third:
        run.save({"w": torch.full((2,), 3.0)}, epoch=3, metrics={"val_iou": math.nan})
    bests.append(run.state().epoch_of(run.state().best))
    run.save({"w": torch.full((2,), 4.0)}, epoch=4, metrics={"val_iou": 0.3})
    bests.append(run.state().epoch_of(run.state().best))

    assert (len(second), len(third)) == (1, 1)
    assert bests == [1, 1, 1, 4]
    saves = run.history("save")
    assert [ev.epoch for ev in saves] == [1, 2, 3, 4]
    assert run.state().last == saves[-1].seq
    store.close()


@pytest.mark.parametrize(
    ("value", "type_name"),
    [("0.4", "str"), (torch.tensor([0.5, 0.6]), "Tensor of 2 element")],
)
def test_c05_string_or_two_value_tensor_is_refused_and_nothing_written(
    tmp_path: Path, value: Any, type_name: str
) -> None:
    store, run = _c05_run(tmp_path)
    for epoch, iou in [(1, 0.2), (4, 0.3)]:
        run.save(
            {"w": torch.full((2,), float(epoch))}, epoch=epoch, metrics={"val_iou": iou}
        )
    before = (len(store.events()), sorted((store.path / "blobs").rglob("*")))

    with pytest.raises(ledger.MetricError) as raised:
        run.save({"w": torch.full((2,), 5.0)}, epoch=5, metrics={"val_iou": value})

    assert "'val_iou'" in str(raised.value) and type_name in str(raised.value)
    assert (len(store.events()), sorted((store.path / "blobs").rglob("*"))) == before
    store.close()


@pytest.mark.parametrize(
    "value", [torch.tensor(0.9), np.float64(0.9), np.float32(0.9), np.int64(1)]
)
def test_c05_zero_dim_tensor_and_numpy_scalar_count_as_numbers(
    tmp_path: Path, value: Any
) -> None:
    store, run = _c05_run(tmp_path)
    run.save({"w": torch.zeros(1)}, epoch=1, metrics={"val_iou": 0.2})

    result = run.save({"w": torch.ones(1)}, epoch=2, metrics={"val_iou": value})

    assert result is not None and result.promoted
    assert run.state().best_value == pytest.approx(float(value))
    store.close()


_C06_FIRST_PROCESS = """
import os, signal, sys, torch
from ledger import BestPolicy, RunOptions, Store

store = Store(sys.argv[1])
run = store.run("c06", config={"lr": 0.1},
                options=RunOptions(best=BestPolicy("loss", mode="min")))
for epoch, loss in [(1, 0.50), (2, 0.30), (3, 0.40)]:
    run.save({"w": torch.full((3,), float(epoch))}, epoch=epoch,
             metrics={"loss": loss})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_c06_best_after_a_killed_process_comes_from_the_ledger(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    first = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_C06_FIRST_PROCESS), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr
    store = Store(path)
    run = store.run(
        "c06",
        config={"lr": 0.1},
        options=RunOptions(best=BestPolicy("loss", mode="min")),
    )
    e2 = run.state().best
    assert run.state().epoch_of(e2) == 2
    e2_files = {p: p.read_bytes() for p in _blob_files_of(store, e2)}

    resumed = run.resume("last")
    for epoch, loss in [(4, 0.45), (5, 0.35)]:
        run.save(
            {"w": torch.full((3,), float(epoch))}, epoch=epoch, metrics={"loss": loss}
        )

    assert resumed is not None and resumed.epoch == 3
    assert run.state().best == e2 and run.state().best_value == 0.30
    after_resume = [ev for ev in run.history() if ev.seq > (resumed.resume_event or 0)]
    assert [ev.kind for ev in after_resume] == ["save", "save"]
    assert {p: p.read_bytes() for p in e2_files} == e2_files
    assert torch.equal(run.load("best")["w"], torch.full((3,), 2.0))
    store.close()


def _blob_files_of(store: Store, seq: int | None) -> list[Path]:
    rows = store.db.rows("SELECT digest FROM refs WHERE seq = ?", [seq])
    return [store.blobs.path_of(r["digest"]) for r in rows]


@pytest.mark.parametrize(
    "steps",
    [[9000, 9500, 10000, 10500], [900, 9500, 10000, 10500], [10500, 900, 10000, 9500]],
)
def test_c07_order_comes_from_the_ledger_never_from_step_numbers(
    tmp_path: Path, steps: list[int]
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("steps", options=RunOptions(keep_last=2))

    seqs = []
    for step in steps:
        result = run.save({"step": torch.tensor(step)}, step=step)
        assert result is not None
        seqs.append(result.seq)
    resumed = run.resume("last")

    state = run.state()
    assert state.last == seqs[-1] and state.saves[state.last].step == steps[-1]
    assert resumed is not None and resumed.step == steps[-1]
    assert int(resumed.state["step"]) == steps[-1]
    assert sorted(state.live) == seqs[-2:]
    assert [ev.target for ev in run.history("expire")] == seqs[:2]
    store.close()


def test_c07_last_is_the_newest_save_even_when_its_epoch_is_smaller(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("branch")
    for epoch in (1, 2, 3, 4):
        run.save({"e": torch.tensor(epoch)}, epoch=epoch)
    run.resume(run.history("save")[1].seq)

    newest = run.save({"e": torch.tensor(30)}, epoch=3)

    assert newest is not None and run.state().last == newest.seq
    assert int(run.load("last")["e"]) == 30
    store.close()


def test_c08_last_and_best_are_derived_apart_and_both_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    options = RunOptions(best=BestPolicy("loss", mode="min"), keep_last=1)
    run = store.run("c08", options=options)
    seqs = []
    for epoch, loss in [(1, 0.50), (2, 0.60), (3, 0.70)]:
        result = run.save(
            {"w": torch.full((2,), float(epoch))}, epoch=epoch, metrics={"loss": loss}
        )
        assert result is not None
        seqs.append(result.seq)

    resumed = run.resume("last")
    report = store.gc(grace=0)

    state = run.state()
    assert (state.last, state.best) == (seqs[2], seqs[0])
    assert resumed is not None and resumed.epoch == 3
    assert sorted(state.live) == [seqs[0], seqs[2]]
    assert report.ok and report.blobs_removed > 0
    assert torch.equal(run.load("best")["w"], torch.full((2,), 1.0))
    assert torch.equal(run.load("last")["w"], torch.full((2,), 3.0))
    assert store.verify() == []
    store.close()


def test_c11_keep_last_two_and_best_with_gc_after_every_save(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    options = RunOptions(best=BestPolicy("loss", mode="min"), keep_last=2)
    run = store.run("c11", options=options)
    shared = torch.arange(64.0)
    seqs = []

    for epoch, loss in [(1, 0.90), (2, 0.50), (3, 0.60), (4, 0.70), (5, 0.80)]:
        checkpoint = {"backbone": shared, "head": torch.full((8,), float(epoch))}
        result = run.save(checkpoint, epoch=epoch, metrics={"loss": loss})
        assert result is not None
        seqs.append(result.seq)
        assert store.gc(grace=0).ok

    state = run.state()
    e1, e2, e3, e4, e5 = seqs
    assert sorted(state.live) == [e2, e4, e5]
    assert (state.best, state.last) == (e2, e5)
    assert sorted(ev.target for ev in run.history("expire")) == [e1, e3]
    live_digests = {r["digest"] for s in (e2, e4, e5) for r in _refs(store, s)}
    for gone in (e1, e3):
        unique = {r["digest"] for r in _refs(store, gone)} - live_digests
        assert unique and not any(store.blobs.has_blob(d) for d in unique)
    backbone = {r["digest"] for r in _refs(store, e1) if r["size"] == shared.nbytes}
    assert len(backbone) == 1 and store.blobs.has_blob(backbone.pop())
    for seq in (e2, e4, e5):
        assert torch.equal(run.load(seq)["backbone"], shared)
    assert store.verify() == []
    store.close()


def _refs(store: Store, seq: int) -> list[dict[str, Any]]:
    return store.db.rows("SELECT digest, size FROM refs WHERE seq = ?", [seq])


def test_c11_retention_never_expires_a_save_a_resume_came_from(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("c11r", options=RunOptions(keep_last=1))
    first = run.save({"w": torch.zeros(1)}, epoch=1)
    run.resume("last")

    for epoch in (2, 3):
        run.save({"w": torch.full((1,), float(epoch))}, epoch=epoch)

    assert first is not None and first.seq in run.state().live
    assert len(run.state().live) == 2
    store.close()


def test_c11_invalid_retention_is_refused_when_the_run_is_opened(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")

    for keep_last in (0, -2, 1.5, "2"):
        with pytest.raises(ledger.PolicyError, match="keep_last must be an int >= 1"):
            store.run("r", options=RunOptions(keep_last=keep_last))  # type: ignore[arg-type]

    assert store.runs() == [] and store.events() == []
    store.close()
