"""`Store.verify` as an audit: the hash chain, the head, the policies, the blobs.

Every test builds history through the real API, then tampers with the store the
way an attacker with a plain sqlite3 client would (triggers dropped first).
"""

import math
import os
import shutil
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cas import CorruptBlobError, MissingBlobError
from ledger import BestPolicy, MetricWarning, RunOptions, Store
from ledger._audit import Head, HeadError, head
from ledger._events import COLUMNS, GENESIS_HASH, KINDS, chain_hash, hashed_fields
from ledger.cli import main

Rows = list[dict[str, Any]]

_TRIGGERS = ("events_no_update", "events_no_delete", "refs_no_update", "refs_no_delete")
_FEW = settings(max_examples=5, deadline=None)


def _checkpoint(epoch: int, frozen: torch.Tensor) -> dict[str, Any]:
    return {"backbone": frozen, "head": torch.full((4,), float(epoch)), "epoch": epoch}


def _tell_story(path: Path) -> None:
    # Run a: saves, promotes, retention expiries, a resume that branches, a final.
    # Run b: a NaN save, a promote, a manual expire; its backbone is a's.
    frozen = torch.arange(64, dtype=torch.float32)
    a_options = RunOptions(
        best=BestPolicy("val_loss", mode="min", start_epoch=2),
        final_epoch=6,
        keep_last=2,
    )
    with Store(path) as store:
        a = store.run("a", config={"lr": 0.1}, options=a_options, seed=1)
        for epoch, loss in enumerate([0.9, 0.8, 0.85, 0.7], 1):
            a.save(_checkpoint(epoch, frozen), epoch=epoch, metrics={"val_loss": loss})
        a.resume("best")
        for epoch, loss in [(5, 0.6), (6, 0.65)]:
            a.save(_checkpoint(epoch, frozen), epoch=epoch, metrics={"val_loss": loss})
        a.finalize("last")
        b = store.run("b", options=RunOptions(best=BestPolicy("rankme", mode="max")))
        with pytest.warns(MetricWarning):
            b.save(_checkpoint(1, frozen), epoch=1, metrics={"rankme": math.nan})
        b.save(_checkpoint(2, frozen), epoch=2, metrics={"rankme": 3.0})
        third = b.save(_checkpoint(3, frozen), epoch=3, metrics={"rankme": 2.0})
        assert third is not None
        b.save(_checkpoint(4, frozen), epoch=4, metrics={"rankme": 1.0})
        b.expire(third.seq)  # no longer the last save, so it may be expired


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("story") / "store"
    _tell_story(path)
    return path


@pytest.fixture(scope="module")
def story_rows(story: Path) -> Rows:
    return _rows(story)


@pytest.fixture(scope="module")
def clone(story: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    def make() -> Path:
        path = tmp_path_factory.mktemp("clone") / "store"
        shutil.copytree(story, path)
        return path

    return make


def _verify(path: Path, **kwargs: Any) -> list[Any]:
    with Store(path) as store:
        return store.verify(**kwargs)


def _head(path: Path) -> Head:
    with Store(path) as store:
        return head(store)


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path / "ledger.db", isolation_level=None)
    con.row_factory = sqlite3.Row
    for trigger in _TRIGGERS:
        con.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    return con


def _rows(path: Path) -> Rows:
    con = _connect(path)
    rows = [dict(r) for r in con.execute("SELECT * FROM events ORDER BY seq")]
    con.close()
    return rows


