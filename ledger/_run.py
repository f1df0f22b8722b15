"""A run: saving, loading, resuming and finalising checkpoints through the ledger.

Every change follows the write order that makes crashes harmless: lease the
digests, write the blobs durably, then one transaction appends the events,
their digest rows and drops the lease. Each decision (promote, expire) is taken
inside that transaction from a replay of the ledger, so two processes never
judge from stale state, and the ledger stays the only source of truth.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cas import CorruptBlobError, MissingBlobError, hash_bytes
from ledger._dist import agree_on_seq
from ledger._errors import (
    LedgerStateError,
    ManifestError,
    MetricError,
    PolicyError,
    UnknownReferenceError,
)
from ledger._events import Event
from ledger._policies import BestPolicy, RunOptions, check_metrics
from ledger._provenance import provenance
from ledger._replay import REPLAY_COLUMNS, RunState, SaveInfo, fold, replay
from ledger._runlock import claim

if TYPE_CHECKING:
    import torch

    from ledger._codec import Encoded
    from ledger._store import Store

log = logging.getLogger(__name__)

RESUME_MODES = ("none", "auto", "last", "best", "final")
_IS_CLAIMED = """
SELECT 1 FROM refs r JOIN events e ON e.seq = r.seq
WHERE r.digest = ? AND e.kind = 'save'
  AND r.seq NOT IN (SELECT target FROM events WHERE kind = 'expire')
UNION ALL SELECT 1 FROM leases WHERE digest = ? AND expires > ?
"""


class MetricWarning(UserWarning):
    """A save's watched metric is missing or not finite: recorded, never promoted."""


class DamagedCheckpointWarning(UserWarning):
    """`resume("auto")` skipped a save whose blobs are damaged."""


@dataclass(frozen=True)
class SaveResult:
    """What a save appended: its event, and the promote and expires it caused."""

    seq: int
    manifest: str
    promoted: bool
    expired: tuple[int, ...] = ()
    bytes_written: int = 0


@dataclass
class Resumed:
    """A checkpoint a run resumed from: the save it came from and its contents."""

    seq: int
    epoch: int | None
    step: int | None
    metrics: dict[str, Any]
    state: Any
    resume_event: int | None = None
    config_diff: dict[str, list[Any]] = field(default_factory=dict)


