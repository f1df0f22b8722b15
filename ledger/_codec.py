"""The checkpoint codec: a nested structure to tensor blobs plus a manifest.

Each tensor's bytes become one blob (so unchanged tensors deduplicate across
saves); the structure, with tensors replaced by references, is one msgpack
manifest. Decoding never runs pickle: a manifest can only name plain values and
blobs of raw bytes, so an untrusted store cannot execute code. The cost is that
only the types listed in `encode` are stored; anything else is refused up front.
Large tensors are hashed on a pool of threads (one per core) while the walk goes
on; the manifest is packed once every digest is known.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgpack
import numpy as np
import torch

from cas import check_digest, hash_bytes
from ledger._blobio import submit
from ledger._errors import ManifestError, UnsupportedTypeError

FORMAT_VERSION = 1

_EXT_TUPLE = 1
_EXT_TENSOR = 2
_EXT_NUMPY = 3
_EXT_NPSCALAR = 4
_EXT_ODICT = 5

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_NUMPY_KINDS = frozenset("biufc")
_MAX_DIMS = 64
# Containers (dicts, lists, tuples, OrderedDicts) nested in one another,
# refused deeper at save and at load. The loader walks without recursion, so
# it accepts this depth however deep its caller's stack is; the limit keeps a
# hostile manifest from choosing how much work and memory one value costs.
_MAX_NESTING = 100
_CONTAINERS = (dict, OrderedDict, list, tuple)
_PLAIN = (type(None), bool, int, float, str, bytes)
_NUMPY_DTYPE_STR = re.compile(r"[<>|=][biufc][0-9]{1,2}")  # what dtype.str writes
# Smaller buffers are hashed on the walking thread: handing them to the pool
# costs more than hashing them.
_POOLED_MIN = 256 << 10

_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(dt): dt
    for dt in (getattr(torch, name) for name in dir(torch))
    if isinstance(dt, torch.dtype)
}


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes live and how to rebuild it."""

    kind: str  # "torch" or "numpy"
    digest: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tie: int | None = None


@dataclass
class Encoded:
    """A checkpoint ready to store: the manifest and the tensor bytes it names."""

    manifest: bytes
    blobs: dict[str, memoryview] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(v.nbytes for v in self.blobs.values())


def encode(obj: Any) -> Encoded:
    """Encode a checkpoint structure; hash every tensor once.

    Stored: dict (str or int keys, order kept; OrderedDict with its
    `_metadata`), list, tuple, str, int (int64 range), float (bits kept
    exactly), bool, None, bytes, numpy scalars and numeric arrays, and torch
    tensors of every dtype. Tensors on any device are copied to the CPU and
    made contiguous; the bytes of a CPU contiguous tensor are hashed in place.
    Tensors sharing storage (tied weights) are stored once and tied again on
    load. Limits: strings must be valid Unicode (no lone surrogates), and
    containers (dicts, lists, tuples) nest at most 100 deep, the outermost
    counted; a structure that contains itself is refused by the same limit.

    Raises:
        UnsupportedTypeError: a value of another type, named by its path
            (`optimizer.state.3.foo`); nothing has been written anywhere.
    """
    with ThreadPoolExecutor(_hash_threads(), thread_name_prefix="ckpt-hash") as pool:
        encoder = _Encoder(pool)
        try:
            root = encoder.walk(obj)
            manifest = _pack({"format": FORMAT_VERSION, "root": root})
        except BaseException:
            # A refused value stops the walk: hash nothing more.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    # In walk order, so that a save writes its blobs in the same order each time.
    blobs: dict[str, memoryview] = {}
    for ref in encoder.refs:
        digest = ref.digest()
        if digest not in blobs:
            blobs[digest] = encoder.kept[digest]
    return Encoded(manifest=manifest, blobs=blobs)


