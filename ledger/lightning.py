"""PyTorch Lightning through the ledger: a checkpoint callback and a CheckpointIO.

`LedgerCheckpoint` saves the trainer's full checkpoint each N epochs, lets the
run's best-policy promote and records final; `LedgerCheckpointIO` makes
`ckpt_path="ledger:last"` resume and lets ModelCheckpoint store through the
ledger. Lightning puts more than plain data in checkpoints, so a short, explicit
list of types is written as tagged dicts and rebuilt on load (never by pickle);
the cost is that any other type is refused and must be converted by the user.

`fit(ckpt_path="last")` does not read the ledger: Lightning looks for a
`last.ckpt` file on disk and, finding none, trains from scratch with a warning
(it resolves "last" before any callback or plugin runs, through no public
hook). Resume with `ckpt_path="ledger:last"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import os
import pathlib
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.data import AttributeDict
    from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as exc:
    raise ImportError(
        f"ledger.lightning needs Lightning ({exc}): "
        "pip install 'ckpt-ledger[lightning]'"
    ) from exc

from cas import CorruptBlobError, MissingBlobError
from ledger._codec import decode_manifest
from ledger._dist import is_writer, rank_alone
from ledger._errors import (
    LedgerError,
    ManifestError,
    PolicyError,
    UnknownReferenceError,
    UnsupportedTypeError,
)
from ledger._policies import Contract, RunOptions
from ledger._run import Resumed, Run
from ledger._store import Store

__all__ = [
    "CheckpointTypeError",
    "LedgerCheckpoint",
    "LedgerCheckpointIO",
    "ledger_epoch",
    "parse_reference",
]

log = logging.getLogger(__name__)

TAG = "__ckpt_ledger__"
"""Reserved dict key: a dict holding it is a tagged value (a Path, an Enum...)."""
PATH_KEY = "__ckpt_ledger_path__"
"""Reserved top-level key of a plugin save: the path Lightning saved it under."""
REFERENCE_PREFIX = "ledger:"

_PLAIN = (type(None), bool, int, float, str, bytes, np.ndarray)
_HINT = (
    "register Enum and dataclass types with types=[...] on LedgerCheckpoint or "
    "LedgerCheckpointIO; convert anything else to plain values in "
    "LightningModule.on_save_checkpoint"
)


class CheckpointTypeError(LedgerError, TypeError):
    """A stored value cannot be rebuilt as its type: the type was not registered
    with `types=`, or its fields or members changed since the save."""

    def __init__(self, path: str, type_name: str, hint: str) -> None:
        self.path = path
        self.type_name = type_name
        super().__init__(f"cannot rebuild {type_name} at {path or '<root>'}: {hint}")


def ledger_epoch(progress: Mapping[str, Any]) -> int:
    """The ledger's epoch for a Lightning fit loop: the one place they meet.

    `progress` is the fit loop's epoch progress (`ready`, `started`,
    `processed`, `completed`), as `fit_loop.epoch_progress.current.state_dict()`
    gives it and a checkpoint holds it under `loops.fit_loop.epoch_progress`.
    The ledger's epoch is the number of training epochs that ran to their
    end: Lightning counts an epoch as processed just before its
    `on_train_epoch_end`, so a save there is of that epoch (the first is 1),
    a save made after `fit` counts every epoch once, and a save made during
    an epoch (every N steps) records the epochs before it, told apart by its
    step.
    """
    return int(progress["processed"])


def _checkpoint_epoch(checkpoint: Mapping[str, Any]) -> int | None:
    # A full checkpoint holds its fit loop's progress. A weights-only one has
    # just Lightning's `epoch`, the epoch in progress: read as the end of it,
    # it is one too high for a save made after `fit` (documented).
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
    except (KeyError, TypeError):
        epoch = checkpoint.get("epoch")
        return epoch + 1 if type(epoch) is int else None
    return ledger_epoch(progress)


def parse_reference(path: str | Path) -> int | str | None:
    """The ledger reference in a `ckpt_path`, or None for an ordinary path.

    `ledger:last`, `ledger:best`, `ledger:final` and `ledger:auto` (the newest
    intact save) name what replay derives; `ledger:#12` or `ledger:12` an
    event; `ledger:<hex>` a manifest digest (8 characters or more).

    Raises:
        UnknownReferenceError: `ledger:` followed by nothing usable.
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text.startswith(REFERENCE_PREFIX):
        return None
    ref = text[len(REFERENCE_PREFIX) :].removeprefix("#")
    if ref in ("last", "best", "final", "auto"):
        return ref
    if ref.isdigit() and len(ref) < 8:
        return int(ref)
    if len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref):
        return ref
    raise UnknownReferenceError(
        f"invalid ledger reference {text!r}: use ledger:last, ledger:best, "
        "ledger:final, ledger:auto, ledger:#<event> or ledger:<manifest digest>"
    )


