"""What resume records: a deliberate fresh start, a refusal when every save
is damaged, and a changed config recorded before anything else is written."""

import warnings
from pathlib import Path

import pytest
import torch

from ledger import PolicyError, Store
from ledger._errors import LedgerStateError
from ledger._run import DamagedCheckpointWarning


def _saved_run(path: Path, saves: int = 2) -> None:
    with Store(path) as store:
        run = store.run("r", config={"lr": 0.1})
        for epoch in range(1, saves + 1):
            run.save({"w": torch.full((4,), float(epoch))}, epoch=epoch)


def test_resume_auto_refuses_when_every_save_is_damaged(tmp_path: Path) -> None:
    _saved_run(tmp_path / "s")
    with Store(tmp_path / "s") as store:
        for ev in store.events("r", kind="save"):
            store.blobs.path_of(ev.manifest or "").unlink()
        run = store.run("r", config={"lr": 0.1})
        events = len(run.history())

        with (
            warnings.catch_warnings(),
            pytest.raises(LedgerStateError, match="every save is damaged") as caught,
        ):
            warnings.simplefilter("ignore", DamagedCheckpointWarning)
            run.resume("auto")

        assert "#2" in str(caught.value) and "#3" in str(caught.value)
        assert 'resume("none")' in str(caught.value)
        assert len(run.history()) == events


def test_resume_none_on_a_run_with_saves_records_a_fresh_start(tmp_path: Path) -> None:
    _saved_run(tmp_path / "s")
    with Store(tmp_path / "s") as store:
        run = store.run("r", config={"lr": 0.1})

        resumed = run.resume("none")

        fresh = run.history("resume")[-1]
        assert resumed is None
        assert fresh.target is None and fresh.body["mode"] == "none"
        assert "provenance" in fresh.body
        assert store.verify() == []


@pytest.mark.parametrize("mode", ["none", "auto"])
def test_resume_on_a_run_without_saves_records_nothing(
    tmp_path: Path, mode: str
) -> None:
    with Store(tmp_path / "s") as store:
        run = store.run("r")

        resumed = run.resume(mode)

        assert resumed is None
        assert [ev.kind for ev in run.history()] == ["open"]


def test_a_save_under_a_changed_config_is_refused_until_a_resume_records_it(
    tmp_path: Path,
) -> None:
    _saved_run(tmp_path / "s")
    with Store(tmp_path / "s") as store:
        run = store.run("r", config={"lr": 0.2}, allow_config_change=True)
        events = len(run.history())

        with pytest.raises(PolicyError, match=r"changed config \(lr\)"):
            run.save({"w": torch.zeros(4)}, epoch=3)
        refused_events = len(run.history())
        run.resume("none")
        run.save({"w": torch.zeros(4)}, epoch=3)

        assert refused_events == events
        assert run.state().config_hash == run.config_hash
        assert store.verify() == []


def test_state_at_a_time_is_a_prefix_even_when_the_clock_stepped_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ledger._store as store_module

    stamps = iter(
        [
            "2026-01-01T00:00:01.000000Z",  # open
            "2026-01-01T00:00:05.000000Z",  # save e1
            "2026-01-01T00:00:03.000000Z",  # save e2: the clock stepped back
            "2026-01-01T00:00:09.000000Z",  # save e3
        ]
    )
    monkeypatch.setattr(store_module, "utc_now", lambda: next(stamps))
    with Store(tmp_path / "s") as store:
        run = store.run("r")
        for epoch in (1, 2, 3):
            run.save({"w": torch.full((2,), float(epoch))}, epoch=epoch)

        at_four = run.state(at="2026-01-01T00:00:04Z")
        at_two = run.state(at="2026-01-01T00:00:02Z")

    # open, e1 (stamped later) and e2: the prefix up to e2, e1 included
    assert at_four.seq == 3 and sorted(at_four.saves) == [2, 3]
    assert at_two.seq == 1 and not at_two.saves