def _hash_threads() -> int:
    # The cores this process may run on (a job scheduler's cpuset), not the
    # machine's.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _PendingRef:
    """A tensor or array reference in the structure, packed by msgpack (`_pack`'s
    `default`) once its digest is known: at once, or when a pool thread has
    hashed the bytes."""

    __slots__ = ("code", "head", "tail", "found")

    def __init__(
        self, code: int, kind: str, tail: list[Any], found: str | Future[str]
    ) -> None:
        self.code = code
        self.head = [kind]  # "torch" or "numpy"; the digest follows
        self.tail = tail  # dtype, shape, nbytes, tie
        self.found = found

    def digest(self) -> str:
        found = self.found
        return found.result() if isinstance(found, Future) else found

    def packed(self) -> msgpack.ExtType:
        return msgpack.ExtType(
            self.code, _pack([*self.head, self.digest(), *self.tail])
        )


class _Encoder:
    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.refs: list[_PendingRef] = []  # one per distinct buffer, in walk order
        self.ties: dict[tuple[Any, ...], int] = {}
        self.tied: dict[int, _PendingRef] = {}
        # The first buffer hashed to each digest; a later one with the same
        # bytes (a copy, say) is dropped as soon as its hash is known.
        self.kept: dict[str, memoryview] = {}
        self.lock = threading.Lock()

    def walk(self, root: Any) -> Any:
        # A task stack rather than recursion, so the caller's stack depth does
        # not decide what saves. A task fills slot `key` of `into`; a callable
        # task packs a tuple or OrderedDict once its children are encoded.
        top: list[Any] = [None]
        tasks: list[Any] = [(root, "", 1, top, 0)]
        while tasks:
            task = tasks.pop()
            if callable(task):
                task()
                continue
            obj, path, depth, into, key = task
            kind = type(obj)
            if kind not in _CONTAINERS:
                into[key] = self.value(obj, path)
                continue
            if depth > _MAX_NESTING:
                raise UnsupportedTypeError(
                    path,
                    f"containers nested more than {_MAX_NESTING} deep",
                    "flatten the structure (one that contains itself never ends)",
                )
            if kind is list or kind is tuple:
                out: Any = [None] * len(obj)
                children = list(enumerate(obj))
            else:
                out = dict.fromkeys(_check_key(k, path) for k in obj)
                children = list(obj.items())
            if kind is tuple:
                tasks.append(partial(_pack_tuple, into, key, out))
            elif kind is OrderedDict:
                meta: list[Any] = [None]
                tasks.append(partial(_pack_odict, into, key, out, meta))
                if getattr(obj, "_metadata", None):
                    tasks.append(
                        (obj._metadata, _join(path, "_metadata"), depth + 1, meta, 0)
                    )
            else:
                into[key] = out
            for child_key, child in reversed(children):
                tasks.append((child, _join(path, child_key), depth + 1, out, child_key))
        return top[0]

    def value(self, obj: Any, path: str) -> Any:
        kind = type(obj)
        if obj is None or kind in (bool, str, bytes, float):
            if kind is str:
                _check_str(obj, path)
            return obj
        if kind is int:
            _check_int(obj, path)
            return obj
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if kind is np.ndarray:
            return self.ndarray(obj, path)
        if isinstance(obj, np.generic) and obj.dtype.kind in _NUMPY_KINDS:
            return msgpack.ExtType(_EXT_NPSCALAR, _pack([obj.dtype.str, obj.tobytes()]))
        raise UnsupportedTypeError(path, _type_name(obj))

    def tensor(self, t: torch.Tensor, path: str) -> msgpack.ExtType:
        # Quantized and nested tensors keep state beyond one block of bytes
        # (scales, offsets, per-component sizes) that a reference cannot name.
        if t.is_nested:
            raise UnsupportedTypeError(
                path,
                "nested tensor",
                "store its components instead (list(t.unbind()))",
            )
        if t.is_quantized:
            raise UnsupportedTypeError(
                path,
                f"quantized tensor ({t.dtype})",
                "store t.dequantize(), or t.int_repr() with t.q_scale() and "
                "t.q_zero_point() (per-channel: q_per_channel_scales() and "
                "q_per_channel_zero_points())",
            )
        if t.layout != torch.strided:
            raise UnsupportedTypeError(
                path,
                f"tensor with layout {t.layout}",
                "convert it to a dense tensor (.to_dense()) first",
            )
        if t.device.type == "meta":
            raise UnsupportedTypeError(path, "meta tensor", "a meta tensor has no data")
        tie_key = _tie_key(t)
        tie = self.ties.get(tie_key)
        if tie is None:
            tie = len(self.ties)
            self.ties[tie_key] = tie
        elif tie in self.tied:
            return self.tied[tie]  # the same tensor again: no second copy or hash
        source = t.detach().resolve_conj().resolve_neg()
        if source.element_size() == 1:
            # Same bytes; and sub-byte dtypes (uint1...) have no copy kernel.
            source = source.view(torch.uint8)
        data = _byte_view(source.cpu().contiguous())
        tail = [str(t.dtype), list(t.shape), data.nbytes, tie]
        ref = self.pending(_EXT_TENSOR, "torch", data, tail)
        self.tied[tie] = ref
        return ref

    def pending(
        self, code: int, kind: str, data: memoryview, tail: list[Any]
    ) -> _PendingRef:
        if data.nbytes < _POOLED_MIN:
            digest = hash_bytes(data)
            self.keep(digest, data)
            ref = _PendingRef(code, kind, tail, digest)
        else:
            future = submit(self.pool, partial(hash_bytes, threaded=False), data)
            ref = _PendingRef(code, kind, tail, future)
            future.add_done_callback(partial(self.hashed, ref, data))
        self.refs.append(ref)
        return ref

    def hashed(self, ref: _PendingRef, data: memoryview, future: Future[str]) -> None:
        # On the hashing thread. A failure is raised where the manifest is
        # packed; a cancelled hash belongs to a walk that was stopped.
        if future.cancelled() or future.exception() is not None:
            return
        ref.found = future.result()  # and the future, with `data`, can go
        self.keep(ref.found, data)

    def keep(self, digest: str, data: memoryview) -> None:
        with self.lock:
            self.kept.setdefault(digest, data)

    def ndarray(self, arr: np.ndarray, path: str) -> msgpack.ExtType:
        if arr.dtype.kind not in _NUMPY_KINDS or arr.dtype.fields is not None:
            raise UnsupportedTypeError(
                path,
                f"numpy array of dtype {arr.dtype}",
                "only bool and numeric arrays are stored",
            )
        flat = np.ascontiguousarray(arr)
        data = memoryview(flat.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        tail = [arr.dtype.str, list(arr.shape), data.nbytes, None]
        return self.pending(_EXT_NUMPY, "numpy", data, tail)


def _check_key(key: Any, path: str) -> Any:
    if type(key) is int:
        _check_int(key, _join(path, key))
    elif type(key) is str:
        _check_str(key, _join(path, repr(key)))
    else:
        raise UnsupportedTypeError(
            _join(path, repr(key)),
            f"dict key of type {_type_name(key)}",
            "dict keys must be str or int",
        )
    return key


def _pack_tuple(into: Any, key: Any, items: list[Any]) -> None:
    into[key] = msgpack.ExtType(_EXT_TUPLE, _pack(items))


def _pack_odict(into: Any, key: Any, items: dict[Any, Any], meta: list[Any]) -> None:
    into[key] = msgpack.ExtType(_EXT_ODICT, _pack([items, meta[0]]))


def _check_int(value: int, path: str) -> None:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise UnsupportedTypeError(
            path, "int", f"{value} is outside the int64 range; store it as str"
        )


def _check_str(value: str, path: str) -> None:
    # msgpack writes UTF-8; a lone surrogate would fail deep inside packb.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedTypeError(
            path, "str", f"it is not valid Unicode ({exc.reason}); store it as bytes"
        ) from None