class Run:
    """One training run in a store. Obtain it from `Store.run`."""

    def __init__(
        self, store: Store, name: str, config: dict[str, Any], config_hash: str
    ) -> None:
        self.store = store
        self.name = name
        self.config = config
        self.config_hash = config_hash
        self.config_diff: dict[str, list[Any]] = {}
        self.seed: int | None = None  # given to Store.run; resumes record it
        self._state = RunState(run=name)

    def __repr__(self) -> str:
        return f"Run({self.name!r}, store={str(self.store.path)!r})"

    @property
    def options(self) -> RunOptions:
        """The policies the run was opened with."""
        return RunOptions.from_record(self.refresh().options)

    def refresh(self) -> RunState:
        """Fold events appended since the last look into the cached state."""
        rows = self.store.db.tuples(
            f"SELECT {REPLAY_COLUMNS} FROM events WHERE run = ? AND seq > ? "
            "ORDER BY seq",
            [self.name, self._state.seq],
        )
        if rows:
            self._state = replay(rows, self._state, run=self.name)
        return self._state

    def state(self, at: int | str | None = None) -> RunState:
        """The run's state now, or as of event `at` (a sequence number, or an
        ISO 8601 UTC time such as `2026-12-03T18:00:00Z`)."""
        if at is None:
            return fold((), self.refresh())
        if isinstance(at, bool) or not isinstance(at, (int, str)):
            raise PolicyError(f"at must be an event number or an ISO time, got {at!r}")
        if isinstance(at, int):
            if not 0 <= at < 2**63:
                raise PolicyError(
                    f"at must be an event number from 0 to 2**63 - 1, got {at}"
                )
            last = at
        else:
            # A prefix even if the clock stepped back: up to the newest event
            # stamped at or before the time, with whatever precedes it.
            row = self.store.db.db.execute(
                "SELECT MAX(seq) FROM events WHERE run = ? AND time <= ?",
                [self.name, _normalise_time(at)],
            ).fetchone()
            last = row[0] or 0
        rows = self.store.db.tuples(
            f"SELECT {REPLAY_COLUMNS} FROM events WHERE run = ? AND seq <= ? "
            "ORDER BY seq",
            [self.name, last],
        )
        return replay(rows, run=self.name)

    def _claim_writer(self) -> None:
        # A read-only store refuses the write itself, with its own message.
        if not self.store.db.read_only:
            claim(self.store.path, self.name, self.store)

    def _check_config_recorded(self) -> None:
        # A handle reopened with allow_config_change must first record the
        # change in a resume event, or the ledger would never show it.
        recorded = self.refresh().config_hash
        if self.config_hash and recorded and recorded != self.config_hash:
            keys = ", ".join(self.config_diff) or "unknown keys"
            raise PolicyError(
                f"run {self.name!r} was reopened with a changed config ({keys}) "
                "that no event records yet: call run.resume(...) first (resume("
                '"none") to start fresh)'
            )

    def history(self, kind: str | None = None) -> list[Event]:
        """The run's events in order, optionally of one kind."""
        return self.store.events(self.name, kind=kind)

    def save(
        self,
        checkpoint: Any,
        *,
        epoch: int | None = None,
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> SaveResult | None:
        """Save a checkpoint structure and record a save event.

        Under the run's best-policy, a strict improvement of the watched metric
        also appends a promote event; retention may append expire events; all in
        the same transaction as the save. Under torch.distributed only rank 0
        writes; every rank returns only after rank 0's commit, and other ranks
        get None.

        Args:
            checkpoint: nested dicts (str or int keys), OrderedDicts, lists
                and tuples of torch tensors (any dtype), numpy numeric
                arrays and scalars, str, int (int64), float, bool, None and
                bytes.
            epoch: completed epochs, counted from 1.
            step: the global step, for runs that save by step.
            metrics: name to number (int, float, numpy scalar, one-element tensor).

        Raises:
            MetricError: a metric is not a number, or the watched metric is
                missing/non-finite and the run refuses such saves.
            UnsupportedTypeError: the checkpoint holds a type the codec refuses.
            cas.BlobStoreIOError: the disk refused a write.
            Nothing is written to the ledger or the store when any is raised.
        """
        result: list[SaveResult] = []

        def work() -> int:
            # Validation runs where the save is written (rank 0), so a refusal
            # reaches every rank through the broadcast instead of hanging it.
            self._claim_writer()
            self._check_config_recorded()
            at_epoch = _counter("epoch", epoch)
            at_step = _counter("step", step)
            clean = check_metrics(metrics)
            options = self.options
            if options.best is not None and at_epoch is None:
                _check_step_only(self.name, options.best)
            watched = _watched_value(
                options.best, clean, at_epoch, options.on_nonfinite
            )
            if options.best is not None and (
                watched is None or not math.isfinite(watched[1])
            ):
                shown = "missing" if watched is None else watched[1]
                warnings.warn(
                    f"run {self.name}: epoch {at_epoch}: watched metric "
                    f"{options.best.metric!r} is {shown}: saved, but it cannot be "
                    "promoted",
                    MetricWarning,
                    stacklevel=4,
                )
            # The codec brings torch: imported by saving, not by reading runs.
            from ledger._codec import encode

            encoded = encode(checkpoint)
            saved = self._commit_save(
                encoded, at_epoch, at_step, clean, watched, options
            )
            result.append(saved)
            return saved.seq

        agree_on_seq(work, "save a checkpoint")
        return result[0] if result else None

    def _commit_save(
        self,
        encoded: Encoded,
        epoch: int | None,
        step: int | None,
        metrics: dict[str, Any],
        watched: tuple[str, float] | None,
        options: RunOptions,
    ) -> SaveResult:
        store = self.store
        manifest_digest = hash_bytes(encoded.manifest)
        refs = {d: v.nbytes for d, v in encoded.blobs.items()}
        refs[manifest_digest] = len(encoded.manifest)

        # 1. Lease every digest first, so a concurrent gc keeps a blob that is
        #    already present (and about to be referenced) as well as new ones.
        leases = store._lease(refs)
        absent = [d for d, n in refs.items() if not store.blobs.has_blob(d, size=n)]
        try:
            store._step("leased", manifest_digest)
            # 2. Write missing blobs durably, several at once; the directory
            #    fsyncs are batched, after every blob's own fsync.
            items: list[tuple[str, memoryview | bytes]] = [
                *encoded.blobs.items(),
                (manifest_digest, encoded.manifest),
            ]
            from ledger._blobio import write_blobs

            written = write_blobs(store.blobs, items)
            store.blobs.sync_dirs(refs)
            store._step("blobs_written", manifest_digest)

            # 3. One transaction: the save, its digests, its consequences, and
            #    the lease release. A crash here is rolled back by SQLite.
            with store.db.write():
                if store._release(leases) < len(leases):
                    # The save outlived its lease and a gc may have taken its
                    # blobs: under the lock no gc runs, so put back what is gone.
                    log.warning(
                        "run %s: a save outlived its lease (lease_ttl=%gs); blobs "
                        "gc took were written again: raise lease_ttl",
                        self.name,
                        store.lease_ttl,
                    )
                    for digest, view in encoded.blobs.items():
                        store.blobs.put(view, digest=digest)
                    store.blobs.put(encoded.manifest, digest=manifest_digest)
                state = self.refresh()
                save = store._append(
                    self.name,
                    "save",
                    epoch=epoch,
                    step=step,
                    manifest=manifest_digest,
                    metric=watched[0] if watched else None,
                    value=watched[1] if watched and math.isfinite(watched[1]) else None,
                    body={"metrics": metrics, "bytes_written": written},
                    refs=refs.items(),
                )
                appended = [save]
                promoted = self._maybe_promote(save, watched, options.best, state)
                if promoted is not None:
                    appended.append(promoted)
                state = fold(appended, state)
                expired = self._apply_retention(state, options)
            store._step("committed", manifest_digest)
        except BaseException:
            self._drop_leases(leases, absent)
            raise
        log.info(
            "run %s: saved #%d (epoch %s, %d new bytes)%s",
            self.name,
            save.seq,
            epoch,
            written,
            " and promoted it" if promoted else "",
        )
        return SaveResult(
            seq=save.seq,
            manifest=manifest_digest,
            promoted=promoted is not None,
            expired=tuple(expired),
            bytes_written=written,
        )

    def _drop_leases(self, leases: list[int], absent: list[str]) -> None:
        # Cleanup after a failed save: drop the leases, and delete the blobs the
        # save made appear unless an unexpired save or lease needs them, as gc
        # would (the write lock keeps either from starting meanwhile). If even
        # this fails, the leases lapse by TTL and gc takes the blobs.
        store = self.store
        try:
            with store.db.write() as db:
                store._release(leases)
                now = time.time()
                for digest in absent:
                    if not db.execute(_IS_CLAIMED, [digest, digest, now]).fetchone():
                        store.blobs.delete(digest)
        except Exception:  # noqa: BLE001 - the original error is re-raised by the caller
            log.warning("run %s: could not drop leases after a failed save", self.name)

    def _maybe_promote(
        self,
        save: Event,
        watched: tuple[str, float] | None,
        best: BestPolicy | None,
        state: RunState,
    ) -> Event | None:
        if best is None or watched is None or not best.is_eligible(save.epoch):
            return None
        value = watched[1]
        if not best.improves(value, state.best_value):
            return None
        return self.store._append(
            self.name,
            "promote",
            epoch=save.epoch,
            step=save.step,
            metric=best.metric,
            value=value,
            target=save.seq,
            body={
                "previous": state.best,
                "previous_value": state.best_value,
                "mode": best.mode,
                "tolerance": best.tolerance,
            },
        )

    def _apply_retention(self, state: RunState, options: RunOptions) -> list[int]:
        if options.keep_last is None:
            return []
        protected = {state.best, state.final, state.last} | state.resume_targets
        live = sorted(state.live)
        keep = set(live[-options.keep_last :])
        expired = []
        for seq in live:
            if seq in keep or seq in protected:
                continue
            self.store._append(
                self.name,
                "expire",
                epoch=state.saves[seq].epoch,
                step=state.saves[seq].step,
                target=seq,
                body={"reason": f"retention keep_last={options.keep_last}"},
            )
            expired.append(seq)
        return expired

    def resolve(self, ref: int | str) -> SaveInfo:
        """The save a reference names: "last", "best", "final", an event number
        (a promote, final, resume or expire event names its save), or a manifest
        digest or a prefix of at least 8 hex characters.

        Raises:
            UnknownReferenceError: nothing matches, or the save was expired.
        """
        state = self.refresh()
        seq: int | None
        if isinstance(ref, bool):
            raise UnknownReferenceError(f"invalid checkpoint reference {ref!r}")
        if ref in ("last", "best", "final"):
            seq = getattr(state, str(ref))
            if seq is None:
                raise UnknownReferenceError(
                    f"run {self.name!r} has no {ref} checkpoint yet"
                    + (" (no save has been promoted)" if ref == "best" else "")
                )
        elif isinstance(ref, int) or (
            # Only ASCII digits are event numbers ("¹" and "٣" are digits too).
            isinstance(ref, str) and ref.isascii() and ref.isdigit() and len(ref) < 8
        ):
            if not 0 < int(ref) < 2**63:
                raise UnknownReferenceError(f"no event #{ref} in run {self.name!r}")
            seq = self._save_of_event(int(ref))
        elif isinstance(ref, str) and len(ref) >= 8 and _is_hex(ref):
            matches = [s for s in state.saves.values() if s.manifest.startswith(ref)]
            if len({m.manifest for m in matches}) > 1:
                raise UnknownReferenceError(
                    f"digest prefix {ref!r} is ambiguous in run {self.name!r}: "
                    "give more characters"
                )
            if not matches:
                raise UnknownReferenceError(
                    f"no save of run {self.name!r} has a manifest starting {ref!r}"
                )
            seq = (
                max(m.seq for m in matches if m.seq in state.live)
                if any(m.seq in state.live for m in matches)
                else matches[-1].seq
            )
        else:
            raise UnknownReferenceError(
                f"invalid checkpoint reference {ref!r}: use last, best, final, an "
                "event number or a manifest digest (at least 8 hex characters)"
            )
        if seq not in state.live:
            raise UnknownReferenceError(
                f"save #{seq} of run {self.name!r} was expired by retention; its "
                "blobs may have been collected"
            )
        return state.saves[seq]

    def _save_of_event(self, seq: int) -> int:
        try:
            ev = self.store.event(seq)
        except UnknownReferenceError:
            raise UnknownReferenceError(
                f"no event #{seq} in run {self.name!r}"
            ) from None
        if ev.run != self.name:
            raise UnknownReferenceError(
                f"event #{seq} belongs to run {ev.run!r}, not {self.name!r}"
            )
        if ev.kind == "save":
            return ev.seq
        if ev.target is None:
            raise UnknownReferenceError(f"event #{seq} ({ev.kind}) names no checkpoint")
        return ev.target

    def load(
        self,
        ref: int | str = "last",
        *,
        map_location: str | torch.device | None = None,
    ) -> Any:
        """Load a checkpoint structure, verifying every blob as it is read.

        Under torch.distributed every rank loads the save rank 0 resolved.

        Raises:
            UnknownReferenceError: the reference names no live save.
            cas.CorruptBlobError, cas.MissingBlobError: a damaged store (a
                blob the OS cannot read is a cas.UnreadableBlobError, which is
                a CorruptBlobError).
        """
        seq = agree_on_seq(lambda: self.resolve(ref).seq, f"resolve {ref!r}")
        assert seq is not None
        return self.read_save(seq, map_location=map_location)

    def read_save(
        self, seq: int, *, map_location: str | torch.device | None = None
    ) -> Any:
        """Load the checkpoint of save event `seq` (no resolution, no event)."""
        info = self.refresh().saves.get(seq)
        if info is None:
            raise UnknownReferenceError(
                f"event #{seq} is not a save of run {self.name!r}"
            )
        blobs = self.store.blobs
        manifest = blobs.get(info.manifest)
        from ledger._blobio import BlobReader  # torch, as for saving
        from ledger._codec import build, decode_manifest

        root, refs = decode_manifest(bytes(manifest))
        for ref in refs:
            size = blobs.size_of(ref.digest)
            if size != ref.nbytes:
                raise CorruptBlobError(
                    ref.digest,
                    blobs.path_of(ref.digest),
                    f"size {size} bytes, the manifest says {ref.nbytes}",
                )

        reader = BlobReader(blobs, refs)
        try:
            return build(root, refs, reader.read, map_location)
        finally:
            reader.close()

    def resume(
        self,
        mode: int | str = "auto",
        *,
        ref: int | str | None = None,
        map_location: str | torch.device | None = None,
        seed: int | None = None,
    ) -> Resumed | None:
        """Resume training: resolve a checkpoint, load it, record a resume event.

        Args:
            mode: "none" (start fresh: returns None, and records a resume
                event naming no save when the run has saves or a changed
                config), "auto" (`ref` if given, else the newest intact save;
                None when there is none), "last",
                "best", "final", or an explicit reference (event number or
                manifest digest).
            ref: with "auto", an explicit reference to prefer.
            map_location: where to put the loaded tensors.
            seed: recorded in the resume event's provenance; by default the
                seed given to `Store.run`.

        Raises:
            UnknownReferenceError: the mode names no checkpoint.
            cas.CorruptBlobError, cas.MissingBlobError: the named checkpoint is
                damaged (with "auto" a damaged save is skipped with a warning).
            LedgerStateError: with "auto", every live save is damaged.
        """
        loaded: list[tuple[SaveInfo, Any]] = []
        events: list[Event] = []

        def work() -> int | None:
            self._claim_writer()
            if mode == "none":
                self._start_fresh("none", seed)
                return None
            if mode == "auto" and ref is None:
                found = self._newest_intact(map_location)
                if found is None:
                    self._refuse_all_damaged()
                    self._start_fresh("auto", seed)
                    return None
                loaded.append(found)
            else:
                target = self.resolve(
                    ref if mode == "auto" and ref is not None else mode
                )
                loaded.append(
                    (target, self.read_save(target.seq, map_location=map_location))
                )
            info = loaded[0][0]
            with self.store.db.write():
                body = self._resume_body(str(mode), seed)
                ev = self.store._append(
                    self.name,
                    "resume",
                    epoch=info.epoch,
                    step=info.step,
                    target=info.seq,
                    body=body,
                )
            log.info(
                "run %s resumed from #%d (epoch %s)", self.name, info.seq, info.epoch
            )
            events.append(ev)
            return info.seq

        seq = agree_on_seq(work, f"resume ({mode})")
        if seq is None:
            return None
        if loaded:
            info, checkpoint = loaded[0]
            resume_event: int | None = events[0].seq
        else:
            info = self.refresh().saves[seq]
            checkpoint = self.read_save(seq, map_location=map_location)
            resume_event = None
        return Resumed(
            seq=info.seq,
            epoch=info.epoch,
            step=info.step,
            metrics=dict(info.metrics),
            state=checkpoint,
            resume_event=resume_event,
            config_diff=dict(self.config_diff),
        )

    def _start_fresh(self, mode: str, seed: int | None) -> None:
        # Starting over on a run with saves is a decision the ledger records,
        # as is a changed config; otherwise there is nothing to record.
        state = self.refresh()
        if not state.saves and state.config_hash == self.config_hash:
            return
        with self.store.db.write():
            ev = self.store._append(
                self.name, "resume", body=self._resume_body(mode, seed)
            )
        log.info("run %s started fresh (#%d)", self.name, ev.seq)

    def _refuse_all_damaged(self) -> None:
        state = self.refresh()
        if not state.live:
            return
        damaged = ", ".join(
            f"#{seq} (epoch {state.saves[seq].epoch})" for seq in sorted(state.live)
        )
        raise LedgerStateError(
            f"run {self.name!r}: every save is damaged ({damaged}): run `ckpt "
            'verify`, or call resume("none") to start over deliberately'
        )

    def _resume_body(self, mode: str, seed: int | None) -> dict[str, Any]:
        return {
            "config": self.config,
            "config_hash": self.config_hash,
            "config_diff": self.config_diff,
            "mode": mode,
            "provenance": provenance(self.seed if seed is None else seed),
        }

    def _newest_intact(
        self, map_location: str | torch.device | None
    ) -> tuple[SaveInfo, Any] | None:
        state = self.refresh()
        for seq in sorted(state.live, reverse=True):
            info = state.saves[seq]
            try:
                return info, self.read_save(seq, map_location=map_location)
            except (CorruptBlobError, MissingBlobError, ManifestError) as exc:
                warnings.warn(
                    f"run {self.name}: save #{seq} (epoch {info.epoch}) is damaged "
                    f"({exc}); falling back to an older save",
                    DamagedCheckpointWarning,
                    stacklevel=4,
                )
                if isinstance(exc, CorruptBlobError):
                    self._quarantine(exc.digest)
        return None

    def _quarantine(self, digest: str) -> None:
        # Moving the damaged blob aside lets the next save of the same bytes
        # (a resumed run redoes the epoch bit for bit) write it anew, instead
        # of trusting a file whose size is right and whose bytes are not.
        try:
            self.store.blobs.quarantine(digest)
        except OSError as exc:
            log.warning(
                "could not move damaged blob %s aside (%s): the next save of "
                "the same bytes will trust it; run `ckpt verify`",
                digest,
                exc,
            )

    def finalize(self, ref: int | str = "last") -> int | None:
        """Record a save as the run's final checkpoint (a final event).

        Returns the final event's number (None on ranks other than 0).

        Raises:
            PolicyError: the save is not at the run's configured final epoch.
        """
        final_epoch = self.options.final_epoch

        def work() -> int:
            self._claim_writer()
            self._check_config_recorded()
            with self.store.db.write():
                state = self.refresh()
                target = self.resolve(ref)
                if state.final is not None and state.final != target.seq:
                    raise PolicyError(
                        f"run {self.name!r} already has a final checkpoint, save "
                        f"#{state.final} (event #{self._final_event_of(state.final)})"
                        f"; a run has one final checkpoint: refusing save "
                        f"#{target.seq}"
                    )
                if final_epoch is not None and target.epoch != final_epoch:
                    raise PolicyError(
                        f"run {self.name!r}: the final checkpoint must be the save "
                        f"of epoch {final_epoch} (the last configured epoch); save "
                        f"#{target.seq} is epoch {target.epoch}"
                    )
                if state.final == target.seq:
                    return self._final_event_of(target.seq)
                ev = self.store._append(
                    self.name,
                    "final",
                    epoch=target.epoch,
                    step=target.step,
                    target=target.seq,
                )
                return ev.seq

        return agree_on_seq(work, "record the final checkpoint")

    def _final_event_of(self, target: int) -> int:
        rows = self.store.db.rows(
            "SELECT seq FROM events WHERE run = ? AND kind = 'final' AND target = ? "
            "ORDER BY seq DESC LIMIT 1",
            [self.name, target],
        )
        return int(rows[0]["seq"])

    def expire(self, ref: int | str, reason: str = "manual") -> int | None:
        """Release a save (an expire event) so gc may collect its blobs.

        Raises:
            PolicyError: the save is the run's last, best or final checkpoint,
                or a save a resume came from (retention keeps those too).
        """

        def work() -> int:
            self._claim_writer()
            self._check_config_recorded()
            with self.store.db.write():
                state = self.refresh()
                target = self.resolve(ref)
                roles = [
                    role
                    for role, seq in (
                        ("last", state.last),
                        ("best", state.best),
                        ("final", state.final),
                    )
                    if seq == target.seq
                ]
                if target.seq in state.resume_targets:
                    roles.append("resumed-from")
                if roles:
                    raise PolicyError(
                        f"save #{target.seq} of run {self.name!r} is its "
                        f"{' and '.join(roles)} checkpoint and cannot be expired "
                        "(retention keeps it too)"
                    )
                ev = self.store._append(
                    self.name,
                    "expire",
                    epoch=target.epoch,
                    step=target.step,
                    target=target.seq,
                    body={"reason": reason},
                )
                return ev.seq

        return agree_on_seq(work, "expire a checkpoint")


def _watched_value(
    best: BestPolicy | None,
    metrics: dict[str, Any],
    epoch: int | None,
    on_nonfinite: str,
) -> tuple[str, float] | None:
    if best is None:
        return None
    if best.metric not in metrics:
        if on_nonfinite == "refuse":
            raise MetricError(
                best.metric,
                f"epoch {epoch}: the watched metric {best.metric!r} is missing and "
                "this run refuses such saves",
            )
        return None
    value = float(metrics[best.metric])
    if not math.isfinite(value) and on_nonfinite == "refuse":
        raise MetricError(
            best.metric,
            f"epoch {epoch}: the watched metric {best.metric!r} is {value} and this "
            "run refuses non-finite values",
        )
    return best.metric, value


def _counter(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, np.integer):
        value = value.item()
    # SQLite stores integers of at most 64 bits (signed).
    if type(value) is not int or not 0 <= value < 2**63:
        raise PolicyError(
            f"{name} must be an int from 0 to 2**63 - 1 (or None), got {value!r}"
        )
    return value


def _check_step_only(run: str, best: BestPolicy) -> None:
    # Warm-up is counted in epochs: a save without one cannot be judged
    # eligible, so it would be promoted during the warm-up.
    if best.first_epoch > 1:
        raise PolicyError(
            f"run {run!r} promotes from epoch {best.first_epoch} on (warm-up), so "
            "a save needs its epoch: pass epoch= to save"
        )


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _normalise_time(text: str) -> str:
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise PolicyError(
            f"invalid time {text!r}: use ISO 8601, e.g. 2026-12-03T18:00:00Z"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
