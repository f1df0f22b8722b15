"""Odd and out-of-range inputs are refused with one clear error, and nothing is
written; numpy integers count as ints."""

import math
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ledger import BestPolicy, Contract, PolicyError, RunOptions, Store, rankme
from ledger._errors import UnknownReferenceError
from ledger.cli import main


def _events(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path / "ledger.db")
    try:
        return conn.execute("SELECT seq, kind, target FROM events").fetchall()
    finally:
        conn.close()


def test_rankme_of_embeddings_holding_nan_is_nan() -> None:
    z = torch.eye(4)
    z[1, 2] = math.nan

    value = rankme(z)

    assert math.isnan(value)


@pytest.mark.parametrize("eps", [0.0, -1e-7, math.nan])
def test_rankme_refuses_an_eps_that_is_not_positive(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        rankme(torch.eye(3), eps=eps)


def test_a_contract_checks_both_spellings_of_a_key() -> None:
    contract = Contract("c", {"model.dim": 1024})

    found = contract.mismatches({"model.dim": 1024, "model": {"dim": 512}})

    assert found == ["model.dim is 512, must be 1024"]


@pytest.mark.parametrize(
    "build",
    [
        lambda: RunOptions(final_epoch=2**64),
        lambda: RunOptions(keep_last=10**30),
        lambda: BestPolicy("m", start_epoch=2**70),
        lambda: BestPolicy("m", warmup_epochs=2**63),
        lambda: BestPolicy("m", warmup_epochs=5, start_epoch=3),
    ],
)
def test_options_out_of_range_or_contradictory_are_refused_when_built(
    build: Callable[[], object],
) -> None:
    with pytest.raises(PolicyError):
        build()


@pytest.mark.parametrize("ref", [2**63, 2**70, "¹", "٣", "٣٣"])
def test_resolve_knows_only_ascii_event_numbers_in_range(
    tmp_path: Path, ref: int | str
) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r")
        run.save({"w": torch.zeros(2)}, epoch=1)

        with pytest.raises(UnknownReferenceError):
            run.resolve(ref)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"lr": math.nan}, "lr"),
        ({"opt": {"betas": [0.9, math.inf]}}, "opt.betas.1"),
        ({"name": "a\ud800b"}, "name"),
    ],
)
def test_a_config_with_nan_or_a_lone_surrogate_is_refused_naming_the_key(
    tmp_path: Path, config: dict[str, Any], key: str
) -> None:
    with Store(tmp_path / "s") as store:
        with pytest.raises(PolicyError, match=f"config key {key} "):
            store.run("r", config=config)

        assert store.runs() == []


def test_numpy_integers_are_accepted_as_epoch_and_step(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r")

        run.save({"w": torch.zeros(2)}, epoch=np.int64(3), step=np.int32(7))

        saved = run.history("save")[0]
    assert (saved.epoch, saved.step) == (3, 7)
    assert type(saved.epoch) is int


def test_show_at_an_event_number_beyond_64_bits_is_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Store(tmp_path / "s") as store:
        store.run("a")

    code = main(["--store", str(tmp_path / "s"), "show", "a", "--at", "9" * 20])

    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_step_only_save_is_refused_when_promotion_waits_for_warm_up(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r", options=RunOptions(best=BestPolicy("m", start_epoch=3)))
        before = _events(tmp_path / "s")

        with pytest.raises(PolicyError, match="pass epoch="):
            run.save({"w": torch.zeros(2)}, step=100, metrics={"m": 1.0})

        assert _events(tmp_path / "s") == before


def test_a_step_only_save_is_promoted_when_promotion_starts_at_epoch_1(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r", options=RunOptions(best=BestPolicy("m")))

        saved = run.save({"w": torch.zeros(2)}, step=100, metrics={"m": 1.0})

    assert saved is not None and saved.promoted


@pytest.mark.parametrize("role", ["last", "best", "final", "resumed-from"])
def test_expire_refuses_the_last_best_final_and_resumed_from_saves(
    tmp_path: Path, role: str
) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r", options=RunOptions(best=BestPolicy("m", "min")))
        first = run.save({"w": torch.zeros(2)}, epoch=1, metrics={"m": 1.0})
        second = run.save({"w": torch.ones(2)}, epoch=2, metrics={"m": 2.0})
        third = run.save({"w": torch.ones(3)}, epoch=3, metrics={"m": 3.0})
        assert first and second and third
        target = {"last": third, "best": first}.get(role, second).seq
        if role == "final":
            run.finalize(target)
        if role == "resumed-from":
            run.resume(target)
        before = _events(tmp_path / "s")

        with pytest.raises(PolicyError, match=role):
            run.expire(target)

        assert _events(tmp_path / "s") == before