def _tie_key(t: torch.Tensor) -> tuple[Any, ...]:
    if t.numel() == 0:
        return ("empty", id(t))
    storage = t.untyped_storage()
    return (
        t.device,
        storage.data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.is_conj(),  # a conjugate or negative view reads other values
        t.is_neg(),
    )


def _byte_view(t: torch.Tensor) -> memoryview:
    flat = t.reshape(-1)
    if flat.numel() == 1 and flat.stride(0) != 1:
        # One element counts as contiguous whatever its stride, but a byte
        # view needs stride 1; the same element seen with stride 1 is one (and
        # needs no copy kernel, which sub-byte dtypes lack).
        flat = flat.as_strided((1,), (1,))
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_pack_pending)


def _pack_pending(obj: Any) -> msgpack.ExtType:
    if type(obj) is _PendingRef:
        return obj.packed()
    raise TypeError(f"cannot pack {_type_name(obj)}")  # the walk refused it already


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(obj: object) -> str:
    kind = type(obj)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else (f"{kind.__module__}.{kind.__qualname__}")
    )


def decode_manifest(manifest: bytes) -> tuple[Any, list[TensorRef]]:
    """Parse a manifest into its structure (tensors as TensorRef) and the refs.

    Nothing is allocated for tensors yet, so sizes can be checked first.
    Containers nested up to 100 deep are read whatever the caller's stack depth.

    Raises:
        ManifestError: not a manifest, an unknown format version, a value or
            map key the encoder never writes, containers nested more than 100
            deep, or a reference whose dtype, shape and size disagree.
    """
    refs: list[TensorRef] = []

    def leaf(node: Any) -> Any:
        if type(node) is TensorRef:
            refs.append(node)
        elif type(node) not in _PLAIN and not isinstance(node, np.generic):
            raise ManifestError(
                f"manifest holds a value of type {_type_name(node)}, which the "
                "encoder never writes: it is damaged or hostile"
            )
        return node

    try:
        doc = _unpack(manifest)
        if not isinstance(doc, dict) or "format" not in doc or "root" not in doc:
            raise ManifestError("malformed manifest: no format version or root")
        version = doc["format"]
        # True == 1 and 1.0 == 1 in Python; only the int the encoder writes counts.
        if type(version) is not int or version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format {version!r} is not supported (this version "
                f"reads format {FORMAT_VERSION}): upgrade ckpt-ledger"
            )
        root = _rebuild(doc["root"], leaf, _expand)
    except ManifestError:
        raise
    except _TooDeepError:
        raise ManifestError(
            f"manifest nests containers more than {_MAX_NESTING} deep: it is "
            "damaged or hostile"
        ) from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        reason = str(exc) or type(exc).__name__
        raise ManifestError(f"malformed manifest: {reason}") from exc
    return root, refs