def _tamper(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    con = _connect(path)
    con.execute(sql, params)
    con.close()


def _changed(column: str, value: Any, rows: Rows) -> Any:
    if column == "seq":
        return len(rows) + 1000
    if column == "kind":
        return KINDS[(KINDS.index(value) + 1) % len(KINDS)]
    if column in ("hash", "prev_hash"):
        return ("1" if value[0] == "0" else "0") + value[1:]
    if column == "body":
        return value[:-1] + bytes([value[-1] ^ 1])
    if column == "value":
        return (value or 0.0) + 0.5
    if column in ("epoch", "step", "target", "pid"):
        return (value or 0) + 1
    return (value or "") + "x"


def _first(problems: list[Any]) -> int:
    assert problems, "verify found nothing"
    return int(problems[0].seq)


def _rebuild(path: Path, edit: Callable[[Rows], Rows]) -> None:
    """Rewrite history as an attacker with the code but not the head would:
    renumber, remap targets and digest rows, and chain every hash again."""
    con = _connect(path)
    rows = edit([dict(r) for r in con.execute("SELECT * FROM events ORDER BY seq")])
    new_seq = {r["seq"]: i for i, r in enumerate(rows, 1) if r["seq"] is not None}
    refs = [dict(r) for r in con.execute("SELECT * FROM refs")]
    con.execute("DELETE FROM refs")
    con.execute("DELETE FROM events")
    prev = GENESIS_HASH
    for i, row in enumerate(rows, 1):
        row["seq"] = i
        if row["target"] is not None:
            row["target"] = new_seq[row["target"]]
        body = msgpack.unpackb(row["body"])
        if isinstance(body.get("previous"), int):
            body["previous"] = new_seq[body["previous"]]
            row["body"] = msgpack.packb(body, use_bin_type=True)
        row["prev_hash"] = prev
        row["hash"] = prev = chain_hash(prev, hashed_fields(row))
        marks = ", ".join("?" for _ in COLUMNS)
        con.execute(f"INSERT INTO events VALUES ({marks})", [row[c] for c in COLUMNS])
    for ref in refs:
        if ref["seq"] in new_seq:
            con.execute(
                "INSERT INTO refs VALUES (?, ?, ?)",
                (new_seq[ref["seq"]], ref["digest"], ref["size"]),
            )
    con.close()


def _forge(rows: Rows, like: int, **changes: Any) -> dict[str, Any]:
    template = next(r for r in rows if r["seq"] == like)
    body = changes.pop("body", None)
    forged = {**template, "seq": None, **changes}
    if body is not None:
        forged["body"] = msgpack.packb(body, use_bin_type=True)
    return forged


def _by(rows: Rows, run: str, kind: str, epoch: int | None = None) -> dict[str, Any]:
    return next(
        r
        for r in rows
        if r["run"] == run
        and r["kind"] == kind
        and (epoch is None or r["epoch"] == epoch)
    )


def test_honest_story_verifies_with_and_without_head(clone: Callable[[], Path]):
    path = clone()
    pinned = _head(path)

    problems = _verify(path) + _verify(path, head=pinned) + _verify(path, run="b")

    assert problems == []
    assert pinned.seq == len(_rows(path))


def test_honest_runs_of_every_policy_verify_clean(tmp_path: Path):
    frozen = torch.zeros(8)
    with Store(tmp_path / "store") as store:
        # C04: min from epoch 2, a NaN, a tie; then a resume under a new config.
        c04 = store.run(
            "c04",
            config={"lr": 0.1},
            options=RunOptions(best=BestPolicy("loss", mode="min", start_epoch=2)),
        )
        for epoch, loss in enumerate([0.9, 0.8, math.nan, 0.7, 0.7, 0.65], 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MetricWarning)
                c04.save(
                    _checkpoint(epoch, frozen), epoch=epoch, metrics={"loss": loss}
                )
        changed = store.run(
            "c04",
            config={"lr": 0.2},
            allow_config_change=True,
            options=c04.options,
        )
        changed.resume("best")
        # C07: steps only, keep the last 2; a manual expire; final recorded
        # once (a second final for another save is refused), then repeated.
        c07 = store.run("c07", options=RunOptions(keep_last=2, final_epoch=None))
        for step in (9000, 9500, 10000, 10500):
            c07.save(_checkpoint(1, frozen), step=step)
        c07.resume("last")
        c07.save(_checkpoint(2, frozen), step=11000)
        c07.save(_checkpoint(3, frozen), step=11500)
        c07.finalize("last")
        c07.finalize("last")
        c07.expire(min(c07.state().live - c07.state().resume_targets))
        # Max mode with warm-up and a coarse tolerance; metrics missing at times.
        mx = store.run(
            "mx",
            options=RunOptions(
                best=BestPolicy("rankme", warmup_epochs=1, tolerance=0.05),
                keep_last=1,
            ),
        )
        for epoch, value in enumerate([5.0, 1.0, 1.04, 1.2, None, 1.3], 1):
            metrics = {} if value is None else {"rankme": value}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MetricWarning)
                mx.save(_checkpoint(epoch, frozen), epoch=epoch, metrics=metrics)

        problems = store.verify(head=head(store))

    assert problems == []


