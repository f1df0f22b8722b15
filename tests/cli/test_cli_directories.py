"""A directory where `ckpt` expects a file: export, import and `verify --head`
refuse it in one line that names the path, with exit status 2."""

from collections.abc import Callable
from pathlib import Path
from typing import Any


def test_export_onto_a_directory_is_refused_naming_it(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    target = tmp_path / "best.pt"
    target.mkdir()

    result = ckpt("export", "pre@best", "-o", str(target))

    assert result.code == 2
    assert f"cannot export to {target}: it is a directory" in result.err
    assert list(target.iterdir()) == []
    assert not list(tmp_path.glob(".best.pt.*.partial"))


def test_import_of_a_directory_says_it_is_one(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    source = tmp_path / "model.pt"
    source.mkdir()

    result = ckpt("import", str(source), "--run", "x", "--epoch", "1")

    assert result.code == 2
    assert f"cannot import {source}: it is a directory" in result.err
    assert ckpt("log", "x").code == 2  # no run was created


def test_verify_with_a_missing_head_file_names_it_and_the_option(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "head.txt"

    result = ckpt("verify", "--head", str(missing))

    assert result.code == 2
    assert f"cannot read {missing}" in result.err and "--head" in result.err
    assert len(result.err.strip().splitlines()) == 1
