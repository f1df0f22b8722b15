"""Fixtures for the `ckpt` tests: a way to run the command in-process and a store
with two runs. `ckpt(...)` calls `ledger.cli.main` and returns its exit status
and what it printed, so each test reads like the shell session it stands for.
"""

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from ledger import BestPolicy, RunOptions, Store
from ledger.cli import main


class Outcome(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def ckpt(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Outcome]:
    """Run `ckpt --store <store_path> ARGS...` (or another store with `store=`)."""

    def call(*args: str, store: Path | None = None) -> Outcome:
        capsys.readouterr()
        code = main(["--store", str(store or store_path), *args])
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return call


@pytest.fixture
def filled_store(store_path: Path) -> Path:
    """Run "pre": #1 open, #2 save e1, #3 promote, #4 save e2, #5 promote,
    #6 save e3, #7 resume from #4. Run "ft": #8 open, #9 save e1, #10 save e2,
    #11 final. Both runs share the tensor `backbone`."""
    backbone = torch.arange(64, dtype=torch.float32)
    with Store(store_path) as store:
        pre = store.run(
            "pre",
            options=RunOptions(best=BestPolicy("rankme", "max"), stage="pretrain"),
        )
        for epoch, rankme in enumerate([1.0, 3.0, 2.0], 1):
            checkpoint = {
                "model": {"backbone": backbone, "head": torch.full((4,), 1.0 * epoch)},
                "epoch": epoch,
            }
            pre.save(checkpoint, epoch=epoch, metrics={"rankme": rankme})
        pre.resume("best")
        ft = store.run("ft", options=RunOptions(final_epoch=2, stage="finetune"))
        for epoch in (1, 2):
            checkpoint = {"backbone": backbone, "head": torch.full((2,), -1.0 * epoch)}
            ft.save(checkpoint, epoch=epoch, metrics={"acc": 0.5 + epoch / 10})
        ft.finalize()
    return store_path


@pytest.fixture
def is_one_line_error() -> Callable[[str], bool]:
    """True if stderr holds exactly one `ckpt: error: ...` line and no traceback."""

    def check(err: str) -> bool:
        lines = err.splitlines()
        return (
            len(lines) == 1
            and lines[0].startswith("ckpt: error: ")
            and "Traceback" not in err
        )

    return check