@pytest.mark.parametrize("column", COLUMNS)
@_FEW
@given(data=st.data())
def test_changing_any_column_of_any_row_names_that_row_first(
    clone: Callable[[], Path], story_rows: Rows, column: str, data: st.DataObject
):
    path = clone()
    seq = data.draw(st.integers(1, len(story_rows)), label="seq")
    old = story_rows[seq - 1][column]
    _tamper(
        path,
        f"UPDATE events SET {column} = ? WHERE seq = ?",
        (_changed(column, old, story_rows), seq),
    )

    problems = _verify(path)

    assert _first(problems) == seq
    assert "hash chain broken" in problems[0].message
    assert "first break" in problems[0].message


@pytest.mark.parametrize("column", [c for c in COLUMNS if c != "seq"])
def test_a_value_of_the_wrong_type_in_any_column_is_named_not_a_crash(
    clone: Callable[[], Path], story_rows: Rows, column: str
):
    path = clone()
    seq = _by(story_rows, "a", "promote", 4)["seq"]
    _tamper(path, f"UPDATE events SET {column} = 'garbage' WHERE seq = ?", (seq,))

    problems = _verify(path)

    assert _first(problems) == seq


@_FEW
@given(data=st.data())
def test_deleting_a_row_names_the_gap(
    clone: Callable[[], Path], story_rows: Rows, data: st.DataObject
):
    path = clone()
    seq = data.draw(st.integers(1, len(story_rows) - 1), label="seq")
    _tamper(path, "DELETE FROM events WHERE seq = ?", (seq,))

    problems = _verify(path)

    assert _first(problems) == seq
    assert str(problems[0]).startswith(f"event #{seq}: hash chain broken: missing")


def test_deleting_the_newest_row_is_caught_only_by_the_head(
    clone: Callable[[], Path], story_rows: Rows
):
    path = clone()
    pinned = _head(path)
    _tamper(path, "DELETE FROM events WHERE seq = ?", (pinned.seq,))

    without_head = _verify(path)
    with_head = _verify(path, head=pinned)

    assert without_head == []
    assert [p.seq for p in with_head] == [pinned.seq]
    assert "ledger ends at" in with_head[0].message


@_FEW
@given(data=st.data())
def test_swapping_two_rows_names_the_earlier(
    clone: Callable[[], Path], story_rows: Rows, data: st.DataObject
):
    path = clone()
    first = data.draw(st.integers(1, len(story_rows) - 1), label="first")
    second = data.draw(st.integers(first + 1, len(story_rows)), label="second")
    rest = [c for c in COLUMNS if c != "seq"]
    con = _connect(path)
    for seq, row in ((first, story_rows[second - 1]), (second, story_rows[first - 1])):
        con.execute(
            "UPDATE events SET "
            + ", ".join(f"{c} = ?" for c in rest)
            + " WHERE seq = ?",
            [row[c] for c in rest] + [seq],
        )
    con.close()

    problems = _verify(path)

    assert _first(problems) == first


@_FEW
@given(data=st.data())
def test_inserting_a_forged_row_names_it(
    clone: Callable[[], Path], story_rows: Rows, data: st.DataObject
):
    path = clone()
    after = data.draw(st.integers(1, len(story_rows) - 1), label="after")
    forged = {**_by(story_rows, "a", "save", 5), "seq": after + 1, "epoch": 99}
    forged["prev_hash"] = story_rows[after - 1]["hash"]
    forged["hash"] = story_rows[after]["hash"]
    con = _connect(path)
    con.execute("UPDATE events SET seq = -seq WHERE seq > ?", (after,))
    con.execute("UPDATE events SET seq = 1 - seq WHERE seq < 0")
    marks = ", ".join("?" for _ in COLUMNS)
    con.execute(f"INSERT INTO events VALUES ({marks})", [forged[c] for c in COLUMNS])
    con.close()

    problems = _verify(path)

    assert _first(problems) == after + 1


