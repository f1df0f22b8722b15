"""`ckpt runs`, `log`, `show` and `du`: tables, JSON, and one-line refusals."""

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ledger.cli
from ledger import BestPolicy, RunOptions, Store


def test_runs_shows_one_row_per_run_with_stage_last_best_final(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("runs")

    assert result.code == 0
    cells = [line.split() for line in result.out.splitlines() if line.strip()]
    rows = {row[0]: row for row in cells}
    assert rows["pre"][:6] == ["pre", "pretrain", "7", "e3", "e2", "="]
    assert rows["ft"][:6] == ["ft", "finetune", "4", "e2", "-", "e2"]


def test_runs_json_has_stable_keys_and_values_from_replay(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("runs", "--json")

    assert result.code == 0
    rows = json.loads(result.out)
    assert [r["run"] for r in rows] == ["pre", "ft"]
    assert rows[0] == {
        "run": "pre",
        "stage": "pretrain",
        "events": 7,
        "last": 6,
        "last_epoch": 3,
        "best": 4,
        "best_epoch": 2,
        "best_value": 3.0,
        "final": None,
        "final_epoch": None,
        "resumes": 1,
        "resumed_from": 4,
    }
    assert rows[1]["final_epoch"] == 2


def test_runs_of_an_empty_store_says_there_are_none(
    ckpt: Callable[..., Any], store_path: Path
) -> None:
    Store(store_path).close()

    result = ckpt("runs")

    assert result.code == 0
    assert "no runs" in result.out


def test_log_lists_a_runs_events_in_order_and_the_chain_head(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("log", "pre")

    assert result.code == 0
    kinds = re.findall(r"^\s*(\d+)\s+\S+ \S+\s+(\w+)", result.out, re.MULTILINE)
    assert kinds == [
        ("1", "open"),
        ("2", "save"),
        ("3", "promote"),
        ("4", "save"),
        ("5", "promote"),
        ("6", "save"),
        ("7", "resume"),
    ]
    assert "from #4 (e2)" in result.out
    assert re.search(r"chain head: #11 [0-9a-f]{16}", result.out)


def test_log_json_carries_digests_metrics_targets_and_the_chain_head(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    with Store(filled_store) as store:
        newest = store.events()[-1]
        manifest = store.event(4).manifest

    result = ckpt("log", "pre", "--json")

    assert result.code == 0
    doc = json.loads(result.out)
    assert doc["chain_head"] == {"seq": newest.seq, "hash": newest.hash}
    saves = [e for e in doc["events"] if e["kind"] == "save"]
    assert saves[1]["manifest"] == manifest
    assert saves[1]["metrics"] == {"rankme": 3.0}
    assert doc["events"][-1]["target"] == 4


def test_log_kind_keeps_only_events_of_that_kind(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("log", "pre", "--kind", "promote", "--json")

    assert result.code == 0
    events = json.loads(result.out)["events"]
    assert [(e["seq"], e["target"], e["value"]) for e in events] == [
        (3, 2, 1.0),
        (5, 4, 3.0),
    ]


def test_log_refuses_an_unknown_kind_in_one_line_with_exit_2(
    ckpt: Callable[..., Any],
    filled_store: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    result = ckpt("log", "pre", "--kind", "saved")

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "'saved'" in result.err and "promote" in result.err
    assert result.out == ""


def test_log_json_writes_non_finite_metrics_as_strings(
    ckpt: Callable[..., Any], store_path: Path
) -> None:
    with Store(store_path) as store:
        store.run("r").save(
            {"w": torch.ones(2)}, step=100, metrics={"loss": float("nan")}
        )

    result = ckpt("log", "r", "--json")

    assert result.code == 0
    save = json.loads(result.out, parse_constant=_refuse)["events"][1]
    assert (save["step"], save["metrics"]) == (100, {"loss": "nan"})


def _refuse(name: str) -> None:
    raise AssertionError(f"JSON holds {name}, which strict parsers reject")


@pytest.mark.parametrize(
    "args", [["log", "nope"], ["show", "nope"], ["verify", "nope"]]
)
def test_an_unknown_run_is_one_line_error_with_exit_2(
    ckpt: Callable[..., Any],
    filled_store: Path,
    is_one_line_error: Callable[[str], bool],
    args: list[str],
) -> None:
    result = ckpt(*args)

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "no run 'nope'" in result.err and "pre, ft" in result.err


def test_show_replays_the_run_now(ckpt: Callable[..., Any], filled_store: Path) -> None:
    result = ckpt("show", "pre", "--json")

    assert result.code == 0
    summary = json.loads(result.out)
    assert (summary["last_epoch"], summary["best_epoch"]) == (3, 2)
    assert (summary["resumed_from"], summary["live_saves"]) == (4, [2, 4, 6])


def test_show_at_an_earlier_event_gives_the_state_as_it_was(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("show", "pre", "--at", "3", "--json")

    assert result.code == 0
    summary = json.loads(result.out)
    assert summary["as_of_seq"] == 3
    assert (summary["last"], summary["best"], summary["best_value"]) == (2, 2, 1.0)
    assert summary["resumed_from"] is None


def test_show_at_an_iso_time_gives_the_state_at_that_moment(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    with Store(filled_store) as store:
        moment = store.event(4).time

    result = ckpt("show", "pre", "--at", moment)

    assert result.code == 0
    assert re.search(r"last_epoch\s+2\b", result.out)
    assert re.search(r"live_saves\s+#2, #4", result.out)


@pytest.mark.parametrize("at", ["yesterday", "0", "2000-01-01T00:00:00Z"])
def test_show_refuses_an_at_that_names_no_state(
    ckpt: Callable[..., Any],
    filled_store: Path,
    is_one_line_error: Callable[[str], bool],
    at: str,
) -> None:
    result = ckpt("show", "pre", "--at", at)

    assert result.code == 2
    assert is_one_line_error(result.err)


def test_du_reports_logical_against_physical_bytes(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("du", "--json")

    assert result.code == 0
    usage = json.loads(result.out)
    assert usage["saves"] == 5
    assert usage["logical_bytes"] > usage["physical_bytes"] > 0
    assert usage["dedup_ratio"] == pytest.approx(
        usage["logical_bytes"] / usage["physical_bytes"], rel=1e-3
    )
    assert "dedup ratio" in ckpt("du").out


@pytest.mark.parametrize(
    "args",
    [
        ["runs"],
        ["log", "pre"],
        ["show", "pre"],
        ["verify"],
        ["gc"],
        ["du"],
        ["export", "pre@last", "-o", "x.pt"],
    ],
)
def test_a_missing_store_is_one_line_error_and_is_not_created(
    ckpt: Callable[..., Any],
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
    args: list[str],
) -> None:
    missing = tmp_path / "nowhere"

    result = ckpt(*args, store=missing)

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "no store at" in result.err and "--store" in result.err
    assert not missing.exists()


def test_the_store_defaults_to_ckpt_store_from_the_environment(
    filled_store: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ledger.cli import main

    monkeypatch.setenv("CKPT_STORE", str(filled_store))

    code = main(["runs", "--json"])

    assert code == 0
    assert [r["run"] for r in json.loads(capsys.readouterr().out)] == ["pre", "ft"]


@pytest.mark.parametrize(
    "command", ["runs", "log", "show", "verify", "gc", "export", "import", "du"]
)
def test_every_command_help_has_an_example_and_the_exit_statuses(
    ckpt: Callable[..., Any], command: str
) -> None:
    result = ckpt(command, "--help")

    assert result.code == 0
    assert "Example: ckpt " in result.out
    assert "Exit status: 0" in result.out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["import", "x.pt", "--run", "r"], "Missing option '--epoch'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["runs", "--jsn"], "No such option: --jsn"),
    ],
)
def test_usage_errors_exit_2_in_one_line(
    ckpt: Callable[..., Any],
    is_one_line_error: Callable[[str], bool],
    args: list[str],
    expected: str,
) -> None:
    result = ckpt(*args)

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert expected in result.err and "--help`" in result.err


def test_a_run_with_a_best_policy_shows_its_value_in_runs(
    ckpt: Callable[..., Any], store_path: Path
) -> None:
    with Store(store_path) as store:
        run = store.run("r", options=RunOptions(best=BestPolicy("loss", "min")))
        run.save({"w": torch.ones(1)}, epoch=1, metrics={"loss": 0.25})

    result = ckpt("runs")

    assert "e1 = 0.25" in result.out


def test_runs_shows_a_deliberate_fresh_start_as_such(
    ckpt: Callable[..., Any], store_path: Path
) -> None:
    with Store(store_path) as store:
        run = store.run("fresh")
        run.save({"w": torch.ones(2)}, epoch=1)
        run.resume("none")

    result = ckpt("runs")

    assert result.code == 0
    assert "fresh start" in result.out
    assert "None" not in result.out


def test_a_long_log_is_drawn_as_the_same_table_without_rich(
    ckpt: Callable[..., Any], filled_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(filled_store) as store:
        wide = store.run("wide")
        wide.save({"w": torch.ones(1)}, step=3, metrics={"損失": 0.5, "é": 1.0})
    monkeypatch.setenv("COLUMNS", "200")  # so that rich wraps nothing either
    by_rich = [ckpt("log", run).out for run in ("pre", "wide")]

    monkeypatch.setattr(ledger.cli, "_RICH_ROWS", 0)
    plain = [ckpt("log", run).out for run in ("pre", "wide")]

    assert plain == by_rich
    assert "損失=0.5" in plain[1]


def test_log_json_is_one_event_a_line(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("log", "pre", "--json")

    lines = result.out.splitlines()
    assert len(lines) == 7 + 2
    assert json.loads(lines[1].rstrip(","))["kind"] == "open"
