"""Whatever float a watched metric takes, the ledger's hash chain verifies."""

import math
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import BestPolicy, RunOptions, Store
from ledger._run import MetricWarning


def _verify_after_saving(value: float) -> list[object]:
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s") as store:
        run = store.run("r", options=RunOptions(best=BestPolicy("m", "max")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            run.save({"w": torch.zeros(2)}, epoch=1, metrics={"m": value})
            run.save({"w": torch.ones(2)}, epoch=2, metrics={"m": value})
        return list(store.verify())


def test_a_watched_metric_of_negative_zero_leaves_verify_clean() -> None:
    problems = _verify_after_saving(-0.0)

    assert problems == []


def test_the_save_body_keeps_the_sign_of_a_negative_zero_metric(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r", options=RunOptions(best=BestPolicy("m", "max")))

        run.save({"w": torch.zeros(2)}, epoch=1, metrics={"m": -0.0})

        saved = store.events("r", kind="save")[0]
    assert math.copysign(1.0, saved.metrics["m"]) == -1.0
    assert saved.value == 0.0


@settings(max_examples=40, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True))
def test_any_float_metric_value_leaves_verify_clean(value: float) -> None:
    problems = _verify_after_saving(value)

    assert problems == []
