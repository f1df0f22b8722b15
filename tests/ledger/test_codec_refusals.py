"""What the codec refuses at save time, and that a refusal leaves no trace.

Each refused value sits behind a tensor that would otherwise be written first,
so a test passes only if the whole structure is checked before any byte goes to
the store. The path property uses `encode` directly, since the store plays no
part in naming the path.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ledger import LedgerError, Run, Store, UnsupportedTypeError
from ledger._codec import encode


class Custom:
    pass


def _function(x: int) -> int:
    return x


def _nest(depth: int, leaf: Any, wrap: Callable[[Any], Any] = lambda x: (x,)) -> Any:
    for _ in range(depth):
        leaf = wrap(leaf)
    return leaf


def _self_containing_list() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


REFUSED = {
    "custom class": (
        {"optimizer": {"state": {3: {"foo": Custom()}}}},
        "optimizer.state.3.foo",
        "Custom",
    ),
    "function": ({"hooks": [1, _function]}, "hooks.1", "function"),
    "lambda": ({"hooks": (lambda: 0,)}, "hooks.0", "function"),
    "module": ({"model": torch.nn.Linear(2, 2)}, "model", "Linear"),
    "set": ({"meta": {"tags": {"a", "b"}}}, "meta.tags", "set"),
    "frozenset": ({"tags": frozenset()}, "tags", "frozenset"),
    "int above int64": ({"n": (1, 2**63)}, "n.1", "int"),
    "int below int64": ({"n": [-(2**63) - 1]}, "n.0", "int"),
    "int key above int64": ({"ids": {2**64: "x"}}, f"ids.{2**64}", "int"),
    "object array": (
        {"arr": np.array([1, "a"], dtype=object)},
        "arr",
        "numpy array of dtype object",
    ),
    "string array": ({"arr": np.array(["ab"])}, "arr", "numpy array of dtype <U2"),
    "sparse tensor": (
        {"w": torch.eye(3).to_sparse()},
        "w",
        "tensor with layout torch.sparse_coo",
    ),
    "float key": ({"d": {1.5: 0}}, "d.1.5", "dict key of type float"),
    "bool key": ({"d": {True: 0}}, "d.True", "dict key of type bool"),
    "tuple key": ({"d": {(1, 2): 0}}, "d.(1, 2)", "dict key of type tuple"),
    "bytearray": ({"raw": bytearray(b"x")}, "raw", "bytearray"),
    "numpy str scalar": ({"s": np.str_("x")}, "s", "numpy.str_"),
    "datetime scalar": ({"t": np.datetime64("2020-01-01")}, "t", "datetime64"),
    "lone surrogate": ({"note": "\ud800"}, "note", "str"),
    "meta tensor": ({"w": torch.empty(2, device="meta")}, "w", "meta tensor"),
    "deep tuples": (
        {"deep": _nest(100, 0)},
        "deep" + ".0" * 99,
        "containers nested more than 100 deep",
    ),
    "deep lists": (
        _nest(500, 0, lambda x: [x]),
        ".".join(["0"] * 100),
        "containers nested more than 100 deep",
    ),
    "deep dicts": (
        _nest(440, 0, lambda x: {"k": x}),
        ".".join(["k"] * 100),
        "containers nested more than 100 deep",
    ),
    "list that contains itself": (
        {"loop": _self_containing_list()},
        "loop" + ".0" * 99,
        "containers nested more than 100 deep",
    ),
    "root": (Custom(), "<root>", "Custom"),
}


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    store = Store(tmp_path / "store")
    run = store.run("refusals")
    run.save({"before": torch.arange(4.0)}, epoch=1)
    yield run
    store.close()


def _snapshot(store: Store) -> dict[str, Any]:
    def files(folder: Path) -> list[tuple[str, int]]:
        return sorted(
            (str(p.relative_to(store.path)), p.stat().st_size)
            for p in folder.rglob("*")
            if p.is_file()
        )

    return {
        "blobs": files(store.path / "blobs"),
        "tmp": files(store.path / "tmp"),
        "events": [(e.seq, e.kind) for e in store.events()],
        "leases": store.db.rows("SELECT count(*) AS n FROM leases")[0]["n"],
    }


@pytest.mark.parametrize(
    ("checkpoint", "path", "type_text"), REFUSED.values(), ids=REFUSED.keys()
)
def test_unsupported_value_is_refused_naming_path_and_type_and_nothing_is_written(
    run: Run, checkpoint: Any, path: str, type_text: str
) -> None:
    wrapped = (
        {"first": torch.randn(64), **checkpoint}
        if isinstance(checkpoint, dict)
        else checkpoint
    )
    before = _snapshot(run.store)

    with pytest.raises(UnsupportedTypeError) as caught:
        run.save(wrapped, epoch=2)

    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, LedgerError)
    assert caught.value.path == (path if path != "<root>" else "")
    assert f" at {path}:" in str(caught.value)
    assert type_text in str(caught.value)
    assert "\n" not in str(caught.value)
    assert _snapshot(run.store) == before
    assert run.state().last == 2


def test_refusal_inside_a_state_dict_names_the_ordered_dict_path(run: Run) -> None:
    state = OrderedDict(layer=OrderedDict(weight=torch.ones(2), hook=print))

    with pytest.raises(UnsupportedTypeError, match=r" at model\.layer\.hook: "):
        run.save({"model": state})


def test_store_stays_usable_after_a_refusal(run: Run) -> None:
    with pytest.raises(UnsupportedTypeError):
        run.save({"bad": {1, 2}}, epoch=2)

    result = run.save({"good": torch.ones(2)}, epoch=2)

    assert result is not None
    assert torch.equal(run.load()["good"], torch.ones(2))
    assert not os.listdir(run.store.path / "tmp")


path_steps = st.lists(
    st.one_of(
        st.text(
            st.characters(blacklist_characters=".", blacklist_categories=["Cs"]),
            min_size=1,
            max_size=4,
        ).map(lambda k: ("dict", k)),
        st.integers(-(2**63), 2**63 - 1).map(lambda k: ("dict", k)),
        st.integers(0, 3).map(lambda i: ("list", i)),
        st.integers(0, 3).map(lambda i: ("tuple", i)),
    ),
    max_size=6,
)


def _bury(steps: list[tuple[str, Any]], leaf: Any) -> Any:
    node = leaf
    for kind, key in reversed(steps):
        if kind == "dict":
            node = {"sibling": 1.0, key: node}
        else:
            items = [torch.zeros(1)] * key + [node]
            node = items if kind == "list" else tuple(items)
    return node


@given(steps=path_steps, bad=st.sampled_from([Custom(), {1}, 2**64, _function]))
def test_refusal_names_the_exact_path_of_the_bad_value_wherever_it_is(
    steps: list[tuple[str, Any]], bad: Any
) -> None:
    checkpoint = _bury(steps, bad)

    with pytest.raises(UnsupportedTypeError) as caught:
        encode(checkpoint)

    assert caught.value.path == ".".join(str(key) for _, key in steps)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_tensor_is_refused_with_how_to_store_it_instead(run: Run) -> None:
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)

    with pytest.raises(UnsupportedTypeError) as caught:
        run.save({"q": q}, epoch=2)

    message = str(caught.value)
    assert caught.value.path == "q"
    assert "quantized tensor (torch.qint8)" in message
    assert "dequantize()" in message and "int_repr()" in message
    assert "layout" not in message


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_nested_tensor_is_refused_with_how_to_store_it_instead(run: Run) -> None:
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])

    with pytest.raises(UnsupportedTypeError) as caught:
        run.save({"n": nested}, epoch=2)

    message = str(caught.value)
    assert caught.value.path == "n"
    assert "nested tensor" in message and "unbind()" in message
    assert "layout" not in message


def test_refusal_after_large_tensors_stops_their_hashing_threads() -> None:
    checkpoint = {f"w{i}": torch.randn(1 << 18) for i in range(8)}  # 1 MiB each
    checkpoint["bad"] = object()
    before = {t.name for t in threading.enumerate()}

    with pytest.raises(UnsupportedTypeError, match="bad"):
        encode(checkpoint)

    left = {t.name for t in threading.enumerate()} - before
    assert not [name for name in left if name.startswith("ckpt-hash")]
