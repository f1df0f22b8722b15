"""The Run API a training script uses: contracts, config changes, load by
reference, resume modes, and refusals that leave the store as it was.

Each test opens a real store in a temporary directory; a reopened run is a new
`Store` object on the same path, as a restarted training process would make.
"""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import ledger
from ledger import SLIDE_ENCODER_CONTRACT, BestPolicy, Contract, RunOptions, Store


def _slide_encoder_config() -> dict[str, Any]:
    return {
        "model": {"slide_embedding_dim": 1024, "dna_input_dim": 1673},
        "pretrain": {"max_epochs": 101, "warmup_epochs": 5, "rankme_eps": 1e-7},
        "finetune": {"epochs": 5, "selection": "final epoch"},
        "seed": 0,
    }


def _snapshot(store: Store) -> tuple[int, list[str]]:
    files = sorted(str(p) for p in (store.path / "blobs").rglob("*") if p.is_file())
    return len(store.events()), files


def test_slide_encoder_contract_accepts_the_recipe_config(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")

    run = store.run(
        "pretrain", config=_slide_encoder_config(), contract=SLIDE_ENCODER_CONTRACT
    )

    assert store.runs() == ["pretrain"]
    assert (
        run.history("open")[0].body["contract"]["name"] == SLIDE_ENCODER_CONTRACT.name
    )
    store.close()


def test_slide_encoder_contract_lists_every_mismatch_and_creates_no_run(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    store.run("other")
    config = _slide_encoder_config()
    config["model"]["slide_embedding_dim"] = 768
    config["pretrain"]["warmup_epochs"] = 10
    del config["finetune"]["selection"]
    before = (store.runs(), _snapshot(store))

    with pytest.raises(ledger.ContractViolationError) as raised:
        store.run("pretrain", config=config, contract=SLIDE_ENCODER_CONTRACT)

    mismatches = raised.value.mismatches
    assert len(mismatches) == 3
    assert any("model.slide_embedding_dim is 768" in m for m in mismatches)
    assert any("pretrain.warmup_epochs is 10" in m for m in mismatches)
    assert any("finetune.selection is missing" in m for m in mismatches)
    assert all(m in str(raised.value) for m in mismatches)
    assert (store.runs(), _snapshot(store)) == before
    store.close()


def test_slide_encoder_contract_holds_the_recipe_values() -> None:
    assert dict(SLIDE_ENCODER_CONTRACT.required) == {
        "model.slide_embedding_dim": 1024,
        "model.dna_input_dim": 1673,
        "pretrain.max_epochs": 101,
        "pretrain.warmup_epochs": 5,
        "pretrain.rankme_eps": 1e-7,
        "finetune.epochs": 5,
        "finetune.selection": "final epoch",
    }


def test_contract_recorded_at_creation_applies_when_reopened(tmp_path: Path) -> None:
    path = tmp_path / "store"
    config = _slide_encoder_config()
    with Store(path) as first:
        first.run("pre", config=config, contract=SLIDE_ENCODER_CONTRACT)
    broken = copy.deepcopy(config)
    broken["model"]["dna_input_dim"] = 1000
    store = Store(path)

    with pytest.raises(ledger.ContractViolationError, match="dna_input_dim"):
        store.run("pre", config=broken, allow_config_change=True)

    store.close()


def test_contract_treats_true_and_one_as_different(tmp_path: Path) -> None:
    contract = Contract("flags", {"amp": True, "layers": 1})

    problems = contract.mismatches({"amp": 1, "layers": True})

    assert len(problems) == 2


def test_reopening_with_another_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store(path) as first:
        run = first.run("r", config={"lr": 0.1, "opt": {"name": "adam"}})
        run.save({"w": torch.zeros(2)}, epoch=1)
    store = Store(path)
    before = _snapshot(store)

    with pytest.raises(ledger.ConfigMismatchError, match="allow_config_change"):
        store.run("r", config={"lr": 0.2, "opt": {"name": "adam"}})

    assert _snapshot(store) == before
    store.close()


def test_allowed_config_change_is_recorded_in_the_next_resume(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store(path) as first:
        run = first.run("r", config={"lr": 0.1, "opt": {"name": "adam"}})
        run.save({"w": torch.zeros(2)}, epoch=1)
    store = Store(path)
    new_config = {"lr": 0.2, "opt": {"name": "sgd"}, "clip": 1.0}

    run = store.run("r", config=new_config, allow_config_change=True)
    resumed = run.resume("last")

    assert resumed is not None and resumed.resume_event is not None
    body = store.event(resumed.resume_event).body
    assert body["config_diff"] == {
        "clip": [None, 1.0],
        "lr": [0.1, 0.2],
        "opt.name": ["adam", "sgd"],
    }
    assert body["config"] == new_config
    assert run.state().config_hash == run.config_hash
    store.close()
    with Store(path) as again:
        assert again.run("r", config=new_config).config_diff == {}


def test_reopening_with_other_options_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store(path) as first:
        first.run("r", options=RunOptions(keep_last=2))
    store = Store(path)

    with pytest.raises(ledger.PolicyError, match="cannot change"):
        store.run("r", options=RunOptions(keep_last=3))

    store.close()


def test_load_by_every_kind_of_reference(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    options = RunOptions(best=BestPolicy("acc"), final_epoch=3)
    run = store.run("r", options=options)
    saves = [
        run.save({"w": torch.full((2,), float(e))}, epoch=e, metrics={"acc": acc})
        for e, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]
    ]
    final_event = run.finalize()
    seq = [s.seq for s in saves if s is not None]

    def w(ref: int | str) -> float:
        return float(run.load(ref, map_location="cpu")["w"][0])

    assert (w("last"), w("best"), w("final")) == (3.0, 2.0, 3.0)
    assert (w(seq[0]), w(str(seq[0])), w(final_event or 0)) == (1.0, 1.0, 3.0)
    manifest = saves[1].manifest if saves[1] else ""
    assert (w(manifest), w(manifest[:12])) == (2.0, 2.0)
    store.close()


@pytest.mark.parametrize("ref", ["worst", 10**5, "abcdef0123", True, 1.5])
def test_unknown_reference_is_refused(tmp_path: Path, ref: Any) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    run.save({"w": torch.zeros(1)}, epoch=1)

    with pytest.raises(ledger.UnknownReferenceError):
        run.load(ref)

    store.close()


def test_reference_to_another_runs_event_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    theirs = store.run("a").save({"w": torch.zeros(1)}, epoch=1)
    run = store.run("b")
    assert theirs is not None

    with pytest.raises(ledger.UnknownReferenceError, match="belongs to run 'a'"):
        run.load(theirs.seq)

    store.close()


def test_resume_modes_append_one_resume_event_each(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    options = RunOptions(best=BestPolicy("loss", mode="min"), final_epoch=3)
    run = store.run("r", options=options)
    for epoch, loss in [(1, 0.2), (2, 0.5), (3, 0.4)]:
        run.save({"e": torch.tensor(epoch)}, epoch=epoch, metrics={"loss": loss})
    run.finalize()
    first = run.history("save")[0].seq

    fresh = run.resume("none")
    got = {
        mode: run.resume(mode)
        for mode in ["auto", "last", "best", "final", first, str(first)]
    }

    assert fresh is None
    assert {str(k): int(v.state["e"]) for k, v in got.items() if v} == {
        "auto": 3,
        "last": 3,
        "best": 1,
        "final": 3,
        str(first): 1,
    }
    resumes = run.history("resume")
    assert len(resumes) == 7  # "none" on a run with saves records a fresh start
    assert [ev.target for ev in resumes] == [None] + [v.seq for v in got.values() if v]
    assert run.state().resumes == 7
    store.close()


def test_resume_auto_of_an_empty_run_starts_fresh_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    before = _snapshot(store)

    resumed = run.resume("auto")

    assert resumed is None
    assert _snapshot(store) == before
    store.close()


def test_resume_best_without_a_best_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("acc", start_epoch=5)))
    run.save({"w": torch.zeros(1)}, epoch=1, metrics={"acc": 1.0})
    before = _snapshot(store)

    with pytest.raises(ledger.UnknownReferenceError, match="no best checkpoint"):
        run.resume("best")

    assert _snapshot(store) == before
    store.close()


def test_load_moves_tensors_to_map_location(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    run.save({"w": torch.arange(4.0)}, epoch=1)

    loaded = run.load("last", map_location=torch.device("cpu"))

    assert loaded["w"].device == torch.device("cpu")
    assert torch.equal(loaded["w"], torch.arange(4.0))
    store.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"epoch": -1}, {"epoch": 1.0}, {"step": "10"}, {"epoch": True}, {"step": 2**63}],
)
def test_save_with_invalid_epoch_or_step_is_refused_and_writes_nothing(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    before = _snapshot(store)

    with pytest.raises(ledger.PolicyError, match="must be an int"):
        run.save({"w": torch.zeros(1)}, **kwargs)

    assert _snapshot(store) == before
    store.close()


def test_state_at_a_time_before_the_first_save_has_no_saves(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    run.save({"w": torch.zeros(1)}, epoch=1)

    then = run.state(at="2000-01-01T00:00:00Z")

    assert then.saves == {} and then.last is None
    store.close()
