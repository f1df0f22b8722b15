"""Round trips of checkpoint structures through Run.save and Run.load.

Everything is compared bit for bit (floats by their IEEE bits, tensors by their
bytes), never with ==, so NaN payloads and -0.0 count. The generated structures
stay small: the property is about shapes of data, and every example is a real
durable save into one shared store.
"""

from __future__ import annotations

import _pickle
import pickle
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Run, Store, UnsupportedTypeError
from ledger._codec import build, decode_manifest, encode

INT64 = st.integers(-(2**63), 2**63 - 1)

TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
] + [
    getattr(torch, name)
    for name in (
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, name)
]

NUMPY_DTYPES = [
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
        np.complex64,
        np.complex128,
    )
] + [np.dtype(">i4"), np.dtype(">f8")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    store = Store(tmp_path_factory.mktemp("roundtrip") / "store")
    yield store.run("roundtrip")
    store.close()


@pytest.fixture
def fresh_run(tmp_path: Path) -> Iterator[Run]:
    store = Store(tmp_path / "store")
    yield store.run("fresh")
    store.close()


def _raw_bytes(draw: st.DrawFn, size: int, is_bool: bool) -> bytes:
    if is_bool:
        # Bools are stored as bytes, but torch and numpy only define 0 and 1.
        return bytes(
            draw(st.lists(st.sampled_from([0, 1]), min_size=size, max_size=size))
        )
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = _raw_bytes(draw, n * dtype.itemsize, dtype == torch.bool)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    view = draw(st.sampled_from(["as is", "transpose", "step", "expand"]))
    if view == "transpose" and t.dim() >= 2:
        return t.transpose(0, 1)
    if view == "step" and t.dim() >= 1:
        return t[::2]
    if view == "expand" and t.dim() == 1:
        return t.unsqueeze(0).expand(2, -1)
    return t


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    n = int(np.prod(shape, dtype=np.int64))
    raw = _raw_bytes(draw, n * dtype.itemsize, dtype.kind == "b")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if draw(st.booleans()) and arr.ndim >= 1:
        return arr[::-1]
    return arr


@st.composite
def numpy_scalars(draw: st.DrawFn) -> np.generic:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    raw = _raw_bytes(draw, dtype.itemsize, dtype.kind == "b")
    return np.frombuffer(raw, dtype=dtype)[0]


floats = st.one_of(
    st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan")]),
    st.integers(0, 2**64 - 1).map(
        lambda b: struct.unpack("<d", struct.pack("<Q", b))[0]
    ),
)
keys = st.one_of(st.text(max_size=6), INT64)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    floats,
    st.text(max_size=8),
    st.binary(max_size=8),
    numpy_scalars(),
    arrays(),
    tensors(),
)
structures = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=12,
)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1).clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_same(expected: Any, actual: Any, path: str = "<root>") -> None:
    """Assert two structures are identical in type, order and bits."""
    if isinstance(expected, torch.Tensor):
        assert type(actual) is torch.Tensor, path
        assert actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert _tensor_bytes(actual) == _tensor_bytes(expected), path
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)}"
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype, path
        assert actual.dtype.byteorder == expected.dtype.byteorder, path
        assert actual.shape == expected.shape, path
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, np.generic):
        assert actual.dtype.str == expected.dtype.str, path
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: key order"
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}.{i}")
    else:
        assert actual == expected, path


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(checkpoint=structures)
def test_any_supported_structure_round_trips_bit_exactly(
    run: Run, checkpoint: Any
) -> None:
    saved = run.save(checkpoint)

    loaded = run.load(saved.seq)

    assert_same(checkpoint, loaded)


def test_ordered_state_dict_keeps_its_class_and_metadata(fresh_run: Run) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = model.state_dict()

    loaded = fresh_run.load(fresh_run.save({"model": state}).seq)["model"]

    assert type(loaded) is OrderedDict
    assert loaded._metadata == state._metadata
    assert_same(dict(state), dict(loaded))
    torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).load_state_dict(
        loaded
    )


