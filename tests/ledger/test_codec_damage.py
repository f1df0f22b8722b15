"""Loading from a damaged or hostile store: clean errors, never damaged data.

Damaged blobs come from real saves; hostile manifests are crafted with msgpack
in the codec's extension layout, stored as blobs and pointed at by a save event
appended inside the ledger's write transaction, so they reach `Run.load` just
as a tampered store would. The store's private `_append` is used for that.
"""

from __future__ import annotations

import _pickle
import contextlib
import os
import pickle
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cas import CorruptBlobError, MissingBlobError, hash_bytes
from ledger import ManifestError, Run, Store
from ledger._codec import FORMAT_VERSION, decode_manifest, encode

EXT_TUPLE, EXT_TENSOR, EXT_NUMPY, EXT_NPSCALAR, EXT_ODICT = 1, 2, 3, 4, 5
ABSENT = "ab" * 32


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    store = Store(tmp_path / "store")
    yield store.run("damage")
    store.close()


def _rewrite(path: Path, data: bytes) -> None:
    # Blob files are read-only; a failing disk does not ask for permission.
    os.chmod(path, 0o644)
    path.write_bytes(data)
    os.chmod(path, 0o444)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    _rewrite(path, bytes(data))


def truncate(path: Path) -> None:
    _rewrite(path, path.read_bytes()[: len(path.read_bytes()) // 2])


def delete(path: Path) -> None:
    path.unlink()


def _bytes_of(value: torch.Tensor | np.ndarray) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(value).tobytes()


def _ref(kind: str, digest: str, dtype: str, shape: list[Any], nbytes: int) -> Any:
    code = EXT_TENSOR if kind == "torch" else EXT_NUMPY
    body = msgpack.packb([kind, digest, dtype, shape, nbytes, None])
    return msgpack.ExtType(code, body)


def _manifest(root: Any, version: Any = FORMAT_VERSION) -> bytes:
    return msgpack.packb({"format": version, "root": root})


def _save_crafted(run: Run, manifest: bytes) -> int:
    store = run.store
    digest = store.blobs.put(manifest).digest
    with store.db.write():
        event = store._append(
            run.name,
            "save",
            manifest=digest,
            body={"metrics": {}, "bytes_written": len(manifest)},
            refs=[(digest, len(manifest))],
        )
    return event.seq


CHECKPOINT_ROLES = ["manifest", "torch tensor", "numpy array", "0-dim tensor"]


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (flip, CorruptBlobError),
        (truncate, CorruptBlobError),
        (delete, MissingBlobError),
    ],
    ids=["flip", "truncate", "delete"],
)
@pytest.mark.parametrize("role", CHECKPOINT_ROLES)
def test_damaged_blob_fails_the_load_with_an_error_naming_it(
    run: Run, role: str, damage: Callable[[Path], None], error: type[Exception]
) -> None:
    weights, counts, step = (
        torch.arange(16.0),
        np.arange(8, dtype=np.int32),
        torch.tensor(7),
    )
    saved = run.save({"w": weights, "counts": counts, "opt": {"step": step}})
    digest = {
        "manifest": saved.manifest,
        "torch tensor": hash_bytes(_bytes_of(weights)),
        "numpy array": hash_bytes(_bytes_of(counts)),
        "0-dim tensor": hash_bytes(_bytes_of(step)),
    }[role]
    damage(run.store.blobs.path_of(digest))

    with pytest.raises(error) as caught:
        run.load(saved.seq)

    assert caught.value.digest == digest
    assert digest in str(caught.value)
    assert "ckpt verify" in str(caught.value)


