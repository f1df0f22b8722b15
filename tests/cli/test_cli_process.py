"""`ckpt` as a separate process: real exit statuses, and stderr that is one line
with no traceback, as a shell script or CI job sees them."""

import subprocess
import sys
from pathlib import Path

import pytest


def _ckpt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["runs"], 2, "no store at"),
        (["gc", "--grace", "soon"], 2, "invalid duration 'soon'"),
    ],
)
def test_a_failing_ckpt_process_prints_one_line_and_exits_with_its_status(
    tmp_path: Path, args: list[str], code: int, expected: str
) -> None:
    result = _ckpt("--store", str(tmp_path / "missing"), *args)

    assert result.returncode == code
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("ckpt: error: ") and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_verify_that_finds_problems_exits_1_as_a_process(
    filled_store: Path,
) -> None:
    for blob in (filled_store / "blobs").rglob("*"):
        if blob.is_file():
            blob.unlink()

    result = _ckpt("--store", str(filled_store), "verify")

    assert result.returncode == 1
    assert result.stdout.count("is missing") >= 5
    assert result.stderr.startswith("ckpt: error: verify:")
