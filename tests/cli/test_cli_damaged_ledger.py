"""`ckpt` on a store whose ledger.db is empty, not a ledger, or damaged: one
line, the right exit status, and not one blob deleted."""

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ledger._schema import _SCHEMA


def _blob_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "blobs").rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "emptying", ["zero_bytes", "no_events_table", "foreign", "schema_only"]
)
@pytest.mark.parametrize("command", [["gc", "--grace", "0"], ["runs"], ["verify"]])
def test_a_store_whose_ledger_lost_its_history_is_refused_and_keeps_its_blobs(
    filled_store: Path,
    ckpt: Callable[..., Any],
    emptying: str,
    command: list[str],
) -> None:
    db = filled_store / "ledger.db"
    for suffix in ("-wal", "-shm"):
        db.with_name("ledger.db" + suffix).unlink(missing_ok=True)
    db.unlink()
    if emptying == "zero_bytes":
        db.touch()
    else:
        conn = sqlite3.connect(db)
        if emptying == "no_events_table":
            conn.execute("CREATE TABLE other (x)")
        elif emptying == "schema_only":
            # what an older ckpt wrote into a zero-byte ledger.db: no events
            conn.executescript(_SCHEMA)
            conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        else:
            # an events table, but not of a ckpt ledger (no meta table)
            conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY)")
        conn.commit()
        conn.close()
    blobs = _blob_files(filled_store)
    before = db.read_bytes()

    result = ckpt(*command)

    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1
    assert "ledger.db" in result.err and "restore" in result.err
    assert _blob_files(filled_store) == blobs
    assert db.read_bytes() == before


def _corrupt_events_page(db: Path) -> None:
    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'events'"
    ).fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with db.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def test_verify_of_a_ledger_with_a_corrupt_page_names_the_damage_in_one_line(
    filled_store: Path, ckpt: Callable[..., Any]
) -> None:
    _corrupt_events_page(filled_store / "ledger.db")

    result = ckpt("verify")

    assert result.code == 1
    assert "Traceback" not in result.err
    assert "malformed" in result.out + result.err


def test_gc_of_a_ledger_with_a_corrupt_page_refuses_and_deletes_nothing(
    filled_store: Path, ckpt: Callable[..., Any]
) -> None:
    _corrupt_events_page(filled_store / "ledger.db")
    blobs = _blob_files(filled_store)

    result = ckpt("gc", "--grace", "0")

    assert result.code == 1
    assert "Traceback" not in result.err
    assert "malformed" in result.out
    assert "repair or restore ledger.db" in result.err
    assert "blobs are missing" not in result.err
    assert _blob_files(filled_store) == blobs


@pytest.mark.parametrize(
    "command", [["runs"], ["log", "pre"], ["show", "pre"], ["head"], ["du"]]
)
def test_reading_a_ledger_with_a_corrupt_page_is_one_line_with_exit_2(
    filled_store: Path, ckpt: Callable[..., Any], command: list[str]
) -> None:
    _corrupt_events_page(filled_store / "ledger.db")

    result = ckpt(*command)

    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1
    assert "malformed" in result.err and "backup" in result.err
