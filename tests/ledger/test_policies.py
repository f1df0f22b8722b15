"""Training policies through `Run.save`: best by strict improvement, warm-up,
non-finite and wrongly typed metrics, the final epoch, option checks, RankMe.

Every test drives the real ledger in a temporary store rather than calling the
policy objects alone, so what is checked is what a training script gets.
"""

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledger
from ledger import BestPolicy, RunOptions, Store


def _snapshot(store: Store) -> tuple[int, list[str], list[dict[str, Any]]]:
    files = sorted(
        str(p.relative_to(store.path))
        for sub in ("blobs", "tmp")
        for p in (store.path / sub).rglob("*")
        if p.is_file()
    )
    return len(store.events()), files, store.db.rows("SELECT * FROM leases")


def _weights(epoch: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(epoch)), "b": torch.arange(2) + epoch}


def _promoted_epochs(run: ledger.Run) -> list[int | None]:
    return [ev.epoch for ev in run.history("promote")]


def test_equal_value_never_promotes(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("acc", mode="max")))

    first = run.save(_weights(1), epoch=1, metrics={"acc": 0.5})
    tie = run.save(_weights(2), epoch=2, metrics={"acc": 0.5})

    assert first is not None and first.promoted
    assert tie is not None and not tie.promoted
    assert run.state().best == first.seq
    store.close()


def test_improvement_within_default_tolerance_does_not_promote(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("loss", mode="min")))
    run.save(_weights(1), epoch=1, metrics={"loss": 1.0})

    tiny = run.save(_weights(2), epoch=2, metrics={"loss": 1.0 - 5e-13})
    real = run.save(_weights(3), epoch=3, metrics={"loss": 1.0 - 1e-9})

    assert BestPolicy("loss").tolerance == 1e-12
    assert tiny is not None and not tiny.promoted
    assert real is not None and real.promoted
    assert _promoted_epochs(run) == [1, 3]
    store.close()


def test_warmup_of_five_epochs_makes_epoch_six_the_first_promotable(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    policy = BestPolicy("rankme", mode="max", warmup_epochs=5)
    run = store.run("r", options=RunOptions(best=policy))

    for epoch in range(1, 9):
        run.save(_weights(epoch), epoch=epoch, metrics={"rankme": float(epoch)})

    assert policy.first_epoch == 6
    assert _promoted_epochs(run) == [6, 7, 8]
    assert run.state().best_value == 8.0
    store.close()


def test_values_before_the_first_eligible_epoch_are_never_the_value_to_beat(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    run = store.run(
        "r", options=RunOptions(best=BestPolicy("loss", mode="min", start_epoch=3))
    )

    for epoch, loss in enumerate([0.1, 0.2, 0.9, 0.8], start=1):
        run.save(_weights(epoch), epoch=epoch, metrics={"loss": loss})

    assert _promoted_epochs(run) == [3, 4]
    assert run.state().best_value == 0.8
    store.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda: RunOptions(keep_last=0),
        lambda: RunOptions(keep_last=-1),
        lambda: RunOptions(keep_last=2.0),
        lambda: RunOptions(keep_last="2"),
        lambda: RunOptions(keep_last=True),
        lambda: RunOptions(final_epoch=0),
        lambda: RunOptions(final_epoch=4.5),
        lambda: RunOptions(on_nonfinite="ignore"),
        lambda: RunOptions(best="loss"),
        lambda: BestPolicy("loss", mode="avg"),
        lambda: BestPolicy(""),
        lambda: BestPolicy("loss", tolerance=-1e-3),
        lambda: BestPolicy("loss", tolerance=math.nan),
        lambda: BestPolicy("loss", tolerance=math.inf),
        lambda: BestPolicy("loss", warmup_epochs=-1),
        lambda: BestPolicy("loss", warmup_epochs=1.5),
        lambda: BestPolicy("loss", start_epoch=0),
    ],
)
def test_invalid_policy_settings_are_refused(make: Any) -> None:
    with pytest.raises(ledger.PolicyError, match="must"):
        make()


def test_options_of_another_type_are_refused_before_a_run_is_created(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")

    with pytest.raises(ledger.PolicyError, match="RunOptions"):
        store.run("r", options={"keep_last": 2})  # type: ignore[arg-type]

    assert store.runs() == []
    store.close()


_VALUES = st.one_of(
    st.none(),
    st.sampled_from([0.0, 0.5, 0.5 + 1e-13, 1.0, -1.0, math.nan, math.inf, -math.inf]),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
)
_SAVES = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(1, 8)), _VALUES),
    min_size=1,
    max_size=10,
)