class _Types:
    """The explicit list of non-plain types a checkpoint may hold, both ways.

    Always: AttributeDict, argparse.Namespace, pathlib paths, torch.dtype and
    torch.device. Enum members and dataclass instances only of registered
    classes, found on load by name in the registry, so loading imports nothing.
    """

    def __init__(self, types: Iterable[type] = ()) -> None:
        self.known: dict[str, type] = {}
        self.add(types)

    def add(self, types: Iterable[type]) -> None:
        for cls in types:
            if not isinstance(cls, type) or not (
                issubclass(cls, enum.Enum) or dataclasses.is_dataclass(cls)
            ):
                raise PolicyError(
                    f"types= takes Enum and dataclass classes, got {cls!r}"
                )
            self.known[_name(cls)] = cls

    def plain(self, obj: Any, path: str = "") -> Any:
        kind = type(obj)
        if kind in (dict, OrderedDict):
            if TAG in obj:
                raise UnsupportedTypeError(
                    _join(path, TAG), "dict key", f"{TAG!r} is reserved by ckpt-ledger"
                )
            out = kind((k, self.plain(v, _join(path, k))) for k, v in obj.items())
            if kind is OrderedDict and hasattr(obj, "_metadata"):
                out._metadata = obj._metadata  # type: ignore[attr-defined]
            return out
        if kind in (list, tuple):
            return kind(self.plain(v, _join(path, i)) for i, v in enumerate(obj))
        if kind in _PLAIN or isinstance(obj, (torch.Tensor, np.generic)):
            return obj
        if isinstance(obj, enum.Enum) and _name(kind) in self.known:
            return {TAG: f"enum:{_name(kind)}", "value": self.plain(obj.value, path)}
        if dataclasses.is_dataclass(obj) and _name(kind) in self.known:
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return self.tagged(f"dataclass:{_name(kind)}", fields, path)
        if kind is AttributeDict:
            return self.tagged("attribute_dict", obj, path)
        if kind is argparse.Namespace:
            return self.tagged("namespace", vars(obj), path)
        if isinstance(obj, pathlib.PurePath):
            return {TAG: _path_kind(obj), "path": str(obj)}
        if kind is torch.dtype:
            return {TAG: "torch_dtype", "name": str(obj)}
        if kind is torch.device:
            return {TAG: "torch_device", "device": str(obj)}
        raise UnsupportedTypeError(path, _name(kind), _HINT)

    def tagged(self, tag: str, items: Mapping[Any, Any], path: str) -> dict[Any, Any]:
        if TAG in items:
            raise UnsupportedTypeError(
                _join(path, TAG), "key", f"{TAG!r} is reserved by ckpt-ledger"
            )
        out = {k: self.plain(v, _join(path, k)) for k, v in items.items()}
        return {TAG: tag, **out}

    def rebuild(self, obj: Any, path: str = "") -> Any:
        kind = type(obj)
        if kind is dict and TAG in obj:
            return self.untag(obj, path)
        if kind in (dict, OrderedDict):
            out = kind((k, self.rebuild(v, _join(path, k))) for k, v in obj.items())
            if kind is OrderedDict and hasattr(obj, "_metadata"):
                out._metadata = obj._metadata  # type: ignore[attr-defined]
            return out
        if kind in (list, tuple):
            return kind(self.rebuild(v, _join(path, i)) for i, v in enumerate(obj))
        return obj

    def untag(self, obj: dict[Any, Any], path: str) -> Any:
        tag = obj[TAG]
        items = {k: self.rebuild(v, _join(path, k)) for k, v in obj.items() if k != TAG}
        if tag == "attribute_dict":
            return AttributeDict(items)
        if tag == "namespace":
            return argparse.Namespace(**items)
        if tag in _PATH_TYPES:
            return _PATH_TYPES[tag](items["path"])
        if tag == "torch_dtype":
            dtype = getattr(torch, str(items["name"]).removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ManifestError(f"unknown torch dtype {items['name']!r} at {path}")
            return dtype
        if tag == "torch_device":
            return torch.device(items["device"])
        family, _, name = str(tag).partition(":")
        if family not in ("enum", "dataclass"):
            raise ManifestError(
                f"unknown tagged value {tag!r} at {path or '<root>'}: the checkpoint "
                "was written by a newer ckpt-ledger; upgrade it"
            )
        cls = self.known.get(name)
        if cls is None:
            raise CheckpointTypeError(
                path, name, f"pass types=[{name}] to rebuild it (loading never imports)"
            )
        if family == "enum":
            try:
                return cls(items["value"])
            except ValueError as exc:
                raise CheckpointTypeError(
                    path, name, f"{items['value']!r} is no longer a member"
                ) from exc
        return _build_dataclass(cls, items, path)


_PATH_TYPES: dict[str, type[pathlib.PurePath]] = {
    "path": pathlib.Path,
    "pure_posix_path": pathlib.PurePosixPath,
    "pure_windows_path": pathlib.PureWindowsPath,
}


def _path_kind(obj: pathlib.PurePath) -> str:
    if isinstance(obj, pathlib.Path):
        return "path"
    if isinstance(obj, pathlib.PureWindowsPath):
        return "pure_windows_path"
    return "pure_posix_path"


def _build_dataclass(cls: type, items: dict[str, Any], path: str) -> Any:
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    if names != set(items):
        raise CheckpointTypeError(
            path,
            _name(cls),
            f"stored fields {sorted(items)} differ from the class's {sorted(names)}",
        )
    # As stored, field by field: calling __init__ would rerun __post_init__,
    # which may change the values it computed before the save.
    obj: Any = object.__new__(cls)
    for f in fields:
        object.__setattr__(obj, f.name, items[f.name])
    return obj


def _name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    # Lightning logs 0-dim tensors; anything else is left for the ledger to judge.
    return {
        name: value.detach().item()
        if isinstance(value, torch.Tensor) and value.numel() == 1
        else value
        for name, value in metrics.items()
    }


class _RunHandle:
    """How to open the run, kept as plain data so it crosses process boundaries
    (ddp_spawn pickles the Trainer); the open Store lives in one process only."""

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        name: str,
        options: RunOptions | None,
        config: Mapping[str, Any] | None,
        contract: Contract | None,
    ) -> None:
        self.path = os.path.abspath(store.path if isinstance(store, Store) else store)
        self.name = name
        self.options = options
        self.config = None if config is None else dict(config)
        self.contract = contract
        self._store = store if isinstance(store, Store) else None
        self._owns_store = self._store is None
        self._run: Run | None = None
        self._alone_run: Run | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        gone = {"_store": None, "_run": None, "_alone_run": None}
        return {**self.__dict__, **gone, "_owns_store": True}

    def close(self) -> None:
        """Close the Store this handle opened itself (a later use reopens it)."""
        if self._owns_store and self._store is not None:
            self._store.close()
            self._store = None
        self._run = self._alone_run = None

    def peek(self) -> Run:
        """The run, open collectively already, else opened on this rank alone."""
        if self._run is not None and self._pid == os.getpid():
            return self._run
        with rank_alone():
            return self.open(alone=True)

    def is_same(self, other: _RunHandle) -> bool:
        return (self.path, self.name) == (other.path, other.name)

    def open(self, *, alone: bool = False) -> Run:
        """The run, opened (and created, on rank 0) on first use in this process.

        Under torch.distributed the first call is collective, so every rank
        must make it at the same point. With `alone` (rank 0 only, inside
        `rank_alone`) it is not, and the run it opens is kept apart: a rank 0
        that opened alone still joins the others' first collective open.
        """
        if self._pid != os.getpid():  # forked: never share a SQLite connection
            self._store, self._run, self._alone_run = None, None, None
            self._pid, self._owns_store = os.getpid(), True
        if self._run is not None:
            return self._run
        if alone:
            if self._alone_run is None:
                self._alone_run = self._open_run()
            return self._alone_run
        self._run = self._open_run()
        return self._run

    def _open_run(self) -> Run:
        if self._store is None:
            self._store = Store(self.path)
        store, options, config = self._store, self.options, self.config
        # None means "as the run was opened"; only rank 0's values are used.
        if (options is None or config is None) and self.name in store.runs():
            existing = store.get_run(self.name)
            options = existing.options if options is None else options
            config = existing.config if config is None else config
        return store.run(
            self.name, config=config, options=options, contract=self.contract
        )