def _crafted_cases() -> dict[str, tuple[Callable[[Run], bytes], str]]:
    def valid(run: Run) -> bytes:
        return encode({"w": torch.ones(3), "t": (1, 2)}).manifest

    def blob(run: Run, size: int) -> str:
        return run.store.blobs.put(bytes(range(size))).digest

    def tuples(depth: int) -> Any:
        node: Any = None
        for _ in range(depth):
            node = msgpack.ExtType(EXT_TUPLE, msgpack.packb([node]))
        return node

    header = b"\x82\xa6format\x01\xa4root"
    return {
        "unknown format version": (
            lambda r: _manifest({}, version=99),
            "manifest format 99 is not supported",
        ),
        "no format version": (
            lambda r: msgpack.packb({"root": {}}),
            "no format version",
        ),
        "not a map": (lambda r: msgpack.packb([1, 2, 3]), "no format version"),
        "malformed bytes": (
            lambda r: b"\xc1\xc1 this is not msgpack",
            "malformed manifest",
        ),
        "empty": (lambda r: b"", "malformed manifest"),
        "truncated": (lambda r: valid(r)[:-7], "malformed manifest"),
        "trailing bytes": (lambda r: valid(r) + b"\x00", "malformed manifest"),
        "unknown extension": (
            lambda r: _manifest(msgpack.ExtType(42, b"")),
            "unknown extension type 42",
        ),
        "size disagrees with dtype and shape": (
            lambda r: _manifest(
                _ref("torch", blob(r, 20), "torch.float32", [2, 3], 20)
            ),
            "needs 24 bytes but the manifest says 20",
        ),
        "absurd shape": (
            lambda r: _manifest(
                _ref("torch", blob(r, 16), "torch.float32", [2**40, 2**40], 16)
            ),
            "absurd shape",
        ),
        "absurd empty shape": (
            lambda r: _manifest(
                _ref("torch", blob(r, 0), "torch.int8", [2**64 - 1, 0], 0)
            ),
            "absurd shape",
        ),
        "absurd empty numpy shape": (
            lambda r: _manifest(_ref("numpy", blob(r, 0), "<f4", [0, 2**63 - 1], 0)),
            "absurd shape",
        ),
        "negative dim": (
            lambda r: _manifest(_ref("torch", ABSENT, "torch.int8", [-1], 0)),
            "malformed tensor reference",
        ),
        "too many dims": (
            lambda r: _manifest(_ref("torch", ABSENT, "torch.int8", [1] * 65, 1)),
            "malformed tensor reference",
        ),
        "unknown torch dtype": (
            lambda r: _manifest(_ref("torch", ABSENT, "torch.float99", [1], 4)),
            "torch.float99",
        ),
        "object numpy dtype": (
            lambda r: _manifest(_ref("numpy", ABSENT, "|O", [1], 8)),
            "numpy dtype '|O'",
        ),
        "numpy dtype alias": (
            lambda r: _manifest(_ref("numpy", ABSENT, "a5", [1], 5)),
            "numpy dtype 'a5'",
        ),
        "path in place of a digest": (
            lambda r: _manifest(_ref("torch", "../../ledger.db", "torch.int8", [1], 1)),
            "invalid digest",
        ),
        "numpy ref in a tensor slot": (
            lambda r: _manifest(
                msgpack.ExtType(
                    EXT_TENSOR, msgpack.packb(["numpy", ABSENT, "<i4", [1], 4, None])
                )
            ),
            "in the wrong place",
        ),
        "numpy scalar of the wrong size": (
            lambda r: _manifest(
                msgpack.ExtType(EXT_NPSCALAR, msgpack.packb(["<f8", b"ab"]))
            ),
            "wrong size",
        ),
        "ordered dict of garbage": (
            lambda r: _manifest(msgpack.ExtType(EXT_ODICT, msgpack.packb(7))),
            "malformed manifest",
        ),
        "tuples nested 400 deep": (
            lambda r: _manifest(tuples(400)),
            "more than 100 deep",
        ),
        "lists nested 900 deep": (
            lambda r: header + b"\x91" * 900 + b"\xc0",
            "more than 100 deep",
        ),
        "lists nested 101 deep": (
            lambda r: header + b"\x91" * 101 + b"\xc0",
            "more than 100 deep",
        ),
        "timestamp extension": (
            lambda r: _manifest({"t": msgpack.Timestamp(0, 0)}),
            "type msgpack.ext.Timestamp",
        ),
        "tensor reference as a map key": (
            lambda r: (
                header
                + b"\x81"
                + msgpack.packb(_ref("torch", blob(r, 4), "torch.float32", [1], 4))
                + b"\xc0"
            ),
            "map key of type msgpack.ext.ExtType",
        ),
        "tuple wrapping a map": (
            lambda r: _manifest(msgpack.ExtType(EXT_TUPLE, msgpack.packb({"a": 1}))),
            "a tuple that holds no list",
        ),
        "float format version": (
            lambda r: _manifest({}, version=float(FORMAT_VERSION)),
            "format 1.0 is not supported",
        ),
        "bool format version": (
            lambda r: _manifest({}, version=True),
            "format True is not supported",
        ),
        "lists nested 5000 deep": (
            lambda r: header + b"\x91" * 5000 + b"\xc0",
            "malformed manifest",
        ),
    }


