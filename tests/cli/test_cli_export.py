"""`ckpt export RUN@REF -o FILE`: .pt and .safetensors files, --key, references,
and refusals that leave no file behind."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ledger import Store


def _load(store_path: Path, run: str, ref: str | int) -> Any:
    with Store(store_path) as store:
        return store.get_run(run).load(ref)


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    else:
        assert a == b


def test_export_pt_writes_the_checkpoint_as_a_weights_only_torch_file(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "best.pt"

    result = ckpt("export", "pre@best", "-o", str(out))

    assert result.code == 0
    assert "save #4 of run 'pre' (e2)" in result.out
    _assert_same(torch.load(out, weights_only=True), _load(filled_store, "pre", 4))


def test_export_safetensors_writes_a_flat_tensor_dict_with_its_origin(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ft.safetensors"

    result = ckpt("export", "ft@final", "-o", str(out))

    assert result.code == 0
    _assert_same(load_file(out), _load(filled_store, "ft", "final"))
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert (meta["ckpt_run"], meta["ckpt_save"]) == ("ft", "10")


def test_export_safetensors_of_a_nested_checkpoint_is_refused_naming_key(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    out = tmp_path / "pre.safetensors"

    result = ckpt("export", "pre@last", "-o", str(out))

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "not a flat dict of tensors" in result.err and "--key model" in result.err
    assert list(tmp_path.glob("*safetensors*")) == []


def test_export_key_writes_one_sub_dict(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.safetensors"

    result = ckpt("export", "pre@last", "-o", str(out), "--key", "model")

    assert result.code == 0
    _assert_same(load_file(out), _load(filled_store, "pre", "last")["model"])


def test_export_of_an_unknown_key_lists_the_keys(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    result = ckpt("export", "pre@last", "-o", str(tmp_path / "m.pt"), "--key", "opt")

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "no key 'opt'" in result.err and "'model', 'epoch'" in result.err


def test_export_safetensors_unties_tensors_that_share_memory(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    weight = torch.randn(3, 4)
    with Store(store_path) as store:
        store.run("tied").save({"embed": weight, "unembed": weight}, epoch=1)
    out = tmp_path / "tied.safetensors"

    result = ckpt("export", "tied@last", "-o", str(out))

    assert result.code == 0
    tensors = load_file(out)
    assert torch.equal(tensors["embed"], weight)
    assert torch.equal(tensors["unembed"], weight)


@pytest.mark.parametrize("ref", ["4", "5", "7"])
def test_export_by_event_number_takes_the_save_that_event_names(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path, ref: str
) -> None:
    out = tmp_path / "e.pt"

    result = ckpt("export", f"pre@{ref}", "-o", str(out))

    assert result.code == 0
    assert torch.load(out, weights_only=True)["epoch"] == 2


def test_export_by_manifest_digest_prefix(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    with Store(filled_store) as store:
        manifest = store.event(2).manifest
    assert manifest is not None
    out = tmp_path / "e1.pt"

    result = ckpt("export", f"pre@{manifest[:8]}", "-o", str(out))

    assert result.code == 0
    assert torch.load(out, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(
    ("target", "output", "expected"),
    [
        ("pre@zz", "x.pt", "invalid checkpoint reference 'zz'"),
        ("pre@abc", "x.pt", "at least 8 hex"),
        ("pre@deadbeef", "x.pt", "no save of run 'pre' has a manifest starting"),
        ("pre@8", "x.pt", "event #8 belongs to run 'ft'"),
        ("pre@99", "x.pt", "no event #99"),
        ("ft@best", "x.pt", "no best checkpoint"),
        ("pre", "x.pt", "is not RUN@REF"),
        ("nope@last", "x.pt", "no run 'nope'"),
        ("pre@last", "x.npz", "unknown suffix '.npz'"),
        ("pre@last", "x", "unknown suffix '(none)'"),
    ],
)
def test_export_refusals_are_one_line_with_exit_2_and_write_no_file(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
    target: str,
    output: str,
    expected: str,
) -> None:
    out = tmp_path / "exports" / output
    out.parent.mkdir()

    result = ckpt("export", target, "-o", str(out))

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert expected in result.err
    assert list(out.parent.iterdir()) == []


def test_export_of_a_damaged_checkpoint_exits_1_naming_the_blob(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    with Store(filled_store) as store:
        path = store.blobs.path_of(store.event(10).manifest or "")
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    out = tmp_path / "ft.pt"

    result = ckpt("export", "ft@final", "-o", str(out))

    assert result.code == 1
    assert is_one_line_error(result.err)
    assert path.name in result.err and "ckpt verify" in result.err
    assert not out.exists()


def test_export_of_a_checkpoint_the_os_cannot_read_exits_1_naming_the_blob(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    with Store(filled_store) as store:
        path = store.blobs.path_of(store.event(10).manifest or "")
    os.chmod(path, 0o644)
    os.unlink(path)
    os.mkdir(path)
    out = tmp_path / "ft.pt"

    result = ckpt("export", "ft@final", "-o", str(out))

    assert result.code == 1
    assert is_one_line_error(result.err)
    assert path.name in result.err and "ckpt verify" in result.err
    assert not out.exists()


def test_export_safetensors_without_the_library_says_how_to_install_it(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    is_one_line_error: Callable[[str], bool],
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    out = tmp_path / "ft.safetensors"

    result = ckpt("export", "ft@final", "-o", str(out))

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "pip install safetensors" in result.err
    assert list(tmp_path.glob("*ft.safetensors*")) == []


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_export_into_a_missing_directory_is_one_line_naming_it_with_exit_2(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
    name: str,
) -> None:
    out = tmp_path / "nonexistent" / "dir" / name

    result = ckpt("export", "ft@final", "-o", str(out))

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert f"{out.parent} does not exist" in result.err


def test_export_removes_partials_of_its_target_left_by_dead_writers(
    ckpt: Callable[..., Any], filled_store: Path, tmp_path: Path
) -> None:
    dead_pid = _pid_of_a_finished_process()
    stale = tmp_path / f".keep.pt.{dead_pid}.partial"
    other_target = tmp_path / f".other.pt.{dead_pid}.partial"
    live_writer = tmp_path / f".keep.pt.{os.getppid()}.partial"
    for path in (stale, other_target, live_writer):
        path.write_bytes(b"half a checkpoint")

    result = ckpt("export", "ft@final", "-o", str(tmp_path / "keep.pt"))

    assert result.code == 0
    assert not stale.exists()
    assert other_target.exists() and live_writer.exists()


def _pid_of_a_finished_process() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_export_key_takes_a_dotted_path_into_nested_dicts(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    encoder = {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}
    checkpoint = {"model": {"encoder": encoder, "head": {"w": torch.ones(1)}}}
    with Store(store_path) as store:
        store.run("nested").save(checkpoint, epoch=1)
    out = tmp_path / "encoder.safetensors"

    result = ckpt("export", "nested@last", "-o", str(out), "--key", "model.encoder")

    assert result.code == 0
    loaded = load_file(out)
    _assert_same({k: loaded[k] for k in encoder}, encoder)


def test_export_key_matches_a_dict_key_that_holds_dots_whole(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    checkpoint = {"state": {"layer.0": {"w": torch.ones(3)}}}
    with Store(store_path) as store:
        store.run("dots").save(checkpoint, epoch=1)
    out = tmp_path / "layer.safetensors"

    result = ckpt("export", "dots@last", "-o", str(out), "--key", "state.layer.0")

    assert result.code == 0
    _assert_same(load_file(out), {"w": torch.ones(3)})


def test_safetensors_refusal_hints_keys_that_export_the_nested_parts(
    ckpt: Callable[..., Any],
    store_path: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    encoder = {"w": torch.ones(2)}
    checkpoint = {"model": {"encoder": encoder, "projector": {"w": torch.zeros(2)}}}
    with Store(store_path) as store:
        store.run("nested").save({**checkpoint, "epoch": 3}, epoch=1)
    out = tmp_path / "m.safetensors"

    refused = ckpt("export", "nested@last", "-o", str(out), "--key", "model")
    hinted = refused.err.split("--key ")[1].split(",")[0].strip()
    result = ckpt("export", "nested@last", "-o", str(out), "--key", hinted)

    assert refused.code == 2 and is_one_line_error(refused.err)
    assert "--key model.encoder, --key model.projector" in refused.err
    assert result.code == 0
    _assert_same(load_file(out), encoder)


def test_export_key_through_a_non_dict_names_where_the_path_stops(
    ckpt: Callable[..., Any],
    filled_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    out = tmp_path / "x.pt"

    result = ckpt("export", "pre@last", "-o", str(out), "--key", "epoch.x")

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "epoch is a int, not a dict" in result.err
