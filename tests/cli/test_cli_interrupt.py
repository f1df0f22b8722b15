"""Ctrl-C anywhere in `ckpt`, from the first import on: one line, exit 130."""

import importlib.abc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import _ckpt_entry
from ledger import Store


class _CtrlCOnImport(importlib.abc.MetaPathFinder):
    """Raises KeyboardInterrupt when `ledger.cli` is imported, as a Ctrl-C
    during torch's import would."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> None:
        if fullname == "ledger.cli":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_ckpt_imports_prints_one_line_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "ledger.cli")
    monkeypatch.setattr(sys, "meta_path", [_CtrlCOnImport(), *sys.meta_path])

    code = _ckpt_entry.main()

    captured = capsys.readouterr()
    assert code == 130
    assert captured.err == "ckpt: error: interrupted\n"


def test_ctrl_c_during_a_command_prints_one_line_and_exits_130(
    ckpt: Callable[..., Any],
    filled_store: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(self: Store) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "usage", interrupted)

    result = ckpt("du")

    assert result.code == 130
    assert result.err == "ckpt: error: interrupted\n"


def test_the_ckpt_script_starts_from_the_light_entry_module() -> None:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="ckpt")

    assert script.value == "_ckpt_entry:main"
    assert "torch" not in _imports_of(_ckpt_entry)


def _imports_of(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if isinstance(value, ModuleType) and not name.startswith("__")
    }
