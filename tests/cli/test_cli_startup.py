"""What `ckpt` imports: the reading commands start without torch, whose import
takes about a second, so that a regression shows here and not only in the bench.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import json, sys
from ledger.cli import main
code = main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
sys.exit(code)
"""


def _modules_after(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stderr.splitlines()[-1]))


def test_importing_the_cli_does_not_import_torch() -> None:
    probe = "import sys, ledger.cli; print(sorted({'torch'} & set(sys.modules)))"

    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args",
    [
        ["log", "pre"],
        ["log", "pre", "--json"],
        ["log", "ft", "--kind", "save"],
        ["head"],
        ["du"],
        ["show", "pre"],
        ["runs"],
    ],
)
def test_reading_commands_run_without_importing_torch(
    filled_store: Path, args: list[str]
) -> None:
    modules = _modules_after("--store", str(filled_store), *args)

    assert "torch" not in modules
