"""The public surface of `ledger`: every exported name resolves, and the names
that need torch load it only when first used."""

import subprocess
import sys

import ledger


def test_every_name_in_all_resolves_and_is_listed_once() -> None:
    names = ledger.__all__

    resolved = [getattr(ledger, name) for name in names]

    assert len(set(names)) == len(names)
    assert all(value is not None for value in resolved)
    assert set(names) <= set(dir(ledger))


def test_importing_ledger_and_run_leaves_torch_unimported() -> None:
    probe = (
        "import sys, ledger\n"
        "before = 'torch' in sys.modules\n"
        "from ledger import Run\n"
        "print(before, 'torch' in sys.modules, Run.__module__)"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )

    assert result.stdout.split() == ["False", "False", "ledger._run"]