def _expand(node: Any) -> Any:
    """One decoded msgpack value as the structure it stands for: an extension
    becomes its tuple, OrderedDict, TensorRef or numpy scalar (whose own
    contents `_rebuild` expands in turn); map keys are checked."""
    if type(node) is dict:
        for key in node:
            if type(key) not in (str, int):
                raise ManifestError(
                    f"manifest holds a map key of type {_type_name(key)}: "
                    "keys are str or int, it is damaged or hostile"
                )
        return node
    if type(node) is not msgpack.ExtType:
        return node
    code, data = node.code, node.data
    if code == _EXT_TUPLE:
        items = _unpack(data)
        if type(items) is not list:
            raise ManifestError("malformed manifest: a tuple that holds no list")
        return tuple(items)
    if code in (_EXT_TENSOR, _EXT_NUMPY):
        return _check_ref(_unpack(data), code)
    if code == _EXT_NPSCALAR:
        return _decode_npscalar(_unpack(data))
    if code == _EXT_ODICT:
        payload = _unpack(data)
        if type(payload) is not list or len(payload) != 2:
            raise ManifestError("malformed manifest: an ordered dict of garbage")
        items, meta = payload  # `_rebuild` expands and checks the metadata
        if type(items) is not dict:
            raise ManifestError("malformed manifest: an ordered dict of garbage")
        out: OrderedDict[Any, Any] = OrderedDict(_expand(items))
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
        return out
    raise ManifestError(f"manifest holds an unknown extension type {code}")