def test_conjugated_and_negated_views_load_as_their_values(fresh_run: Run) -> None:
    z = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    checkpoint = {"conj": z.conj(), "neg": z.conj().imag}

    loaded = fresh_run.load(fresh_run.save(checkpoint).seq)

    assert not loaded["conj"].is_conj()
    assert torch.equal(loaded["conj"], torch.tensor([1 - 2j, -3 + 4j]))
    assert torch.equal(loaded["neg"], torch.tensor([-2.0, 4.0]))


def test_parameter_with_grad_loads_as_a_plain_detached_tensor(fresh_run: Run) -> None:
    param = torch.nn.Parameter(torch.arange(4.0))

    loaded = fresh_run.load(fresh_run.save({"p": param}).seq)["p"]

    assert type(loaded) is torch.Tensor
    assert not loaded.requires_grad
    assert torch.equal(loaded, param.detach())


@pytest.mark.parametrize(
    "location", ["cpu", torch.device("cpu")], ids=["str", "device"]
)
def test_map_location_puts_every_tensor_on_the_named_device(
    fresh_run: Run, location: str | torch.device
) -> None:
    checkpoint = {"w": torch.randn(3, 2), "nested": [torch.arange(5), torch.empty(0)]}
    seq = fresh_run.save(checkpoint).seq

    loaded = fresh_run.load(seq, map_location=location)

    tensors_loaded = [loaded["w"], *loaded["nested"]]
    assert all(t.device == torch.device("cpu") for t in tensors_loaded)
    assert_same(checkpoint, loaded)


def test_loaded_tensors_are_writable_and_independent_of_the_store(
    fresh_run: Run,
) -> None:
    seq = fresh_run.save({"w": torch.zeros(4)}).seq
    first = fresh_run.load(seq)["w"]

    first += 1
    second = fresh_run.load(seq)["w"]

    assert torch.equal(second, torch.zeros(4))


def _blob_files(run: Run) -> list[Path]:
    return sorted(p for p in (run.store.path / "blobs").rglob("*") if p.is_file())


def test_tied_weights_are_stored_once_and_come_back_as_one_tensor(
    fresh_run: Run,
) -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    state = {**emb.state_dict(prefix="emb."), **head.state_dict(prefix="head.")}
    assert state["emb.weight"] is not state["head.weight"]

    result = fresh_run.save(state)
    loaded = fresh_run.load(result.seq)

    assert len(_blob_files(fresh_run)) == 2  # one tensor blob and the manifest
    manifest_size = fresh_run.store.blobs.size_of(result.manifest)
    assert result.bytes_written == emb.weight.nbytes + manifest_size
    assert loaded["emb.weight"] is loaded["head.weight"]
    assert torch.equal(loaded["emb.weight"], emb.weight.detach())


def test_views_of_one_storage_with_other_shapes_stay_separate(
    fresh_run: Run,
) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    checkpoint = {"whole": base, "row": base[1], "again": base}

    loaded = fresh_run.load(fresh_run.save(checkpoint).seq)

    assert loaded["whole"] is loaded["again"]
    assert loaded["row"] is not loaded["whole"]
    assert torch.equal(loaded["row"], base[1])
    assert loaded["row"].shape == (4,)


def test_equal_but_untied_tensors_load_as_separate_objects(fresh_run: Run) -> None:
    checkpoint = {"a": torch.ones(3), "b": torch.ones(3)}

    loaded = fresh_run.load(fresh_run.save(checkpoint).seq)

    assert loaded["a"] is not loaded["b"]
    loaded["a"] += 1
    assert torch.equal(loaded["b"], torch.ones(3))


def _forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the load path tried to unpickle")

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


def _trained_model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    model(torch.randn(8, 5)).pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.ones(3, 5)).sum().backward()
    optimizer.step()


def test_C14_model_numpy_scalars_and_adamw_state_round_trip_without_pickle(
    fresh_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = _trained_model_and_optimizer()
    checkpoint = {
        "model": model.state_dict(),
        "epoch": np.int64(3),
        "val": np.float64(0.3),
        "opt": optimizer.state_dict(),
    }
    seq = fresh_run.save(checkpoint, epoch=3).seq
    _forbid_unpickling(monkeypatch)

    loaded = fresh_run.load(seq)

    assert type(loaded["epoch"]) is np.int64 and loaded["epoch"] == 3
    assert type(loaded["val"]) is np.float64 and loaded["val"] == 0.3
    assert int(loaded["epoch"]) + 1 == 4
    assert list(loaded["opt"]["state"]) == [0, 1, 2, 3]
    assert_same(checkpoint, loaded)
    twin = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )
    twin.load_state_dict(loaded["model"])
    twin_opt = torch.optim.AdamW(twin.parameters())
    twin_opt.load_state_dict(loaded["opt"])
    assert_same(optimizer.state_dict(), twin_opt.state_dict())
    _step(model, optimizer)
    _step(twin, twin_opt)
    assert_same(model.state_dict(), twin.state_dict())