def _live_saves_that_fail_to_load(path: Path) -> set[int]:
    failing = set()
    with Store(path) as store:
        for name in store.runs():
            run = store.get_run(name)
            for seq in run.state().live:
                try:
                    run.read_save(seq)
                except (CorruptBlobError, MissingBlobError):
                    failing.add(seq)
    return failing


def _blob_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "blobs").glob("*/*") if p.is_file())


@_FEW
@given(data=st.data())
def test_flipping_a_byte_of_any_blob_names_every_live_save_that_needs_it(
    clone: Callable[[], Path], data: st.DataObject
):
    path = clone()
    blob = data.draw(st.sampled_from(_blob_files(path)), label="blob")
    content = bytearray(blob.read_bytes())
    content[data.draw(st.integers(0, len(content) - 1), label="byte")] ^= 0x01
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(content))

    problems = _verify(path)

    assert {p.seq for p in problems} == _live_saves_that_fail_to_load(path)
    assert all(p.digest == blob.name and "corrupt" in p.message for p in problems)


@_FEW
@given(data=st.data())
def test_deleting_any_blob_names_every_live_save_that_needs_it(
    clone: Callable[[], Path], data: st.DataObject
):
    path = clone()
    blob = data.draw(st.sampled_from(_blob_files(path)), label="blob")
    blob.unlink()

    problems = _verify(path)

    assert {p.seq for p in problems} == _live_saves_that_fail_to_load(path)
    assert all(p.digest == blob.name and "missing" in p.message for p in problems)


def test_shared_backbone_blob_names_saves_of_both_runs(clone: Callable[[], Path]):
    path = clone()
    with Store(path) as store:
        a_best = store.get_run("a").resolve("best")
        b_best = store.get_run("b").resolve("best")
        backbone = store.db.rows(
            "SELECT digest FROM refs WHERE seq = ? INTERSECT "
            "SELECT digest FROM refs WHERE seq = ? AND size = 256",
            [a_best.seq, b_best.seq],
        )[0]["digest"]
        store.blobs.path_of(backbone).unlink()

    problems = _verify(path)

    assert {a_best.seq, b_best.seq} <= {p.seq for p in problems}
    assert {p.run for p in problems} == {"a", "b"}


def test_forged_promote_with_rebuilt_chain_is_rejected_by_head_and_by_policy(
    clone: Callable[[], Path], story_rows: Rows
):
    path = clone()
    pinned = _head(path)
    e3 = _by(story_rows, "a", "save", 3)  # 0.85 does not beat the best 0.8
    e2 = _by(story_rows, "a", "save", 2)
    forged = _forge(
        story_rows,
        _by(story_rows, "a", "promote", 2)["seq"],
        epoch=3,
        value=0.85,
        target=e3["seq"],
        time=e3["time"],
        body={
            "previous": e2["seq"],
            "previous_value": 0.8,
            "mode": "min",
            "tolerance": 1e-12,
        },
    )
    _rebuild(path, lambda rows: [*rows[: e3["seq"]], forged, *rows[e3["seq"] :]])

    with_head = _verify(path, head=pinned)
    without_head = _verify(path)

    forged_seq = e3["seq"] + 1
    assert [p.seq for p in without_head] == [forged_seq]
    assert "not allowed by the best-policy" in without_head[0].message
    assert "0.85 does not beat the best 0.8" in without_head[0].message
    assert [p.seq for p in with_head] == [forged_seq, pinned.seq]
    assert "head file" in with_head[1].message
    assert not any("hash chain" in p.message for p in with_head)


def test_dropped_promote_with_rebuilt_chain_is_named_where_it_belonged(
    clone: Callable[[], Path], story_rows: Rows
):
    path = clone()
    promote = _by(story_rows, "a", "promote", 4)
    _rebuild(path, lambda rows: [r for r in rows if r["seq"] != promote["seq"]])

    problems = _verify(path)

    assert _first(problems) == promote["seq"]
    assert "a promote of it must follow it" in problems[0].message