class _TooDeepError(Exception):
    pass


def _rebuild(
    root: Any,
    leaf: Callable[[Any], Any],
    expand: Callable[[Any], Any] | None = None,
) -> Any:
    """Copy a tree of containers, each leaf replaced by `leaf(node)` (and each
    node first replaced by `expand(node)`), with a task stack instead of
    recursion so the caller's stack depth does not matter.

    Raises _TooDeepError past `_MAX_NESTING` nested containers.
    """
    top: list[Any] = [None]
    # A task fills slot `key` of `into` with a rebuilt node; a callable task
    # finishes a container once every child pushed after it is done.
    tasks: list[Any] = [(root, 1, top, 0)]
    while tasks:
        task = tasks.pop()
        if callable(task):
            task()
            continue
        node, depth, into, key = task
        if expand is not None:
            node = expand(node)
        kind = type(node)
        if kind not in _CONTAINERS:
            into[key] = leaf(node)
            continue
        if depth > _MAX_NESTING:
            raise _TooDeepError
        children: list[tuple[Any, Any]]
        if kind is list or kind is tuple:
            out: Any = [None] * len(node)
            children = list(enumerate(node))
        else:
            out = kind.fromkeys(node)
            children = list(node.items())
        if kind is tuple:
            tasks.append(partial(_set_tuple, into, key, out))
        else:
            into[key] = out
        meta = getattr(node, "_metadata", None)
        if kind is OrderedDict and meta is not None:
            holder: list[Any] = [None]
            tasks.append(partial(_set_metadata, out, holder))
            tasks.append((meta, depth + 1, holder, 0))
        for child_key, child in reversed(children):
            tasks.append((child, depth + 1, out, child_key))
    return top[0]


def _set_tuple(into: Any, key: Any, items: list[Any]) -> None:
    into[key] = tuple(items)


def _set_metadata(out: Any, holder: list[Any]) -> None:
    out._metadata = holder[0]


def _unpack(data: bytes) -> Any:
    # Extensions are left as ExtType for `_expand`: an ext_hook would recurse
    # (each nested extension a fresh unpack on the stack), and the caller's
    # stack depth would decide what loads.
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        use_list=True,
        max_buffer_size=max(len(data), 1),
    )
    unpacker.feed(data)
    value = unpacker.unpack()
    if unpacker.tell() != len(data):
        raise ValueError(f"{len(data) - unpacker.tell()} bytes of extra data")
    return value


def _check_ref(raw: Any, code: int) -> TensorRef:
    try:
        kind, digest, dtype, shape, nbytes, tie = raw
        check_digest(digest)
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
            raise ValueError("bad shape")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"bad shape {shape!r}")
        if type(nbytes) is not int or nbytes < 0:
            raise ValueError(f"bad size {nbytes!r}")
        if tie is not None and type(tie) is not int:
            raise ValueError("bad tie")
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"malformed tensor reference in manifest: {exc}") from exc
    if (code == _EXT_TENSOR) != (kind == "torch"):
        raise ManifestError(f"tensor reference of kind {kind!r} in the wrong place")
    itemsize = _itemsize(kind, dtype)
    # Even an empty tensor's dims must fit torch's and numpy's int64 strides.
    if math.prod(max(d, 1) for d in shape) * itemsize > _INT64_MAX:
        raise ManifestError(
            f"tensor {digest[:12]}: absurd shape {tuple(shape)} for {dtype}: "
            "the manifest is damaged or hostile"
        )
    expected = math.prod(shape) * itemsize
    if expected != nbytes:
        raise ManifestError(
            f"tensor {digest[:12]}: {dtype} of shape {tuple(shape)} needs "
            f"{expected} bytes but the manifest says {nbytes}"
        )
    return TensorRef(kind, digest, dtype, tuple(shape), nbytes, tie)