def test_load_never_calls_pickle_or_torch_load(
    fresh_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = {
        "t": torch.randn(2, 2, dtype=torch.bfloat16),
        "a": np.arange(3),
        "s": np.float32(1.5),
        "meta": OrderedDict(x=(1, "y", b"z", None)),
    }
    seq = fresh_run.save(checkpoint).seq
    _forbid_unpickling(monkeypatch)

    loaded = fresh_run.load(seq)
    resumed = fresh_run.resume("last")

    assert_same(checkpoint, loaded)
    assert resumed is not None
    assert_same(checkpoint, resumed.state)


def _call_with_few_frames_left(free: int, fn: Callable[[], Any]) -> Any:
    # Recurse until only `free` frames of the recursion limit remain, then call.
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back

    def dive(n: int) -> Any:
        return fn() if n <= 0 else dive(n - 1)

    return dive(sys.getrecursionlimit() - depth - free)


NESTINGS = {
    "dicts": lambda x: {"k": x},
    "lists": lambda x: [x],
    "tuples": lambda x: (x,),
    "ordered dicts": lambda x: OrderedDict(k=x),
    "mixed": lambda x: ({"k": x},),
}


@pytest.mark.parametrize("wrap", NESTINGS.values(), ids=NESTINGS.keys())
def test_containers_nested_100_deep_round_trip_even_from_deep_in_the_call_stack(
    tmp_path: Path, wrap: Callable[[Any], Any]
) -> None:
    checkpoint: Any = torch.arange(3)
    while _depth(checkpoint) < 100:
        checkpoint = wrap(checkpoint)
    store = Store(tmp_path / "store")
    run = store.run("deep")

    _call_with_few_frames_left(80, lambda: run.save(checkpoint, epoch=1))
    loaded = _call_with_few_frames_left(80, lambda: run.load("last"))

    assert _depth(loaded) == 100
    assert _innermost(loaded).tolist() == [0, 1, 2]
    store.close()


def _depth(node: Any) -> int:
    depth = 0
    while isinstance(node, (dict, list, tuple)):
        node = next(iter(node.values())) if isinstance(node, dict) else node[0]
        depth += 1
    return depth


def _innermost(node: Any) -> Any:
    while isinstance(node, (dict, list, tuple)):
        node = next(iter(node.values())) if isinstance(node, dict) else node[0]
    return node


def _wrapped(wraps: list[Callable[[Any], Any]]) -> Any:
    node: Any = "leaf"
    for wrap in wraps:
        node = wrap(node)
    return node


@given(wraps=st.lists(st.sampled_from(list(NESTINGS.values())[:4]), max_size=100))
def test_any_nesting_within_100_deep_round_trips_through_the_manifest(
    wraps: list[Callable[[Any], Any]],
) -> None:
    checkpoint = _wrapped(wraps)

    root, refs = decode_manifest(encode(checkpoint).manifest)

    assert build(root, refs, lambda ref: bytearray()) == checkpoint
    assert _depth(root) == len(wraps)


@given(wraps=st.lists(st.sampled_from(list(NESTINGS.values())[:4]), min_size=101))
def test_any_nesting_deeper_than_100_is_refused_at_save(
    wraps: list[Callable[[Any], Any]],
) -> None:
    checkpoint = _wrapped(wraps)

    with pytest.raises(UnsupportedTypeError, match="nested more than 100 deep"):
        encode(checkpoint)


def test_one_element_tensor_with_a_stride_round_trips(fresh_run: Run) -> None:
    strided = torch.arange(6, dtype=torch.float64)[::2][:1]  # stride 2, contiguous

    loaded = fresh_run.load(fresh_run.save({"x": strided}).seq)["x"]

    assert torch.equal(loaded, strided)
