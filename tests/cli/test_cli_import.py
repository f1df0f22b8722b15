"""`ckpt import`: outside torch and safetensors files become saves (case C14);
files that need full unpickling, change while read or cannot be stored are
refused and leave the store as it was."""

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ledger._transfer
from ledger import BestPolicy, RunOptions, Store

HELPER = '''
class Thing:
    """A class only full unpickling can rebuild."""

    def __init__(self, size):
        self.size = size
'''


def _model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).state_dict()


def _snapshot(store_path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """The ledger's events and every file under blobs/."""
    with Store(store_path) as store:
        events = [(ev.seq, ev.kind) for ev in store.events()]
    blobs = sorted(str(p) for p in (store_path / "blobs").rglob("*"))
    return events, blobs


def _load(store_path: Path, run: str, ref: str | int = "last") -> Any:
    with Store(store_path) as store:
        return store.get_run(run).load(ref)


@pytest.fixture
def pickle_only_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch.save file holding an instance of a class from a helper module,
    which `weights_only=True` cannot load. The module stays importable."""
    (tmp_path / "c14_outside_helper.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = importlib.import_module("c14_outside_helper")
    monkeypatch.setitem(sys.modules, "c14_outside_helper", helper)
    path = tmp_path / "theirs.pt"
    torch.save({"model": _model_state(), "extra": helper.Thing(3)}, path)
    return path


@pytest.fixture
def existing_store(store_path: Path) -> Path:
    with Store(store_path) as store:
        store.run("mine").save({"w": torch.ones(3)}, epoch=1)
    return store_path


def test_c14_plain_torch_file_imports_weights_only_and_loads_back_equal(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    state = _model_state()
    theirs = tmp_path / "theirs.pt"
    torch.save({"model": state, "epoch": 3}, theirs)

    result = ckpt("import", str(theirs), "--run", "outside", "--epoch", "3")

    assert result.code == 0
    assert (
        "imported theirs.pt" in result.out
        and "as save #2 of run 'outside'" in result.out
    )
    loaded = _load(store_path, "outside")
    assert loaded["epoch"] == 3
    assert list(loaded["model"]) == list(state)
    for name, tensor in state.items():
        assert torch.equal(loaded["model"][name], tensor)


def test_c14_file_that_needs_full_unpickling_is_refused_and_nothing_is_written(
    ckpt: Callable[..., Any],
    existing_store: Path,
    pickle_only_file: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    before = _snapshot(existing_store)

    result = ckpt("import", str(pickle_only_file), "--run", "mine", "--epoch", "2")

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "needs full unpickling" in result.err and "--trust-pickle" in result.err
    assert "c14_outside_helper.Thing" in result.err
    assert _snapshot(existing_store) == before


def test_c14_trust_pickle_still_refuses_what_the_codec_cannot_store(
    ckpt: Callable[..., Any],
    existing_store: Path,
    pickle_only_file: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    before = _snapshot(existing_store)

    result = ckpt(
        "import",
        str(pickle_only_file),
        "--run",
        "new",
        "--epoch",
        "2",
        "--trust-pickle",
    )

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "cannot store c14_outside_helper.Thing at extra" in result.err
    assert _snapshot(existing_store) == before


def test_c14_trust_pickle_accepts_a_file_the_codec_can_store(
    ckpt: Callable[..., Any], existing_store: Path, tmp_path: Path
) -> None:
    # A numpy scalar (not an array) is pickled through numpy's `scalar`, which
    # weights-only loading does not allow.
    theirs = tmp_path / "arrays.pt"
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    torch.save({"table": table, "lr": np.float64(0.5)}, theirs)
    refused = ckpt("import", str(theirs), "--run", "arr", "--epoch", "1")

    result = ckpt(
        "import", str(theirs), "--run", "arr", "--epoch", "1", "--trust-pickle"
    )

    assert refused.code == 2 and "--trust-pickle" in refused.err
    assert result.code == 0
    loaded = _load(existing_store, "arr")
    assert loaded["table"].dtype == np.int32
    assert np.array_equal(loaded["table"], table)
    assert loaded["lr"] == 0.5


def test_import_of_a_safetensors_file_stores_its_tensors(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    tensors = {"a": torch.randn(5), "b": torch.arange(4, dtype=torch.int64)}
    theirs = tmp_path / "weights.safetensors"
    save_file(tensors, theirs)

    result = ckpt("import", str(theirs), "--run", "st", "--epoch", "1", "--step", "500")

    assert result.code == 0
    loaded = _load(store_path, "st")
    assert sorted(loaded) == ["a", "b"]
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with Store(store_path) as store:
        save = store.get_run("st").history("save")[0]
    assert (save.epoch, save.step) == (1, 500)


def test_import_into_an_existing_run_follows_its_best_policy(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    with Store(store_path) as store:
        run = store.run("ft", options=RunOptions(best=BestPolicy("acc", "max")))
        run.save({"w": torch.zeros(2)}, epoch=1, metrics={"acc": 0.5})
    theirs = tmp_path / "better.pt"
    torch.save({"w": torch.ones(2)}, theirs)

    result = ckpt(
        "import", str(theirs), "--run", "ft", "--epoch", "2", "--metric", "acc=0.75"
    )

    assert result.code == 0
    assert "promoted to best" in result.out
    with Store(store_path) as store:
        state = store.get_run("ft").state()
    assert (state.epoch_of(state.best), state.best_value) == (2, 0.75)


def test_import_without_the_watched_metric_warns_in_one_line(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    with Store(store_path) as store:
        store.run("ft", options=RunOptions(best=BestPolicy("acc", "max")))
    theirs = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, theirs)

    result = ckpt("import", str(theirs), "--run", "ft", "--epoch", "1")

    assert result.code == 0
    assert result.err.startswith("ckpt: warning: ") and result.err.count("\n") == 1
    assert "'acc' is missing" in result.err


def test_import_refuses_a_file_that_changes_while_it_is_read(
    ckpt: Callable[..., Any],
    existing_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    is_one_line_error: Callable[[str], bool],
) -> None:
    theirs = tmp_path / "growing.pt"
    torch.save({"w": torch.ones(3)}, theirs)
    load = ledger._transfer._load_torch

    def load_while_someone_writes(path: Path, trust_pickle: bool) -> Any:
        checkpoint = load(path, trust_pickle)
        with open(path, "ab") as f:
            f.write(b"more")
        return checkpoint

    monkeypatch.setattr(ledger._transfer, "_load_torch", load_while_someone_writes)
    before = _snapshot(existing_store)

    result = ckpt("import", str(theirs), "--run", "mine", "--epoch", "2")

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "changed while it was read" in result.err
    assert _snapshot(existing_store) == before


@pytest.mark.parametrize(
    ("name", "content", "args", "expected"),
    [
        ("x.pt", None, [], "no such file"),
        ("x.npz", b"", [], "unknown suffix '.npz'"),
        ("x.pt", b"not a torch file at all", [], "cannot be read weights-only"),
        ("x.pt", b"PK\x03\x04broken zip", [], "not a readable torch checkpoint"),
        ("x.safetensors", b"garbage", [], "not a readable safetensors file"),
        ("x.pt", b"", ["--metric", "acc"], "'acc' is not NAME=NUMBER"),
        ("x.pt", b"", ["--metric", "acc=high"], "'acc=high' is not NAME=NUMBER"),
        ("x.pt", b"", ["--epoch", "-1"], "--epoch"),
    ],
)
def test_import_refusals_are_one_line_with_exit_2_and_write_nothing(
    ckpt: Callable[..., Any],
    existing_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
    name: str,
    content: bytes | None,
    args: list[str],
    expected: str,
) -> None:
    theirs = tmp_path / name
    if content is not None:
        theirs.write_bytes(content)
    before = _snapshot(existing_store)

    result = ckpt("import", str(theirs), "--run", "mine", "--epoch", "2", *args)

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert expected in result.err
    assert _snapshot(existing_store) == before


def test_import_of_a_bad_run_name_writes_nothing(
    ckpt: Callable[..., Any], existing_store: Path, tmp_path: Path
) -> None:
    theirs = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, theirs)
    before = _snapshot(existing_store)

    result = ckpt("import", str(theirs), "--run", "no spaces", "--epoch", "1")

    assert result.code == 2
    assert "invalid run name" in result.err
    assert _snapshot(existing_store) == before


def test_import_prints_the_source_files_blake3(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    import blake3

    theirs = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, theirs)

    result = ckpt("import", str(theirs), "--run", "r", "--epoch", "1")

    assert f"blake3 {blake3.blake3(theirs.read_bytes()).hexdigest()}" in result.out


@pytest.mark.parametrize("name", ["empty.pt", "empty.safetensors"])
def test_import_of_an_empty_file_says_the_file_is_empty(
    ckpt: Callable[..., Any],
    existing_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
    name: str,
) -> None:
    empty = tmp_path / name
    empty.write_bytes(b"")

    result = ckpt("import", str(empty), "--run", "mine", "--epoch", "2")

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert f"{name} is not a readable" in result.err
    assert result.err.rstrip().endswith(": the file is empty")


def test_import_of_numeric_numpy_arrays_needs_no_trust_pickle(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    rng = np.random.RandomState(3).get_state()
    theirs = tmp_path / "with_numpy.pt"
    torch.save(
        {"rng": rng, "mask": np.array([True, False]), "w": torch.ones(2)}, theirs
    )

    result = ckpt("import", str(theirs), "--run", "np", "--epoch", "1")

    assert result.code == 0, result.err
    loaded = _load(store_path, "np")
    assert loaded["rng"][0] == "MT19937"
    assert loaded["rng"][1].dtype == np.uint32
    assert np.array_equal(loaded["rng"][1], rng[1])
    assert loaded["mask"].tolist() == [True, False]


def test_import_of_a_numpy_object_array_still_needs_trust_pickle(
    ckpt: Callable[..., Any],
    existing_store: Path,
    tmp_path: Path,
    is_one_line_error: Callable[[str], bool],
) -> None:
    theirs = tmp_path / "objects.pt"
    torch.save({"objects": np.array([1, "two"], dtype=object)}, theirs)
    before = _snapshot(existing_store)

    result = ckpt("import", str(theirs), "--run", "mine", "--epoch", "2")

    assert result.code == 2
    assert is_one_line_error(result.err)
    assert "ObjectDType" in result.err and "--trust-pickle" in result.err
    assert _snapshot(existing_store) == before


def test_import_with_a_metric_given_twice_is_refused_before_the_store_is_touched(
    ckpt: Callable[..., Any], store_path: Path, tmp_path: Path
) -> None:
    theirs = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, theirs)

    result = ckpt(
        "import", str(theirs), "--run", "ft", "--epoch", "1",
        "--metric", "acc=0.9", "--metric", "acc=0.8",
    )  # fmt: skip

    assert result.code == 2
    assert "'acc' is given twice (0.9 and 0.8)" in result.err
    assert not store_path.exists()
