"""ledger: an append-only checkpoint ledger for PyTorch training over `cas`.

Every checkpoint operation appends an immutable event; last, best and final
are derived by replaying a run's events. Checkpoints are stored one blob per
tensor plus a msgpack manifest, and are never unpickled.
"""

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
from ledger._run import (
    DamagedCheckpointWarning,
    MetricWarning,
    Resumed,
    Run,
    SaveResult,
)
from ledger._store import Store

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