class LedgerCheckpointIO(CheckpointIO):
    """A Lightning CheckpointIO that stores checkpoints as events of one run.

    Pass it as `Trainer(plugins=[LedgerCheckpointIO(store, "run")])` and
    ModelCheckpoint stores through the ledger: each save appends a save event
    (the path kept inside the checkpoint under a reserved key, so the index of
    paths is rebuilt from the ledger in a new process), removing a checkpoint
    appends an expire event (a save that is the run's best or final is kept),
    saving again to a path expires the save it replaces, and loading verifies
    every blob. Unchanged tensors are stored once. The watched metric of a
    save is ModelCheckpoint's score for that path (top-k saves only; a
    `last.ckpt` save carries none).

    `ckpt_path="ledger:last"` (or best, final, auto, `#<event>`, a digest)
    resumes from the ledger and records a resume event, once the checkpoint
    was found rebuildable (a type missing from `types=` records none). Used
    on its own the plugin cannot tell `fit` from `validate` or `test`, so
    every `ledger:` load records a resume; with a `LedgerCheckpoint` callback
    on the Trainer, only loads under `fit` do. An ordinary path loads
    without a resume event.

    A save's epoch is the fit loop's count of epochs run to their end, so a
    save made after `fit` counts each epoch once; a weights-only checkpoint
    holds no loop state, and one saved after `fit` is recorded one epoch too
    high. `ModelCheckpoint(save_last="link")` cannot work over the plugin (it
    links to a file never written): use `save_last=True`.

    Lightning calls `save_checkpoint` and `remove_checkpoint` on global rank 0
    only and holds the other ranks at its barrier, so these write on rank 0
    alone; `load_checkpoint` is called on every rank and is collective.

    Args:
        store: a Store or the path of one.
        run_name: the run; created with `options`, `config` and `contract` on
            first use, as `Store.run` does; left None, an existing run's
            recorded options and config are taken.
        types: Enum and dataclass classes the checkpoints may hold.
        fallback: where paths that are not `ledger:` references go; None
            (the default) stores them in the ledger too.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        run_name: str,
        *,
        options: RunOptions | None = None,
        config: Mapping[str, Any] | None = None,
        contract: Contract | None = None,
        types: Iterable[type] = (),
        fallback: CheckpointIO | None = None,
    ) -> None:
        self._handle = _RunHandle(store, run_name, options, config, contract)
        self.types = _Types(types)
        self.fallback = fallback
        self.stage: str | None = None
        self.resumed: Resumed | None = None
        self._paths: dict[int, str | None] = {}

    @classmethod
    def _over(
        cls, handle: _RunHandle, types: _Types, fallback: CheckpointIO
    ) -> LedgerCheckpointIO:
        # The callback's own plugin: its run and types, other paths to `fallback`.
        io = cls(handle.path, handle.name, fallback=fallback)
        io._handle, io.types = handle, types
        return io

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | Path,
        storage_options: Any | None = None,
    ) -> None:
        """Append a save event for `checkpoint` under `path` (rank 0 only)."""
        if self.fallback is not None and parse_reference(path) is None:
            self.fallback.save_checkpoint(checkpoint, path, storage_options)
            return
        if parse_reference(path) is not None:
            raise PolicyError(f"cannot save to the ledger reference {path!r}")
        if storage_options is not None:
            raise PolicyError(
                f"LedgerCheckpointIO takes no storage_options; got {storage_options!r}"
            )
        if PATH_KEY in checkpoint:
            raise UnsupportedTypeError(PATH_KEY, "key", "it is reserved by ckpt-ledger")
        if not is_writer():
            return
        key = _path_key(path)
        with rank_alone():
            run = self._handle.open(alone=True)
            replaced = self._index(run).get(key)
            plain = self.types.plain(checkpoint)
            plain[PATH_KEY] = key
            step = checkpoint.get("global_step")
            result = run.save(
                plain,
                epoch=_checkpoint_epoch(checkpoint),
                step=step if type(step) is int else None,
                metrics=_numbers(_scores_for(checkpoint, os.fspath(path))),
            )
            assert result is not None
            self._paths[result.seq] = key
            if replaced is not None:
                self._release(run, replaced, f"replaced by #{result.seq} at {key}")

    def remove_checkpoint(self, path: str | Path) -> None:
        """Append an expire event for the save stored under `path` (rank 0 only)."""
        if self.fallback is not None and parse_reference(path) is None:
            self.fallback.remove_checkpoint(path)
            return
        if not is_writer():
            return
        key = _path_key(path)
        with rank_alone():
            run = self._handle.open(alone=True)
            seq = self._index(run).get(key)
            if seq is None:
                log.debug("run %s: no live save at %s to remove", run.name, key)
                return
            self._release(run, seq, f"removed by Lightning: {key}")

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a `ledger:` reference (collective) or a saved path, verified.

        Loading never unpickles, so `weights_only` changes nothing. Tensors go
        to `map_location` when it is a device or a device string, else stay on
        the CPU.

        Raises:
            UnknownReferenceError: the reference or path names no live save.
            cas.CorruptBlobError, cas.MissingBlobError: a damaged store.
        """
        ref = parse_reference(path)
        if ref is None and self.fallback is not None:
            return self.fallback.load_checkpoint(path, map_location, weights_only)
        where = map_location if isinstance(map_location, (str, torch.device)) else None
        run = self._handle.open()
        if ref is None:
            key = _path_key(path)
            seq = self._index(run).get(key)
            if seq is None:
                raise UnknownReferenceError(
                    f"run {run.name!r} holds no live save at {key}: use a path "
                    "ModelCheckpoint reports, or ckpt_path='ledger:last'"
                )
            checkpoint = run.read_save(seq, map_location=where)
        elif self.stage in (None, "fit"):
            # Rebuild before recording: a checkpoint this reader cannot rebuild
            # must not appear in the ledger as resumed from.
            self._check_rebuild(run, ref)
            resumed = run.resume(ref, map_location=where)
            if resumed is None:
                raise UnknownReferenceError(
                    f"run {run.name!r} has no intact save to resume from "
                    f"({os.fspath(path)}): start without ckpt_path"
                )
            checkpoint, resumed.state = resumed.state, None
            self.resumed = resumed
        else:
            checkpoint = run.load(ref, map_location=where)
        if not isinstance(checkpoint, dict):
            raise UnknownReferenceError(
                f"{os.fspath(path)} in run {run.name!r} is not a Lightning checkpoint "
                f"(a {type(checkpoint).__name__}, not a dict): load it with Run.load"
            )
        checkpoint.pop(PATH_KEY, None)
        rebuilt: dict[str, Any] = self.types.rebuild(checkpoint)
        return rebuilt

    def teardown(self) -> None:
        """Close the ledger connection at the end of a Trainer stage."""
        self._handle.close()
        if self.fallback is not None:
            self.fallback.teardown()

    def _check_rebuild(self, run: Run, ref: int | str) -> None:
        """Raise CheckpointTypeError if the save `ref` names cannot be rebuilt.

        Only manifests are read: every tagged value lives in the manifest, the
        tensors in blobs of their own. For "auto", the newest save whose
        manifest reads is the one `Run.resume` will take.
        """
        if ref == "auto":
            state = run.refresh()
            saves = [state.saves[seq] for seq in sorted(state.live, reverse=True)]
        else:
            saves = [run.resolve(ref)]
        for info in saves:
            try:
                manifest = run.store.blobs.get(info.manifest)
                root, _ = decode_manifest(bytes(manifest))
            except (CorruptBlobError, MissingBlobError, ManifestError):
                continue  # Run.resume skips it or reports the damage
            if isinstance(root, dict):
                root.pop(PATH_KEY, None)
            self.types.rebuild(root)
            return

    def _release(self, run: Run, seq: int, reason: str) -> None:
        state = run.refresh()
        if seq not in state.live:
            return
        if seq in (state.best, state.final):
            log.info(
                "run %s: kept #%d (%s): it is best or final", run.name, seq, reason
            )
            return
        run.expire(seq, reason=reason)

    def _index(self, run: Run) -> dict[str, int]:
        """Path to the newest live save stored under it, read from the ledger."""
        state = run.refresh()
        for seq in sorted(state.live - self._paths.keys()):
            self._paths[seq] = _stored_path(run, state.saves[seq].manifest)
        index = {}
        for seq in sorted(state.live):
            path = self._paths.get(seq)
            if path is not None:
                index[path] = seq
        return index


