"""The exception tree of the ledger.

LedgerError
 +-- UnsupportedTypeError (also TypeError): the codec cannot store a value
 +-- ManifestError (also ValueError): a manifest is malformed or unsafe
 +-- MetricError (also ValueError): a metric of the wrong type or a
 |                                  non-finite one a run refuses
 +-- PolicyError (also ValueError): final too early, bad retention, ...
 +-- ContractViolationError (also ValueError): config breaks the contract
 +-- ConfigMismatchError (also ValueError): resuming under another config
 +-- UnknownReferenceError (also KeyError): no such run or checkpoint
 +-- LedgerStateError: ledger.db locked, corrupt, missing, or read-only
 +-- DistributedSaveError: rank 0 failed a collective save
"""

from __future__ import annotations

from collections.abc import Sequence


class LedgerError(Exception):
    """Root of every error raised by `ledger`."""


class UnsupportedTypeError(LedgerError, TypeError):
    """A checkpoint holds a value the codec does not store."""

    def __init__(self, path: str, type_name: str, hint: str = "") -> None:
        self.path = path
        self.type_name = type_name
        super().__init__(
            f"cannot store {type_name} at {path or '<root>'}: "
            + (hint or "convert it to tensors, numbers, strings, lists or dicts")
        )


class ManifestError(LedgerError, ValueError):
    """A manifest is malformed, of an unknown version, or names absurd sizes."""


class MetricError(LedgerError, ValueError):
    """A metric value the run refuses (wrong type, or non-finite when refused)."""

    def __init__(self, metric: str, message: str) -> None:
        self.metric = metric
        super().__init__(message)


class PolicyError(LedgerError, ValueError):
    """A call or setting the run's policies forbid."""


class ContractViolationError(LedgerError, ValueError):
    """A config breaks the run's contract; lists every mismatch."""

    def __init__(self, contract: str, mismatches: Sequence[str]) -> None:
        self.contract = contract
        self.mismatches = list(mismatches)
        super().__init__(
            f"config violates contract {contract!r}: " + "; ".join(self.mismatches)
        )


class ConfigMismatchError(LedgerError, ValueError):
    """The config now differs from the one the run was opened with."""

    def __init__(self, run: str, differences: dict[str, list[object]]) -> None:
        self.run = run
        self.differences = differences
        shown = ", ".join(
            f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items()
        )
        super().__init__(
            f"config of run {run!r} changed ({shown}); pass "
            "allow_config_change=True to record the change and go on"
        )


class UnknownReferenceError(LedgerError, KeyError):
    """No run, event or checkpoint answers to a reference."""

    def __str__(self) -> str:
        return str(self.args[0])


class LedgerStateError(LedgerError):
    """ledger.db cannot be used: locked too long, corrupt, missing or read-only."""


class DistributedSaveError(LedgerError):
    """Rank 0 failed a collective operation; the other ranks raise this."""
