"""verify checks the sizes the refs table records, since gc relies on them."""

import sqlite3
from pathlib import Path

import torch

from ledger import Store


def test_verify_names_the_save_whose_refs_row_records_a_wrong_size(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "s") as store:
        saved = store.run("r").save({"w": torch.zeros(16)}, epoch=1)
    assert saved is not None
    conn = sqlite3.connect(tmp_path / "s" / "ledger.db")
    conn.execute("DROP TRIGGER refs_no_update")
    conn.execute("UPDATE refs SET size = size + 1 WHERE digest != ?", [saved.manifest])
    conn.commit()
    conn.close()

    with Store(tmp_path / "s") as store:
        problems = store.verify()

    assert len(problems) == 1
    assert problems[0].seq == saved.seq
    assert "refs table records 65 bytes, the save needs 64" in problems[0].message


def test_verify_checks_the_manifest_size_in_the_refs_table_too(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "s") as store:
        saved = store.run("r").save({"w": torch.zeros(16)}, epoch=1)
    assert saved is not None
    conn = sqlite3.connect(tmp_path / "s" / "ledger.db")
    conn.execute("DROP TRIGGER refs_no_update")
    conn.execute("UPDATE refs SET size = 1 WHERE digest = ?", [saved.manifest])
    conn.commit()
    conn.close()

    with Store(tmp_path / "s") as store:
        problems = store.verify()

    assert [p.digest for p in problems] == [saved.manifest]
    assert problems[0].seq == saved.seq