def _reference_promotions(
    saves: list[tuple[int | None, float | int | None]],
    mode: str,
    first: int,
    tolerance: float,
) -> list[int]:
    """Indexes of the saves a strict-improvement policy promotes, by hand."""
    promoted = []
    best: float | None = None
    for index, (epoch, value) in enumerate(saves):
        if value is None or value != value or value in (math.inf, -math.inf):
            continue
        if epoch is not None and epoch < first:
            continue
        value = float(value)
        if best is None:
            better = True
        elif mode == "max":
            better = value > best + tolerance
        else:
            better = value < best - tolerance
        if better:
            best = value
            promoted.append(index)
    return promoted


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    saves=_SAVES,
    mode=st.sampled_from(["max", "min"]),
    first=st.integers(1, 6),
    by_warmup=st.booleans(),
    tolerance=st.sampled_from([0.0, 1e-12, 0.25]),
)
def test_promoted_saves_equal_a_reference_strict_improvement(
    tmp_path: Path,
    saves: list[tuple[int | None, float | int | None]],
    mode: str,
    first: int,
    by_warmup: bool,
    tolerance: float,
) -> None:
    policy = (
        BestPolicy("m", mode=mode, tolerance=tolerance, warmup_epochs=first - 1)
        if by_warmup
        else BestPolicy("m", mode=mode, tolerance=tolerance, start_epoch=first)
    )
    with Store(tmp_path / "store") as store:
        run = store.run(f"r{len(store.runs())}", options=RunOptions(best=policy))
        seqs = []

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch, value in saves:
                metrics = {} if value is None else {"m": value}
                if epoch is None and first > 1:
                    # Warm-up counts epochs: a step-only save is refused.
                    with pytest.raises(ledger.PolicyError, match="pass epoch="):
                        run.save({"x": torch.zeros(1)}, metrics=metrics)
                    continue
                result = run.save({"x": torch.zeros(1)}, epoch=epoch, metrics=metrics)
                assert result is not None
                seqs.append(result.seq)
        saves = [(e, v) for e, v in saves if e is not None or first == 1]
        if not saves:
            return

        expected = [
            seqs[i] for i in _reference_promotions(saves, mode, first, tolerance)
        ]
        assert [ev.target for ev in run.history("promote")] == expected
        assert run.state().best == (expected[-1] if expected else None)
        assert run.state().last == seqs[-1]
        unusable = sum(1 for _, v in saves if v is None or not math.isfinite(float(v)))
        assert sum(issubclass(w.category, ledger.MetricWarning) for w in caught) == (
            unusable
        )


@pytest.mark.parametrize(
    "metrics",
    [{}, {"acc": math.nan}, {"acc": math.inf}, {"acc": -math.inf}],
    ids=["missing", "nan", "inf", "-inf"],
)
def test_unusable_watched_metric_is_saved_with_one_warning_and_never_promoted(
    tmp_path: Path, metrics: dict[str, float]
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("acc", mode="max")))
    best = run.save(_weights(1), epoch=1, metrics={"acc": 0.5})
    assert best is not None

    with pytest.warns(ledger.MetricWarning, match="epoch 2") as caught:
        odd = run.save(_weights(2), epoch=2, metrics=metrics)
    after = run.save(_weights(3), epoch=3, metrics={"acc": 0.4})

    assert len(caught) == 1
    assert odd is not None and not odd.promoted
    assert after is not None and not after.promoted
    state = run.state()
    assert state.last == after.seq and odd.seq in state.saves
    assert state.best == best.seq and state.best_value == 0.5
    store.close()


def test_first_save_with_unusable_metric_is_not_the_value_to_beat(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("loss", mode="min")))

    with pytest.warns(ledger.MetricWarning, match="epoch 1"):
        run.save(_weights(1), epoch=1, metrics={"loss": -math.inf})
    worse = run.save(_weights(2), epoch=2, metrics={"loss": 3.0})

    assert worse is not None and worse.promoted
    assert run.state().best_value == 3.0
    store.close()


