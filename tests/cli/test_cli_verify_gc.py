"""`ckpt verify` and `ckpt gc`: exit 1 on a damaged store, grace durations,
and a gc that deletes nothing when a referenced blob is missing."""

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ledger import Store


def _blob_path(store_path: Path, seq: int, *, manifest: bool = False) -> Path:
    with Store(store_path) as store:
        digest = store.event(seq).manifest
        if not manifest:
            # A tensor blob that no other save shares.
            refs = store.db.rows(
                "SELECT digest FROM refs WHERE seq = ? AND digest != ? AND digest "
                "NOT IN (SELECT digest FROM refs WHERE seq != ?)",
                [seq, digest, seq],
            )
            digest = refs[0]["digest"]
        assert digest is not None
        return store.blobs.path_of(digest)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def _stray_blob(store_path: Path, *, age: float) -> Path:
    with Store(store_path) as store:
        path = store.blobs.path_of(store.blobs.put(b"nobody needs me").digest)
    then = path.stat().st_mtime - age
    os.utime(path, (then, then))
    return path


def test_verify_of_a_sound_store_exits_0(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    result = ckpt("verify")

    assert result.code == 0
    assert "is sound" in result.out
    assert result.err == ""


def test_verify_names_the_event_and_blob_of_a_corrupt_blob_and_exits_1(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    damaged = _blob_path(filled_store, 6)
    _flip_last_byte(damaged)

    result = ckpt("verify")

    assert result.code == 1
    problems = result.out.splitlines()
    assert len(problems) == 1
    assert problems[0].startswith("event #6 (pre): blob " + damaged.name)
    assert "corrupt" in problems[0]
    assert result.err == "ckpt: error: verify: 1 problems in store " + (
        f"{filled_store}\n"
    )


def test_verify_of_one_run_checks_only_that_runs_saves(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    _flip_last_byte(_blob_path(filled_store, 6))

    other = ckpt("verify", "ft")
    own = ckpt("verify", "pre")

    assert other.code == 0
    assert own.code == 1


def test_verify_with_a_progress_bar_on_a_terminal_still_answers(
    ckpt: Callable[..., Any],
    filled_store: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    result = ckpt("verify")

    assert result.code == 0
    assert "is sound" in result.out


def test_gc_with_grace_0_removes_an_unreferenced_blob_and_says_how_much(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    stray = _stray_blob(filled_store, age=0)

    result = ckpt("gc", "--grace", "0")

    assert result.code == 0
    assert "removed 1 blobs (15 B)" in result.out
    assert not stray.exists()
    assert ckpt("verify").code == 0


def test_gc_keeps_an_unreferenced_blob_younger_than_the_default_grace(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    stray = _stray_blob(filled_store, age=30 * 60)

    result = ckpt("gc")

    assert result.code == 0
    assert "removed 0 blobs" in result.out and "1 younger than 1h" in result.out
    assert stray.exists()


def test_gc_dry_run_counts_but_deletes_nothing(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    stray = _stray_blob(filled_store, age=7200)

    result = ckpt("gc", "--dry-run")

    assert result.code == 0
    assert "would remove 1 blobs" in result.out
    assert stray.exists()


@pytest.mark.parametrize(
    ("grace", "age", "removed"),
    [
        ("30s", 60, 1),
        ("15m", 60, 0),
        ("15m", 1000, 1),
        ("2d", 86400, 0),
        ("1.5h", 6000, 1),
    ],
)
def test_gc_grace_durations_take_s_m_h_d(
    ckpt: Callable[..., Any], filled_store: Path, grace: str, age: float, removed: int
) -> None:
    _stray_blob(filled_store, age=age)

    result = ckpt("gc", "--grace", grace)

    assert result.code == 0
    assert f"removed {removed} blobs" in result.out


@pytest.mark.parametrize("grace", ["5x", "-1h", "1 h", "h", "", "1h30m"])
def test_gc_refuses_a_bad_grace_in_one_line_with_exit_2(
    ckpt: Callable[..., Any],
    filled_store: Path,
    is_one_line_error: Callable[[str], bool],
    grace: str,
) -> None:
    stray = _stray_blob(filled_store, age=7200)

    result = ckpt("gc", "--grace", grace)

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "--grace" in result.err and "30s, 15m, 1h or 2d" in result.err
    assert stray.exists()


def test_gc_refuses_and_deletes_nothing_when_a_referenced_blob_is_missing(
    ckpt: Callable[..., Any], filled_store: Path
) -> None:
    lost = _blob_path(filled_store, 9, manifest=True)
    lost.unlink()
    stray = _stray_blob(filled_store, age=7200)

    result = ckpt("gc", "--grace", "0")

    assert result.code == 1
    assert result.out.splitlines() == [f"event #9 (ft): blob {lost.name} missing"]
    assert "nothing was deleted" in result.err
    assert stray.exists()