def _path_key(path: str | Path) -> str:
    return os.path.normpath(os.fspath(path))


def _stored_path(run: Run, manifest: str) -> str | None:
    try:
        root, _ = decode_manifest(bytes(run.store.blobs.get(manifest)))
    except (CorruptBlobError, MissingBlobError, ManifestError) as exc:
        log.warning("run %s: cannot read manifest %s: %s", run.name, manifest, exc)
        return None
    path = root.get(PATH_KEY) if isinstance(root, dict) else None
    return path if isinstance(path, str) else None


def _scores_for(checkpoint: Mapping[str, Any], path: str) -> dict[str, Any]:
    # ModelCheckpoint keeps each top-k path's score; its `current_score` would be
    # stale for a save_last save, so only a path's own score is taken.
    scores = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, Mapping):
            continue
        monitor, best_k = state.get("monitor"), state.get("best_k_models")
        if isinstance(monitor, str) and isinstance(best_k, Mapping) and path in best_k:
            scores[monitor] = best_k[path]
    return scores


class LedgerCheckpoint(Checkpoint):
    """A Lightning callback that checkpoints a run through the ledger.

    At the end of every `every_n_epochs`-th training epoch (and of the run's
    final epoch) it saves the trainer's full checkpoint (weights, optimizers,
    schedulers, loops, callbacks, hyper-parameters) with the numbers in
    `trainer.callback_metrics`; the run's best-policy promotes from them, and
    the save of the run's `final_epoch` is recorded as final. Every rank calls
    the ledger, only global rank 0 writes, and every rank returns after the
    commit and reads the same `last_seq`.

    Only epochs that ran to their end are saved: an epoch that `max_steps`
    cuts short is not saved, and final is then not recorded (a warning says
    so). Numbers logged by validation are recorded only in epochs that
    validated (`check_val_every_n_epoch`), so an older epoch's score never
    promotes; a run with `on_nonfinite="refuse"` watching such a number
    refuses the saves of the other epochs, so give it `every_n_epochs` equal
    to `check_val_every_n_epoch` and a final epoch that validates.

    Every checkpoint also holds the torch (CPU and CUDA), numpy and Python
    `random` generator states, restored on resume so that a resumed run
    draws what an uninterrupted one would; under DDP they are rank 0's.
    Under `fast_dev_run` it does nothing at all, as Lightning saves nothing.
    With a LedgerCheckpointIO plugin on the Trainer, `ModelCheckpoint(
    save_last="link")` is refused: nothing is written to disk to link to.
    Reading `run` or `best_model_path` is never a collective, so one rank
    may read them alone, after `fit` as well.

    It also lets `Trainer.fit(ckpt_path="ledger:last")` resume (see
    `LedgerCheckpointIO`); without a LedgerCheckpointIO on the Trainer it wraps
    the current CheckpointIO, so other checkpoint files are written as before.
    Being a Checkpoint, it replaces Lightning's default ModelCheckpoint, and
    the Trainer must keep `enable_checkpointing=True`.

    Args:
        store: a Store or the path of one.
        run_name: the run; created with `options`, `config` and `contract` on
            first use, as `Store.run` does; left None, an existing run's
            recorded options and config are taken.
        every_n_epochs: save every N epochs.
        types: Enum and dataclass classes the checkpoints may hold.

    Raises:
        PolicyError: at `fit`, when the run's final epoch is not the Trainer's
            `max_epochs` (final would be recorded early or never), or when
            ModelCheckpoint(save_last="link") would store through the plugin.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        run_name: str,
        *,
        every_n_epochs: int = 1,
        options: RunOptions | None = None,
        config: Mapping[str, Any] | None = None,
        contract: Contract | None = None,
        types: Iterable[type] = (),
    ) -> None:
        if type(every_n_epochs) is not int or every_n_epochs < 1:
            raise PolicyError(
                f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}"
            )
        self._handle = _RunHandle(store, run_name, options, config, contract)
        self.every_n_epochs = every_n_epochs
        self.types = _Types(types)
        self.io: LedgerCheckpointIO | None = None
        self.last_seq: int | None = None
        self._final_epoch: int | None = None
        self._is_disabled = False
        self._validated_epoch: int | None = None
        self._validation_names: set[str] = set()
        self._before_validation: dict[str, Any] = {}

    @property
    def run(self) -> Run:
        """The run this callback writes. Reading it is never a collective: a
        run not open in this process (before or after `fit`) is opened on
        this rank alone, so rank 0 may read it while the others do not."""
        return self._handle.peek()

    @property
    def best_model_path(self) -> str:
        """`ledger:#<save>` of the run's best save ("" when none), so that
        `trainer.validate(ckpt_path="best")` loads it through the ledger."""
        best = self.run.refresh().best
        return "" if best is None else f"{REFERENCE_PREFIX}#{best}"

    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        # Lightning checkpoints nothing under fast_dev_run, and forces
        # max_epochs=1: the run is left alone, not even opened.
        self._is_disabled = bool(getattr(trainer, "fast_dev_run", False))
        if self._is_disabled:
            return
        current = trainer.strategy.checkpoint_io
        is_ours = isinstance(current, LedgerCheckpointIO) and current._handle.is_same(
            self._handle
        )
        if isinstance(current, LedgerCheckpointIO) and current.fallback is None:
            _refuse_link(trainer)

        # Check the Trainer before the run is opened (and maybe created).
        options = self._handle.options or self._handle.open().options
        final, max_epochs = options.final_epoch, trainer.max_epochs
        if stage == "fit" and final is not None and max_epochs not in (None, -1):
            if max_epochs != final:
                raise PolicyError(
                    f"run {self._handle.name!r} records final at epoch {final} but "
                    f"the Trainer has max_epochs={max_epochs}: set max_epochs={final}"
                )
        run = self._handle.open()
        self._final_epoch = final
        self._validated_epoch = None
        self.last_seq = run.refresh().last
        if is_ours:
            assert isinstance(current, LedgerCheckpointIO)
            self.io = current
            self.io._handle = self._handle
            self.io.types.add(self.types.known.values())
        else:
            self.io = LedgerCheckpointIO._over(self._handle, self.types, current)
            trainer.strategy.checkpoint_io = self.io
        self.io.stage = stage

    def state_dict(self) -> dict[str, Any]:
        """The random number generators' states, saved with every checkpoint of
        the trainer so that a resumed run draws what an uninterrupted one would."""
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored at once: Lightning draws the first epoch's shuffle and
        # loader seeds when the fit loop sets up its data, before any hook.
        if "rng" in state_dict:
            _set_rng_states(state_dict["rng"])

    def on_validation_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        # The names validation logged (sanity checking included) are those it
        # added or changed; they go stale in an epoch that does not validate.
        before = self._before_validation
        for name, value in trainer.callback_metrics.items():
            if name not in before or not _is_same(before[name], value):
                self._validation_names.add(name)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        if self._is_disabled or trainer.sanity_checking:
            return
        epoch = ledger_epoch(trainer.fit_loop.epoch_progress.current.state_dict())
        if _is_cut_off(trainer):
            log.warning(
                "run %s: max_steps=%d stopped epoch %d before its end: it is not "
                "saved, and final is not recorded; raise max_steps to finish it",
                self._handle.name,
                trainer.max_steps,
                epoch,
            )
            return
        is_final = epoch == self._final_epoch
        if epoch % self.every_n_epochs and not is_final:
            return
        metrics = dict(trainer.callback_metrics)
        if self._validated_epoch != trainer.current_epoch:
            # Validation skipped this epoch: its numbers are an older epoch's.
            for name in self._validation_names & metrics.keys():
                del metrics[name]
        run = self._handle.open()
        # The trainer's own dump, as trainer.save_checkpoint makes it; called
        # on every rank, since a sharded strategy gathers inside it.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        result = run.save(
            self.types.plain(checkpoint),
            epoch=epoch,
            step=trainer.global_step,
            metrics=_numbers(metrics),
        )
        if is_final:
            run.finalize("last" if result is None else result.seq)
        # Read after the collective returned: rank 0's commit is visible to all.
        self.last_seq = run.refresh().last


def _refuse_link(trainer: pl.Trainer) -> None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last == "link":
            raise PolicyError(
                "ModelCheckpoint(save_last='link') cannot store through "
                "LedgerCheckpointIO (no file is written to link to): use "
                "save_last=True"
            )


def _is_cut_off(trainer: pl.Trainer) -> bool:
    """True when max_steps ended the current epoch before its last batch."""
    if trainer.max_steps in (None, -1) or trainer.global_step < trainer.max_steps:
        return False
    ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return bool(ready < trainer.num_training_batches)


def _is_same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a is b or a == b)


def _rng_states() -> dict[str, Any]:
    # Plain values only: tensors, ints, floats, strings and lists, which the
    # codec stores and torch.load(weights_only=True) reads from the files
    # another ModelCheckpoint writes (a numpy array it would refuse).
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": [int(key) for key in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": version,
            "state": list(internal),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([state.cpu() for state in cuda])
        else:
            log.warning(
                "saved %d CUDA generator states, this process sees %d devices: "
                "CUDA draws will differ from an uninterrupted run",
                len(cuda),
                torch.cuda.device_count(),
            )
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            np.asarray(numpy["keys"], dtype=np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["gauss"],
        )
    )
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
