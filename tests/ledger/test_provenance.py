"""Provenance in open and resume events, and the run's state replayed as of a
past event or time."""

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch

from ledger import BestPolicy, Contract, PolicyError, RunOptions, Store

_SCRIPT = """
import os, sys
from ledger import Store

store_path, action, lr = sys.argv[1], sys.argv[2], float(sys.argv[3])
with Store(store_path) as store:
    run = store.run("r", config={"lr": lr, "model": {"dim": 8}},
                    allow_config_change=True, seed=11)
    if action == "save":
        run.save({"w": [1.0, 2.0]}, epoch=1)
    else:
        run.resume("last")
print(os.getpid())
"""


def _hash(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return blake3.blake3(canonical.encode()).hexdigest()


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return done.stdout.strip()


def _train(script: Path, store: Path, action: str, lr: float) -> int:
    done = subprocess.run(
        [sys.executable, str(script), str(store), action, str(lr)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(done.stdout.split()[-1])


def test_open_event_records_config_contract_versions_machine_and_seed(
    tmp_path: Path,
):
    config = {"model": {"dim": 8, "act": "gelu"}, "lr": 0.1}
    contract = Contract("tiny", {"model.dim": 8})

    with Store(tmp_path / "store") as store:
        store.run("r", config=config, contract=contract, seed=7)
        body = store.events("r", kind="open")[0].body

    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    assert json.dumps(body["config"], separators=(",", ":")) == canonical
    assert body["config_hash"] == blake3.blake3(canonical.encode()).hexdigest()
    assert body["contract"] == {"name": "tiny", "required": {"model.dim": 8}}
    assert body["provenance"] == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ckpt_ledger": metadata.version("ckpt-ledger"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": sys.argv,
        "seed": 7,
        **({"git": body["provenance"]["git"]} if "git" in body["provenance"] else {}),
    }


def test_seed_is_recorded_only_when_given(tmp_path: Path):
    with Store(tmp_path / "store") as store:
        store.run("r")
        body = store.events("r", kind="open")[0].body

    assert "seed" not in body["provenance"]


def test_processes_record_their_git_revision_and_resume_records_config_change(
    tmp_path: Path,
):
    repo = tmp_path / "repo"
    repo.mkdir()
    script = repo / "train.py"
    script.write_text(_SCRIPT)
    _git(repo, "init", "-q")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "train")
    commit = _git(repo, "rev-parse", "HEAD")
    store_path = tmp_path / "store"

    first_pid = _train(script, store_path, "save", 0.1)
    script.write_text(_SCRIPT + "\n# edited after the commit\n")
    second_pid = _train(script, store_path, "resume", 0.2)

    with Store(store_path) as store:
        opened = store.events("r", kind="open")[0].body
        resumed = store.events("r", kind="resume")[0].body
        problems = store.verify()
    assert opened["provenance"]["git"] == {"commit": commit, "dirty": False}
    assert opened["provenance"]["pid"] == first_pid
    assert opened["provenance"]["argv"] == [str(script), str(store_path), "save", "0.1"]
    assert resumed["provenance"]["git"] == {"commit": commit, "dirty": True}
    assert resumed["provenance"]["pid"] == second_pid
    assert resumed["provenance"]["seed"] == 11
    assert resumed["provenance"]["torch"] == torch.__version__
    assert resumed["config_hash"] == _hash({"lr": 0.2, "model": {"dim": 8}})
    assert resumed["config_hash"] != opened["config_hash"]
    assert resumed["config_diff"] == {"lr": [0.1, 0.2]}
    assert problems == []


def test_script_outside_a_git_checkout_records_no_revision(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)

    _train(script, tmp_path / "store", "save", 0.1)

    with Store(tmp_path / "store") as store:
        assert "git" not in store.events("r", kind="open")[0].body["provenance"]


def test_resume_under_the_same_config_records_no_difference(tmp_path: Path):
    with Store(tmp_path / "store") as store:
        run = store.run("r", config={"lr": 0.1})
        run.save({"w": torch.ones(2)}, epoch=1)

        run.resume("last", seed=3)

        body = store.events("r", kind="resume")[0].body
    assert body["config_hash"] == _hash({"lr": 0.1})
    assert body["config_diff"] == {}
    assert body["provenance"]["seed"] == 3


def _history(store: Store) -> list[tuple[int, dict[str, Any]]]:
    options = RunOptions(
        best=BestPolicy("loss", mode="min", start_epoch=2), keep_last=2, final_epoch=5
    )
    run = store.run("r", options=options)
    other = store.run("other")
    snapshots = [(run.state().seq, run.state().summary())]
    for epoch, loss in enumerate([0.9, 0.5, 0.6, 0.4, 0.7], 1):
        run.save(
            {"w": torch.full((2,), float(epoch))}, epoch=epoch, metrics={"loss": loss}
        )
        other.save({"w": torch.zeros(1)}, epoch=epoch)
        snapshots.append((run.state().seq, run.state().summary()))
        if epoch == 3:
            run.resume("best")
            snapshots.append((run.state().seq, run.state().summary()))
    run.finalize("last")
    snapshots.append((run.state().seq, run.state().summary()))
    return snapshots


def test_state_at_an_event_number_is_the_state_as_it_was_then(tmp_path: Path):
    with Store(tmp_path / "store") as store:
        snapshots = _history(store)
        run = store.get_run("r")

        replayed = [run.state(at=seq).summary() for seq, _ in snapshots]

    assert replayed == [summary for _, summary in snapshots]
    assert len({repr(s) for s in replayed}) == len(replayed)


def test_state_at_a_time_is_the_state_after_the_last_event_by_then(tmp_path: Path):
    with Store(tmp_path / "store") as store:
        _history(store)
        run = store.get_run("r")
        events = store.events()
        expected = [
            run.state(at=max(e.seq for e in events if e.time <= ev.time)).summary()
            for ev in events
        ]

        at_time = [run.state(at=ev.time).summary() for ev in events]
        in_paris = [run.state(at=_as_utc_plus_2(ev.time)).summary() for ev in events]
        before = run.state(at="2000-01-01T00:00:00Z")

    assert at_time == expected
    assert in_paris == expected
    assert before.opened is None and before.saves == {}


def _as_utc_plus_2(stamp: str) -> str:
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc
    )
    return moment.astimezone(timezone(timedelta(hours=2))).isoformat()


def test_state_at_refuses_a_time_that_is_not_iso(tmp_path: Path):
    with Store(tmp_path / "store") as store:
        run = store.run("r")

        with pytest.raises(PolicyError, match="invalid time 'yesterday': use ISO"):
            run.state(at="yesterday")