def _append_forged(path: Path, rows: Rows, **forged: Any) -> int:
    like = forged.pop("like")
    _rebuild(path, lambda old: [*old, _forge(rows, like, **forged)])
    return len(rows) + 1


@pytest.mark.parametrize(
    ("forgery", "complaint"),
    [
        (
            lambda rows: {
                "like": _by(rows, "a", "final")["seq"],
                "epoch": 4,
                "target": _by(rows, "a", "save", 4)["seq"],
            },
            "the run's final epoch is 6",
        ),
        (
            lambda rows: {
                "like": _by(rows, "a", "resume")["seq"],
                "epoch": 1,
                "target": _by(rows, "a", "save", 1)["seq"],
            },
            "expired it",
        ),
        (
            lambda rows: {
                "like": _by(rows, "a", "expire", 1)["seq"],
                "epoch": 5,
                "target": _by(rows, "a", "save", 5)["seq"],
            },
            "the run's best",
        ),
        (
            lambda rows: {"like": _by(rows, "a", "expire", 1)["seq"]},
            "already expired",
        ),
        (
            lambda rows: {
                "like": _by(rows, "a", "expire", 1)["seq"],
                "epoch": 4,
                "target": _by(rows, "a", "save", 4)["seq"],
            },
            "retention may not release",
        ),
        (
            lambda rows: {
                "like": _by(rows, "a", "resume")["seq"],
                "target": _by(rows, "b", "save", 2)["seq"],
                "epoch": 2,
            },
            "not an earlier save of its run",
        ),
    ],
    ids=[
        "final-early",
        "resume-expired",
        "expire-best",
        "expire-twice",
        "retention-newest",
        "resume-other-run",
    ],
)
def test_forged_event_with_valid_chain_is_rejected_by_policy(
    clone: Callable[[], Path],
    story_rows: Rows,
    forgery: Callable[[Rows], dict[str, Any]],
    complaint: str,
):
    path = clone()
    seq = _append_forged(path, story_rows, **forgery(story_rows))

    problems = _verify(path)

    assert [p.seq for p in problems] == [seq]
    assert complaint in problems[0].message


def test_head_round_trips_and_refuses_garbage(clone: Callable[[], Path]):
    pinned = _head(clone())

    parsed = Head.parse(f"{pinned}\n")

    assert parsed == pinned
    with pytest.raises(HeadError, match="expected 'SEQ HASH'"):
        Head.parse("12 not-a-hash")


def test_verify_one_run_still_checks_the_whole_chain(
    clone: Callable[[], Path], story_rows: Rows
):
    path = clone()
    seq = _by(story_rows, "a", "save", 2)["seq"]
    _tamper(path, "UPDATE events SET host = 'elsewhere' WHERE seq = ?", (seq,))

    problems = _verify(path, run="b")

    assert [p.seq for p in problems] == [seq]


def test_verify_reports_progress_up_to_the_total(clone: Callable[[], Path]):
    path = clone()
    calls: list[tuple[int, int]] = []

    _verify(path, progress=lambda done, total: calls.append((done, total)))

    assert calls[-1][0] == calls[-1][1] > 0
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_ckpt_head_file_lets_verify_catch_a_dropped_newest_event(
    clone: Callable[[], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = clone()
    head_file = tmp_path / "head.txt"
    assert main(["--store", str(path), "head"]) == 0
    head_file.write_text(capsys.readouterr().out)
    _rebuild(path, lambda rows: rows[:-1])

    without_head = main(["--store", str(path), "verify"])
    with_head = main(["--store", str(path), "verify", "--head", str(head_file)])

    out = capsys.readouterr().out.splitlines()
    assert (without_head, with_head) == (0, 1)
    assert out[-1].startswith(f"event #{Head.parse(head_file.read_text()).seq}: ")
    assert "the head file names event" in out[-1]


def test_ckpt_verify_refuses_a_head_file_that_is_not_a_head(
    clone: Callable[[], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    head_file = tmp_path / "head.txt"
    head_file.write_text("not a head\n")

    code = main(["--store", str(clone()), "verify", "--head", str(head_file)])

    assert code == 2
    assert "not a ledger head" in capsys.readouterr().err