CRAFTED = _crafted_cases()


@pytest.mark.parametrize(("make", "message"), CRAFTED.values(), ids=CRAFTED.keys())
def test_hostile_or_broken_manifest_gives_a_clear_manifest_error(
    run: Run, make: Callable[[Run], bytes], message: str
) -> None:
    seq = _save_crafted(run, make(run))

    with pytest.raises(ManifestError) as caught:
        run.load(seq)

    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_ref_whose_blob_has_another_size_names_the_blob(run: Run) -> None:
    digest = run.store.blobs.put(bytes(12)).digest
    seq = _save_crafted(
        run, _manifest({"w": _ref("torch", digest, "torch.float32", [4], 16)})
    )

    with pytest.raises(CorruptBlobError) as caught:
        run.load(seq)

    assert caught.value.digest == digest
    assert "the manifest says 16" in str(caught.value)


@pytest.mark.parametrize("present", [True, False], ids=["small blob", "no blob"])
def test_huge_consistent_sizes_fail_before_anything_is_allocated(
    run: Run, present: bool
) -> None:
    digest = run.store.blobs.put(b"tiny blob").digest if present else ABSENT
    huge = _ref("torch", digest, "torch.uint8", [2**31, 2**31], 2**62)
    seq = _save_crafted(run, _manifest({"w": huge}))
    tracemalloc.start()

    try:
        with pytest.raises((CorruptBlobError, MissingBlobError)) as caught:
            run.load(seq)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert caught.value.digest == digest
    assert peak < 16 << 20


def test_a_tie_never_joins_refs_of_different_dtype_or_shape(run: Run) -> None:
    digest = run.store.blobs.put(bytes(range(8))).digest
    tied = [
        msgpack.ExtType(
            EXT_TENSOR, msgpack.packb(["torch", digest, dtype, shape, 8, 0])
        )
        for dtype, shape in [("torch.float32", [2]), ("torch.int64", [1])]
    ]
    seq = _save_crafted(run, _manifest(tied))

    first, second = run.load(seq)

    assert (first.dtype, tuple(first.shape)) == (torch.float32, (2,))
    assert (second.dtype, tuple(second.shape)) == (torch.int64, (1,))


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, ("import sys; sys._ckpt_pwned = True",))


PAYLOAD = pickle.dumps(_Exploit())


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the load path tried to unpickle")

    monkeypatch.delattr(sys, "_ckpt_pwned", raising=False)
    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_the_pickle_payload_used_here_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(sys, "_ckpt_pwned", raising=False)

    pickle.loads(PAYLOAD)  # noqa: S301 - proving the payload works

    assert getattr(sys, "_ckpt_pwned", False) is True
    del sys._ckpt_pwned  # type: ignore[attr-defined]


@pytest.mark.usefixtures("no_pickle")
def test_tensor_pointing_at_a_pickle_payload_loads_as_raw_bytes(run: Run) -> None:
    digest = run.store.blobs.put(PAYLOAD).digest
    ref = _ref("torch", digest, "torch.uint8", [len(PAYLOAD)], len(PAYLOAD))
    seq = _save_crafted(run, _manifest({"model": ref}))

    loaded = run.load(seq)

    assert loaded["model"].numpy().tobytes() == PAYLOAD
    assert not hasattr(sys, "_ckpt_pwned")


