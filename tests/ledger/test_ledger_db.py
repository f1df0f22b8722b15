"""The SQLite ledger file: append-only events and refs, digests committed with
their event, and the hash chain.

The ledger is attacked here with plain `sqlite3`, as a careless script would,
rather than through the library, so the guarantees hold for any writer.
"""

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ledger
from cas import hash_bytes
from ledger import Store
from ledger._codec import decode_manifest
from ledger._events import COLUMNS, GENESIS_HASH, chain_hash, hashed_fields


def _store_with_saves(path: Path) -> Store:
    store = Store(path)
    run = store.run("r", config={"lr": 0.1})
    for epoch in (1, 2):
        run.save({"w": torch.full((4,), float(epoch)), "e": epoch}, epoch=epoch)
    return store


def _dump(db: Path) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT * FROM events ORDER BY seq").fetchall()
        rows += conn.execute("SELECT * FROM refs ORDER BY seq, digest").fetchall()
    return rows


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    table=st.sampled_from(["events", "refs"]),
    column=st.sampled_from(["seq", "digest", "size", *COLUMNS]),
    new=st.one_of(st.integers(-5, 5), st.text(max_size=4), st.none()),
    where=st.sampled_from(["1", "seq = 2", "seq > 2"]),
)
def test_update_of_any_column_is_refused_as_append_only(
    tmp_path: Path, table: str, column: str, new: object, where: str
) -> None:
    db = tmp_path / "store" / "ledger.db"
    if not db.exists():
        _store_with_saves(tmp_path / "store").close()
    columns = ["seq", "digest", "size"] if table == "refs" else list(COLUMNS)
    column = column if column in columns else "seq"
    # The rowid refuses a non-integer with "datatype mismatch" before any trigger.
    assume(not (table == "events" and column == "seq" and type(new) is not int))
    before = _dump(db)

    with closing(sqlite3.connect(db)) as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", [new])

    assert _dump(db) == before


@pytest.mark.parametrize("table", ["events", "refs"])
@pytest.mark.parametrize("where", ["1", "seq = 2", "seq >= 3"])
def test_delete_is_refused_as_append_only(
    tmp_path: Path, table: str, where: str
) -> None:
    _store_with_saves(tmp_path / "store").close()
    db = tmp_path / "store" / "ledger.db"
    before = _dump(db)

    with closing(sqlite3.connect(db)) as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(f"DELETE FROM {table} WHERE {where}")

    assert _dump(db) == before


def test_save_commits_refs_for_its_manifest_and_every_tensor(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    tensors = {"a": torch.arange(5.0), "b": torch.ones(2, 3), "c": torch.zeros(7)}

    result = run.save({"model": tensors, "epoch": 1}, epoch=1)

    assert result is not None
    refs = store.db.rows("SELECT digest, size FROM refs WHERE seq = ?", [result.seq])
    manifest = bytes(store.blobs.get(result.manifest))
    expected = {result.manifest: len(manifest)}
    for t in tensors.values():
        expected[hash_bytes(t.numpy().tobytes())] = t.nbytes
    assert {r["digest"]: r["size"] for r in refs} == expected
    _, tensor_refs = decode_manifest(manifest)
    assert {r.digest for r in tensor_refs} | {result.manifest} == set(expected)
    store.close()


def test_save_and_its_refs_are_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    run.save({"w": torch.zeros(3)}, epoch=1)
    with closing(sqlite3.connect(store.path / "ledger.db")) as conn, conn:
        conn.execute(
            "CREATE TRIGGER refs_fail BEFORE INSERT ON refs "
            "BEGIN SELECT RAISE(ABORT, 'refs insert failed'); END"
        )
    events_before = len(store.events())

    with pytest.raises(sqlite3.DatabaseError, match="refs insert failed"):
        run.save({"w": torch.ones(3)}, epoch=2)

    assert len(store.events()) == events_before
    assert run.state().last == run.history("save")[0].seq
    assert store.db.rows("SELECT * FROM leases") == []
    store.close()


def test_every_save_in_the_ledger_has_refs(tmp_path: Path) -> None:
    store = _store_with_saves(tmp_path / "store")

    saves = store.events(kind="save")
    with_refs = {r["seq"] for r in store.db.rows("SELECT DISTINCT seq FROM refs")}

    assert {ev.seq for ev in saves} == with_refs
    assert all(ev.manifest is not None for ev in saves)
    store.close()


def test_events_form_an_unbroken_hash_chain(tmp_path: Path) -> None:
    store = _store_with_saves(tmp_path / "store")
    store.run("other").save({"x": torch.ones(1)}, step=10)

    events = store.events()

    assert [ev.seq for ev in events] == list(range(1, len(events) + 1))
    previous = GENESIS_HASH
    for ev in events:
        assert ev.prev_hash == previous
        assert ev.hash == chain_hash(previous, hashed_fields(ev))
        previous = ev.hash
    store.close()


def test_schema_is_versioned_and_has_the_append_only_triggers(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")

    triggers = {
        r["name"]
        for r in store.db.rows("SELECT name FROM sqlite_master WHERE type='trigger'")
    }
    mode = store.db.rows("PRAGMA journal_mode")[0]["journal_mode"]

    assert store.db.meta("schema_version") == "1"
    assert triggers >= {
        "events_no_update",
        "events_no_delete",
        "refs_no_update",
        "refs_no_delete",
    }
    assert mode == "wal"
    store.close()


def test_ledger_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "store").close()
    with closing(sqlite3.connect(tmp_path / "store" / "ledger.db")) as conn, conn:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', '99')")

    with pytest.raises(ledger.LedgerError, match="schema version 99"):
        Store(tmp_path / "store")
