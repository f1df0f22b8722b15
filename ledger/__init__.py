"""ledger: an append-only checkpoint ledger for PyTorch training over `cas`.

Every checkpoint operation appends an immutable event; last, best and final
are derived by replaying a run's events. Checkpoints are stored one blob per
tensor plus a msgpack manifest, and are never unpickled.

`Run` and the names beside it load on first use: they import torch, which
takes about a second, and tools that only read the ledger (`ckpt log`) never
need it.
"""

from typing import TYPE_CHECKING

from ledger._audit import Head, HeadError
from ledger._errors import (
    ConfigMismatchError,
    ContractViolationError,
    LedgerError,
    ManifestError,
    MetricError,
    PolicyError,
    UnknownReferenceError,
    UnsupportedTypeError,
)
from ledger._policies import (
    SLIDE_ENCODER_CONTRACT,
    BestPolicy,
    Contract,
    RunOptions,
    rankme,
)
from ledger._replay import RunState
from ledger._store import Store

_FROM_RUN = (
    "DamagedCheckpointWarning",
    "MetricWarning",
    "Resumed",
    "Run",
    "SaveResult",
)

if TYPE_CHECKING:
    from ledger._run import (
        DamagedCheckpointWarning,
        MetricWarning,
        Resumed,
        Run,
        SaveResult,
    )
else:

    def __getattr__(name: str) -> object:
        if name not in _FROM_RUN:
            raise AttributeError(f"module 'ledger' has no attribute {name!r}")
        from ledger import _run

        value = getattr(_run, name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_FROM_RUN})


__all__ = [
    "SLIDE_ENCODER_CONTRACT",
    "BestPolicy",
    "ConfigMismatchError",
    "Contract",
    "ContractViolationError",
    "DamagedCheckpointWarning",
    "Head",
    "HeadError",
    "LedgerError",
    "ManifestError",
    "MetricError",
    "MetricWarning",
    "PolicyError",
    "Resumed",
    "Run",
    "RunOptions",
    "RunState",
    "SaveResult",
    "Store",
    "UnknownReferenceError",
    "UnsupportedTypeError",
    "rankme",
]
