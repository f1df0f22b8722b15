"""Checkpoint files from outside the store: import torch and safetensors files,
export a stored checkpoint as one.

Import trusts nothing it has not hashed: the file is hashed before and after it
is loaded and refused if it changed in between, and torch files are read with
`weights_only=True` unless the caller explicitly trusts pickle; numpy arrays of
numbers are let through, object arrays are not. The cost is reading the file
twice more than loading it alone would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch

from ledger._errors import LedgerError

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

_READ_CHUNK = 1 << 20
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)")
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.partial")


class CheckpointFileError(LedgerError, ValueError):
    """An outside checkpoint file cannot be imported or exported as asked."""


@dataclass(frozen=True)
class SourceFile:
    """Where an imported checkpoint came from: its name, size and blake3 digest."""

    name: str
    size: int
    blake3: str


def read_checkpoint_file(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> tuple[Any, SourceFile]:
    """Load a torch or safetensors checkpoint file onto the CPU.

    Torch files (.pt, .pth, .ckpt) are read with `weights_only=True`; one that
    needs full unpickling, which can run code hidden in the file, is refused
    unless `trust_pickle` is set.

    Raises:
        CheckpointFileError: an unknown suffix, a file that needs full
            unpickling, one that is not a checkpoint, or one that changed while
            it was read.
        OSError: the file cannot be read.
    """
    source = Path(path)
    suffix = check_suffix(source, "import")
    if source.is_dir():
        raise CheckpointFileError(
            f"cannot import {source}: it is a directory; name a checkpoint file"
        )
    if not source.is_file():
        raise CheckpointFileError(f"cannot import {source}: no such file")
    before = _fingerprint(source)
    if suffix == SAFETENSORS_SUFFIX:
        checkpoint = _load_safetensors(source)
    else:
        checkpoint = _load_torch(source, trust_pickle)
    after = _fingerprint(source)
    if after != before:
        raise CheckpointFileError(
            f"{source} changed while it was read (size, time or blake3 differ): "
            "wait until whoever writes it has finished, then import again"
        )
    return checkpoint, SourceFile(source.name, before[0], before[3])


def check_suffix(path: str | os.PathLike[str], verb: str) -> str:
    """The file's suffix, lower-cased, if it names a torch or safetensors file.

    Raises:
        CheckpointFileError: any other suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise CheckpointFileError(
            f"cannot {verb} {path}: unknown suffix {suffix or '(none)'!r}; use a "
            f"torch file ({', '.join(TORCH_SUFFIXES)}) or {SAFETENSORS_SUFFIX}"
        )
    return suffix


def _fingerprint(path: Path) -> tuple[int, int, int, str]:
    # Buffered reads into one reused buffer: memory stays flat for any file size.
    st = path.stat()
    hasher = blake3.blake3()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            hasher.update(view[:n])
    return st.st_size, st.st_mtime_ns, st.st_ino, hasher.hexdigest()