@pytest.mark.parametrize(
    ("kind", "dtype", "error"),
    [
        ("torch", "torch.float64", CorruptBlobError),
        ("numpy", "|O", ManifestError),
        ("numpy", "|V8", ManifestError),
    ],
    ids=["size mismatch", "object dtype", "void dtype"],
)
@pytest.mark.usefixtures("no_pickle")
def test_pickle_payload_behind_other_refs_gives_a_clean_error(
    run: Run, kind: str, dtype: str, error: type[Exception]
) -> None:
    digest = run.store.blobs.put(PAYLOAD).digest
    ref = _ref(kind, digest, dtype, [1], 8)
    seq = _save_crafted(run, _manifest({"model": ref}))

    with pytest.raises(error):
        run.load(seq)

    assert not hasattr(sys, "_ckpt_pwned")


@pytest.mark.usefixtures("no_pickle")
def test_a_pickle_in_place_of_the_manifest_is_a_manifest_error(run: Run) -> None:
    seq = _save_crafted(run, PAYLOAD)

    with pytest.raises(ManifestError, match="malformed manifest"):
        run.load(seq)

    assert not hasattr(sys, "_ckpt_pwned")


@given(data=st.binary(max_size=300))
def test_decoding_any_bytes_gives_a_structure_or_a_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        decode_manifest(data)


@given(position=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.booleans())
def test_decoding_a_mangled_manifest_gives_a_structure_or_a_manifest_error(
    position: int, value: int, cut: bool
) -> None:
    manifest = bytearray(
        encode(
            {
                "w": torch.ones(2, 3),
                "a": np.zeros(2),
                "s": np.int64(3),
                "t": (1, [2.5, None]),
                "o": torch.nn.Linear(1, 1).state_dict(),
            }
        ).manifest
    )
    position %= len(manifest)
    if cut:
        del manifest[position:]
    else:
        manifest[position] = value

    with contextlib.suppress(ManifestError):
        decode_manifest(bytes(manifest))


def _store_with_hook(path: Path, log: list[tuple[str, str, int]]) -> Store:
    # Records, at every step of the save protocol, the size of the file under
    # the blob's name (-1 when there is none).
    def hook(step: str, digest: str) -> None:
        if len(digest) == 64:
            target = path / "blobs" / digest[:2] / digest
            size = target.stat().st_size if target.exists() else -1
            log.append((step, digest, size))

    return Store(path, hook=hook)


@pytest.mark.parametrize("role", ["tensor", "manifest"])
def test_C13_truncated_blob_is_rewritten_atomically_by_the_next_save(
    tmp_path: Path, role: str
) -> None:
    log: list[tuple[str, str, int]] = []
    store = _store_with_hook(tmp_path / "store", log)
    run = store.run("c13")
    weights = torch.randn(256)
    first = run.save({"w": weights}, epoch=1)
    digest = hash_bytes(_bytes_of(weights)) if role == "tensor" else first.manifest
    path = store.blobs.path_of(digest)
    size = path.stat().st_size
    _rewrite(path, path.read_bytes()[: size * 8 // 10])
    with pytest.raises(CorruptBlobError, match=digest):
        run.load(first.seq)
    old_inode = path.stat().st_ino
    log.clear()

    second = run.save({"w": weights}, epoch=2)

    assert second.manifest == first.manifest
    assert second.bytes_written == size
    steps = [(step, s) for step, d, s in log if d == digest]
    rename = steps.index(("rename", size))
    assert {s for _, s in steps[:rename]} == {size * 8 // 10}
    assert path.stat().st_size == size and path.stat().st_ino != old_inode
    store.blobs.verify(digest)
    assert not os.listdir(store.path / "tmp")
    assert torch.equal(run.load(first.seq)["w"], weights)
    assert torch.equal(run.load(second.seq)["w"], weights)
    store.close()


def test_C13_flipped_byte_is_caught_on_load_and_by_verify(run: Run) -> None:
    weights = torch.randn(256)
    first = run.save({"w": weights}, epoch=1)
    digest = hash_bytes(_bytes_of(weights))
    flip(run.store.blobs.path_of(digest))

    second = run.save({"w": weights}, epoch=2)

    assert second.bytes_written == 0  # same size: trusted at save, judged at read
    for seq in (first.seq, second.seq):
        with pytest.raises(CorruptBlobError, match=digest) as caught:
            run.load(seq)
        assert caught.value.reason == "hash mismatch"
    with pytest.raises(CorruptBlobError, match=digest):
        run.store.blobs.verify(digest)