@pytest.mark.parametrize(
    "metrics",
    [{}, {"loss": math.nan}, {"loss": math.inf}],
    ids=["missing", "nan", "inf"],
)
def test_run_refusing_nonfinite_raises_and_writes_nothing(
    tmp_path: Path, metrics: dict[str, float]
) -> None:
    store = Store(tmp_path / "store")
    options = RunOptions(best=BestPolicy("loss", mode="min"), on_nonfinite="refuse")
    run = store.run("r", options=options)
    run.save(_weights(1), epoch=1, metrics={"loss": 1.0})
    before = _snapshot(store)

    with pytest.raises(ledger.MetricError, match=r"epoch 2: the watched metric 'loss'"):
        run.save(_weights(2), epoch=2, metrics=metrics)

    assert _snapshot(store) == before
    store.close()


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ("0.4", "str"),
        (torch.tensor([0.1, 0.2]), "Tensor of 2 element"),
        (np.array([0.1, 0.2]), "ndarray of 2 element"),
        (True, "bool"),
        (np.bool_(False), "bool"),
        (1 + 2j, "complex"),
        (np.complex128(1.0), "complex128"),
        (torch.tensor(1 + 1j), "dtype torch.complex"),
        (None, "NoneType"),
        ([0.5], "list"),
        (2**70, "int beyond 64 bits"),
    ],
)
def test_metric_of_wrong_type_is_refused_naming_metric_and_type(
    tmp_path: Path, value: Any, type_name: str
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("val_iou")))
    run.save(_weights(1), epoch=1, metrics={"val_iou": 0.1})
    before = _snapshot(store)

    with pytest.raises(ledger.MetricError) as raised:
        run.save(_weights(2), epoch=2, metrics={"val_iou": value})

    assert "'val_iou'" in str(raised.value) and type_name in str(raised.value)
    assert raised.value.metric == "val_iou"
    assert _snapshot(store) == before
    store.close()


def test_unwatched_metric_of_wrong_type_is_refused_too(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("loss", mode="min")))
    before = _snapshot(store)

    with pytest.raises(ledger.MetricError, match="'lr'.*str"):
        run.save(_weights(1), epoch=1, metrics={"loss": 1.0, "lr": "1e-3"})

    assert _snapshot(store) == before
    store.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2, 2.0),
        (2.5, 2.5),
        (np.float64(3.5), 3.5),
        (np.float32(4.5), 4.5),
        (np.int64(5), 5.0),
        (torch.tensor(6.5), 6.5),
        (torch.tensor(7), 7.0),
        (torch.tensor(8.5, dtype=torch.float64), 8.5),
        (np.array(9.5), 9.5),
    ],
)
def test_numbers_numpy_scalars_and_zero_dim_tensors_are_accepted(
    tmp_path: Path, value: Any, expected: float
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("score")))

    result = run.save(_weights(1), epoch=1, metrics={"score": value})

    assert result is not None and result.promoted
    assert run.state().best_value == expected
    assert run.history("save")[0].metrics == {"score": expected}
    store.close()


def test_finalize_at_another_epoch_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("ft", options=RunOptions(final_epoch=5, stage="finetune"))
    for epoch in range(1, 5):
        run.save(_weights(epoch), epoch=epoch)
    second = run.history("save")[1].seq
    before = _snapshot(store)

    with pytest.raises(ledger.PolicyError, match="epoch 5"):
        run.finalize("last")
    with pytest.raises(ledger.PolicyError, match="epoch 5"):
        run.finalize(second)

    assert _snapshot(store) == before
    assert run.state().final is None
    store.close()


def test_finalize_at_the_final_epoch_appends_a_final_event(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("ft", options=RunOptions(final_epoch=5))
    for epoch in range(1, 6):
        last = run.save(_weights(epoch), epoch=epoch)
    assert last is not None

    seq = run.finalize()

    final = store.event(seq or 0)
    assert final.kind == "final" and final.target == last.seq and final.epoch == 5
    assert run.state().final == last.seq
    assert torch.equal(run.load("final")["w"], _weights(5)["w"])
    store.close()


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_rankme_of_identity_is_its_size(k: int) -> None:
    assert ledger.rankme(torch.eye(k)) == pytest.approx(k, abs=1e-4)


def test_rankme_of_rank_one_matrix_is_one() -> None:
    u = torch.arange(1.0, 9.0).reshape(8, 1)
    v = torch.tensor([[0.5, -1.0, 2.0, 3.0]])

    assert ledger.rankme(u @ v) == pytest.approx(1.0, abs=1e-4)


def test_rankme_of_diag_3_1_matches_hand_computation() -> None:
    # Singular values 3 and 1 normalise to 3/4 and 1/4:
    # entropy = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351446, exp = 1.7547654.
    expected = 1.7547654

    value = ledger.rankme(np.diag([3.0, 1.0]))

    assert value == pytest.approx(expected, abs=1e-5)
