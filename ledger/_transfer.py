"""Checkpoint files from outside the store: import torch and safetensors files,
export a stored checkpoint as one.

Import trusts nothing it has not hashed: the file is hashed before and after it
is loaded and refused if it changed in between, and torch files are read with
`weights_only=True` unless the caller explicitly trusts pickle. The cost is
reading the file twice more than loading it alone would.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import torch

from ledger._errors import LedgerError

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

_READ_CHUNK = 1 << 20
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)")


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
            f"{path} is not a readable torch checkpoint: {_one_line(exc)}"
        ) from exc


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
            f"{path} is not a readable safetensors file: {_one_line(exc)}"
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
    """The sub-structure `checkpoint[key]`, or the whole checkpoint without a key.

    Raises:
        CheckpointFileError: the checkpoint is not a dict or has no such key.
    """
    if key is None:
        return checkpoint
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            f"{what} is a {type(checkpoint).__name__}, not a dict: drop --key"
        )
    if key not in checkpoint:
        keys = ", ".join(repr(k) for k in list(checkpoint)[:20])
        raise CheckpointFileError(f"{what} has no key {key!r} (keys: {keys})")
    return checkpoint[key]


def write_checkpoint_file(
    checkpoint: Any,
    path: str | os.PathLike[str],
    *,
    what: str,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a checkpoint as a torch (.pt, .pth, .ckpt) or .safetensors file.

    The file appears under its name only once complete (temp file and rename).
    Returns the file's size in bytes.

    Raises:
        CheckpointFileError: an unknown suffix, or a checkpoint that is not a
            flat dict of tensors for .safetensors.
        OSError: the file cannot be written.
    """
    target = Path(path)
    suffix = check_suffix(target, "export to")
    tensors = _flat_tensors(checkpoint, what) if suffix == SAFETENSORS_SUFFIX else None
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        if tensors is not None:
            library = _safetensors(target, "export to")
            library.torch.save_file(tensors, partial, metadata=dict(metadata or {}))
        else:
            torch.save(checkpoint, partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target.stat().st_size


def _flat_tensors(checkpoint: Any, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            f"{what} is a {type(checkpoint).__name__}, not a dict of tensors: "
            "export it as .pt"
        )
    not_tensor = [
        k
        for k, v in checkpoint.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if not_tensor:
        subdicts = [k for k, v in checkpoint.items() if isinstance(v, Mapping)]
        hint = (
            f"export one sub-dict with --key {subdicts[0]}"
            if subdicts
            else "export it as .pt"
        )
        first = not_tensor[0]
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