def _load_torch(path: Path, trust_pickle: bool) -> Any:
    try:
        with _numeric_numpy_arrays():
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise CheckpointFileError(
                f"cannot unpickle {path}: {_one_line(exc)}"
            ) from exc
        raise CheckpointFileError(_needs_pickle_message(path, str(exc))) from exc
    except (ImportError, AttributeError) as exc:
        raise CheckpointFileError(
            f"cannot unpickle {path}: {exc}; make the module that defines its "
            "classes importable (PYTHONPATH) and retry"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointFileError(
            f"{path} is not a readable torch checkpoint: {_reason(path, exc)}"
        ) from exc


@contextlib.contextmanager
def _numeric_numpy_arrays() -> Iterator[None]:
    # torch documents loading numpy arrays weights-only by allowlisting their
    # reconstruction, ndarray, dtype and the dtype's class. Only the classes of
    # numeric and bool dtypes are allowed: an object array names ObjectDType,
    # and its elements would be arbitrary pickles, so it stays refused.
    # Before torch 2.5 (no safe_globals) and numpy 1.25 (no dtype classes, so
    # object arrays could not be told apart) numpy arrays need full unpickling.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    codes = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
    dtypes = {type(np.dtype(code)) for code in codes}
    if safe_globals is None or np.dtype in dtypes:
        yield
        return
    # The function numpy pickles arrays with; numpy 2 moved its module.
    reconstruct = np.zeros(0).__reduce__()[0]
    with safe_globals([reconstruct, np.ndarray, np.dtype, *dtypes]):
        yield


def _needs_pickle_message(path: Path, message: str) -> str:
    found = _GLOBAL.search(message)
    if found is not None:
        return (
            f"{path} needs full unpickling (it references "
            f"{found.group(1).rstrip('.')}), which can run code hidden in the file: "
            "refused; pass --trust-pickle only if you trust whoever made it"
        )
    detail = _UNPICKLER_DETAIL.search(message)
    return (
        f"{path} cannot be read weights-only "
        f"({detail.group(1) if detail else 'unpickling refused'}): it is not a torch "
        "checkpoint, or it needs full unpickling, which can run code hidden in the "
        "file; pass --trust-pickle only if you trust whoever made it"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    library = _safetensors(path, "import")
    try:
        mapped = library.torch.load_file(path, device="cpu")
    except library.SafetensorError as exc:
        raise CheckpointFileError(
            f"{path} is not a readable safetensors file: {_reason(path, exc)}"
        ) from exc
    # The tensors are views of a memory map of the file: copy them, so that
    # what is stored is what was hashed even if the file changes afterwards.
    return {name: tensor.clone() for name, tensor in mapped.items()}


def _safetensors(path: Path, verb: str) -> Any:
    # An optional dependency: only .safetensors files need it.
    try:
        import safetensors
        import safetensors.torch
    except ImportError as exc:
        raise CheckpointFileError(
            f"cannot {verb} {path}: safetensors is not installed "
            "(pip install safetensors)"
        ) from exc
    return safetensors


def select_key(checkpoint: Any, key: str | None, *, what: str) -> Any:
    """The sub-structure at `key`, or the whole checkpoint without a key.

    `key` is a dotted path into nested dicts (`model.encoder`); a dict key that
    itself holds dots (`layer.0.weight`) is matched whole before it is split.

    Raises:
        CheckpointFileError: a level on the path is not a dict or lacks the key.
    """
    if key is None:
        return checkpoint
    walked: list[str] = []
    node, parts = checkpoint, key.split(".")
    while parts:
        if not isinstance(node, Mapping):
            where = ".".join(walked) or "the checkpoint"
            raise CheckpointFileError(
                f"{what}: {where} is a {type(node).__name__}, not a dict, so it "
                f"has no key {parts[0]!r}"
            )
        taken = _longest_key(node, parts)
        if taken is None:
            keys = ", ".join(repr(k) for k in list(node)[:20])
            inside = f" in {'.'.join(walked)}" if walked else ""
            raise CheckpointFileError(
                f"{what} has no key {'.'.join(parts)!r}{inside} (keys: {keys})"
            )
        found, used = taken
        node, walked, parts = node[found], [*walked, *parts[:used]], parts[used:]
    return node


def _longest_key(node: Mapping[Any, Any], parts: list[str]) -> tuple[Any, int] | None:
    # The key and how many dotted parts it spans; int keys (an optimizer's
    # state, a list of layers saved as a dict) are written as their digits.
    for used in range(len(parts), 0, -1):
        text = ".".join(parts[:used])
        if text in node:
            return text, used
        if text.isdigit() and int(text) in node:
            return int(text), used
    return None


def write_checkpoint_file(
    checkpoint: Any,
    path: str | os.PathLike[str],
    *,
    what: str,
    key: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a checkpoint, or its part at `key`, as a torch (.pt, .pth, .ckpt)
    or .safetensors file.

    `key` is a dotted path into nested dicts, as for `select_key`. The file
    appears under its name only once complete (temp file and rename); partial
    files left by dead writers of the same target are removed first.
    Returns the file's size in bytes.

    Raises:
        CheckpointFileError: an unknown suffix, a missing directory, a bad key,
            or a part that is not a flat dict of tensors for .safetensors.
        OSError: the file cannot be written.
    """
    target = Path(path)
    suffix = check_export_target(target)
    part = select_key(checkpoint, key, what=what)
    tensors = _flat_tensors(part, what, key) if suffix == SAFETENSORS_SUFFIX else None
    _remove_stale_partials(target)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        if tensors is not None:
            library = _safetensors(target, "export to")
            library.torch.save_file(tensors, partial, metadata=dict(metadata or {}))
        else:
            torch.save(part, partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target.stat().st_size


def check_export_target(path: str | os.PathLike[str]) -> str:
    """The suffix of a file to export to, once it is known to be writable there.

    Raises:
        CheckpointFileError: an unknown suffix, a directory that does not
            exist, or a directory where the file would go.
    """
    target = Path(path)
    suffix = check_suffix(target, "export to")
    if not target.parent.is_dir():
        raise CheckpointFileError(
            f"cannot export to {target}: directory {target.parent} does not exist; "
            "create it first"
        )
    if target.is_dir():
        raise CheckpointFileError(
            f"cannot export to {target}: it is a directory; name a file to write"
        )
    return suffix


def _remove_stale_partials(target: Path) -> None:
    # A writer killed mid-export leaves its hidden partial file behind; one
    # whose process is gone will never be finished. Another process may reuse
    # that pid: its partial then stays until a later export finds it dead.
    for partial in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        named = _PARTIAL.fullmatch(partial.name)
        if named is None or named["name"] != target.name:
            continue
        if not _is_alive(int(named["pid"])):
            partial.unlink(missing_ok=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True


def _flat_tensors(
    checkpoint: Any, what: str, key: str | None
) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            f"{what} is a {type(checkpoint).__name__}, not a dict of tensors: "
            "export it as .pt"
        )
    if not _is_flat(checkpoint):
        first = next(
            k
            for k, v in checkpoint.items()
            if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        )
        found = _flat_parts(checkpoint, key or "")
        hint = (
            f"export one of its flat parts with --key {', --key '.join(found)}"
            if found
            else "export it as .pt"
        )
        raise CheckpointFileError(
            f"{what} is not a flat dict of tensors ({first!r} holds a "
            f"{type(checkpoint[first]).__name__}): {hint}"
        )
    # safetensors refuses tensors that share memory (tied weights): give each
    # later sharer its own copy, so the file holds plain independent tensors.
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in checkpoint.items():
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            where = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if where in seen:
                t = t.clone()
            seen.add(where)
        out[name] = t
    return out


def _is_flat(node: Mapping[Any, Any]) -> bool:
    return all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in node.items()
    )


def _flat_parts(
    checkpoint: Mapping[Any, Any], prefix: str, limit: int = 3
) -> list[str]:
    # Breadth first, so the shallowest parts (model.encoder) come before the
    # deep ones (optimizer.state.0); each is a path `select_key` accepts.
    found: list[str] = []
    queue = [(prefix, checkpoint)]
    while queue and len(found) < limit:
        path, node = queue.pop(0)
        for k, v in node.items():
            if isinstance(v, Mapping) and isinstance(k, (str, int)):
                child = f"{path}.{k}" if path else str(k)
                if v and _is_flat(v):
                    found.append(child)
                else:
                    queue.append((child, v))
    return found[:limit]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _reason(path: Path, exc: BaseException) -> str:
    # Loaders fail on an empty file with an empty message (EOFError).
    if path.stat().st_size == 0:
        return "the file is empty"
    return _one_line(exc) or type(exc).__name__