def _itemsize(kind: str, dtype: str) -> int:
    if kind == "torch":
        dt = _TORCH_DTYPES.get(dtype)
        if dt is None:
            raise ManifestError(
                f"manifest names tensor dtype {dtype!r}, which this torch lacks"
            )
        return dt.itemsize
    if kind == "numpy":
        return _numpy_dtype(dtype).itemsize
    raise ManifestError(f"manifest names an unknown tensor kind {kind!r}")


def _numpy_dtype(text: Any) -> np.dtype[Any]:
    # Only the plain forms the encoder writes are parsed (no aliases, no
    # structured or object dtypes), so a hostile string cannot reach np.dtype.
    is_plain = isinstance(text, str) and _NUMPY_DTYPE_STR.fullmatch(text)
    try:
        dt = np.dtype(text) if is_plain else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in _NUMPY_KINDS or dt.fields is not None:
        raise ManifestError(f"manifest names a numpy dtype {text!r} that is not stored")
    return dt


def _decode_npscalar(raw: Any) -> Any:
    try:
        dtype, data = raw
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"malformed numpy scalar in manifest: {exc}") from exc
    dt = _numpy_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise ManifestError("malformed numpy scalar in manifest: wrong size")
    return np.frombuffer(data, dtype=dt)[0]


def build(
    root: Any,
    refs: list[TensorRef],
    read: Callable[[TensorRef], bytearray | np.ndarray],
    map_location: str | torch.device | None = None,
) -> Any:
    """Replace every TensorRef in a decoded structure by its tensor or array.

    `read(ref)` returns the verified bytes of a blob in writable memory, which
    the tensor or array then shares. Tensors tied at save time come back as one
    tensor object.
    """
    loaded: dict[tuple[Any, ...], Any] = {}

    def materialize(ref: TensorRef) -> Any:
        # A tie holds only between identical refs, whatever a manifest claims.
        tie = ref.tie if ref.tie is not None else -id(ref)
        key = (ref.digest, tie, ref.kind, ref.dtype, ref.shape)
        if key in loaded:
            return loaded[key]
        buf = read(ref)
        if ref.kind == "numpy":
            value: Any = np.frombuffer(buf, dtype=_numpy_dtype(ref.dtype)).reshape(
                ref.shape
            )
        else:
            dtype = _TORCH_DTYPES[ref.dtype]
            if ref.nbytes == 0:
                value = torch.empty(ref.shape, dtype=dtype)
            else:
                value = torch.frombuffer(buf, dtype=torch.uint8)
                value = value.view(dtype).reshape(ref.shape)
            if map_location is not None:
                value = value.to(map_location)
        loaded[key] = value
        return value

    def leaf(node: Any) -> Any:
        return materialize(node) if type(node) is TensorRef else node

    try:
        return _rebuild(root, leaf)
    except _TooDeepError:
        raise ManifestError(
            f"structure nests containers more than {_MAX_NESTING} deep: it is "
            "damaged or hostile"
        ) from None


def iter_refs(root: Any) -> Iterator[TensorRef]:
    """Every TensorRef in a decoded structure, depth first."""
    todo = [root]
    while todo:
        node = todo.pop()
        if type(node) is TensorRef:
            yield node
        elif isinstance(node, dict):
            todo.extend(reversed(node.values()))
        elif isinstance(node, (list, tuple)):
            todo.extend(reversed(node))
