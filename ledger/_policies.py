"""Training policies: best by strict improvement, final epoch, retention, contracts.

A run's policies are fixed when it is opened and recorded in its open event, so
every later judgement (and `ckpt verify`) can be recomputed from the ledger
alone. Metric values are judged here and nowhere else: a number is a Python
int or float, a numpy scalar, or a one-element tensor; anything else is refused.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ledger._errors import ContractViolationError, MetricError, PolicyError

if TYPE_CHECKING:
    import numpy as np
    import torch

# Epochs and counts are stored as SQLite integers: signed, 64 bits.
_INT64 = 2**63


@dataclass(frozen=True)
class BestPolicy:
    """How the best checkpoint is chosen.

    Attributes:
        metric: name of the watched metric in each save's metrics.
        mode: "max" (RankMe, accuracy) or "min" (a loss).
        tolerance: a value must beat the best by more than this to promote.
        warmup_epochs: epochs of warm-up; the first promotable epoch is the
            one after it unless `start_epoch` says otherwise.
        start_epoch: first epoch (counted from 1) that may be promoted.
    """

    metric: str
    mode: Literal["max", "min"] = "max"
    tolerance: float = 1e-12
    warmup_epochs: int = 0
    start_epoch: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise PolicyError(
                f"best metric must be a non-empty name, got {self.metric!r}"
            )
        if self.mode not in ("max", "min"):
            raise PolicyError(f"best mode must be 'max' or 'min', got {self.mode!r}")
        if not _is_real(self.tolerance) or not 0 <= self.tolerance < math.inf:
            raise PolicyError(
                f"best tolerance must be a finite number >= 0, got {self.tolerance!r}"
            )
        if not _is_int(self.warmup_epochs) or not 0 <= self.warmup_epochs < _INT64:
            raise PolicyError(
                f"warmup_epochs must be an int from 0 to 2**63 - 1, "
                f"got {self.warmup_epochs!r}"
            )
        if self.start_epoch is not None and (
            not _is_int(self.start_epoch) or not 1 <= self.start_epoch < _INT64
        ):
            raise PolicyError(
                f"start_epoch must be an int from 1 to 2**63 - 1 (epochs count "
                f"from 1), got {self.start_epoch!r}"
            )
        if self.start_epoch is not None and self.start_epoch <= self.warmup_epochs:
            raise PolicyError(
                f"start_epoch {self.start_epoch} falls inside the "
                f"{self.warmup_epochs} warm-up epochs: give one of them, or a "
                f"start_epoch after the warm-up (>= {self.warmup_epochs + 1})"
            )

    @property
    def first_epoch(self) -> int:
        """The first epoch that may be promoted."""
        return (
            self.start_epoch
            if self.start_epoch is not None
            else (self.warmup_epochs + 1)
        )

    def is_eligible(self, epoch: int | None) -> bool:
        """True if a save at this epoch may be promoted (saves without an epoch
        are judged on their metric alone)."""
        return epoch is None or epoch >= self.first_epoch

    def improves(self, value: float, best: float | None) -> bool:
        """True if a finite `value` strictly beats `best` by more than the tolerance."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.tolerance
        return value < best - self.tolerance


@dataclass(frozen=True)
class RunOptions:
    """The policies of a run, fixed when it is opened.

    Attributes:
        best: how the best checkpoint is chosen; None keeps no best.
        final_epoch: the last configured epoch (counted from 1), the only one
            that may be recorded as final; None allows any epoch.
        keep_last: retention: keep the newest N saves (best, final, last and
            resumed-from saves are always kept); None keeps everything.
        on_nonfinite: "warn" records a save whose watched metric is missing or
            not finite, with a warning; "refuse" raises and writes nothing.
        stage: a free label shown by `ckpt runs` ("pretrain", "finetune").
    """

    best: BestPolicy | None = None
    final_epoch: int | None = None
    keep_last: int | None = None
    on_nonfinite: Literal["warn", "refuse"] = "warn"
    stage: str | None = None

    def __post_init__(self) -> None:
        if self.best is not None and not isinstance(self.best, BestPolicy):
            raise PolicyError(f"best must be a BestPolicy, got {self.best!r}")
        if self.final_epoch is not None and (
            not _is_int(self.final_epoch) or not 1 <= self.final_epoch < _INT64
        ):
            raise PolicyError(
                f"final_epoch must be an int from 1 to 2**63 - 1, "
                f"got {self.final_epoch!r}"
            )
        if self.keep_last is not None and (
            not _is_int(self.keep_last) or not 1 <= self.keep_last < _INT64
        ):
            raise PolicyError(
                f"keep_last must be an int >= 1 and below 2**63 (or None to keep "
                f"every save), got {self.keep_last!r}"
            )
        if self.on_nonfinite not in ("warn", "refuse"):
            raise PolicyError(
                f"on_nonfinite must be 'warn' or 'refuse', got {self.on_nonfinite!r}"
            )

    def to_record(self) -> dict[str, Any]:
        """The options as plain data for the open event."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunOptions:
        """Rebuild options from an open event's record."""
        data = dict(record)
        best = data.pop("best", None)
        return cls(best=BestPolicy(**best) if best else None, **data)


@dataclass(frozen=True)
class Contract:
    """Config keys (dotted paths into a nested config) and the values they must have."""

    name: str
    required: Mapping[str, Any] = field(default_factory=dict)

    def mismatches(self, config: Mapping[str, Any]) -> list[str]:
        """Every way `config` breaks the contract, one string each."""
        out = []
        for key, want in self.required.items():
            # A key may be spelled flat ("model.dim") and nested at once:
            # every spelling must hold the required value.
            found = _lookup(config, key)
            if not found:
                out.append(f"{key} is missing (must be {want!r})")
            for have in found:
                if type(have) is bool or type(want) is bool:
                    if have is not want:
                        out.append(f"{key} is {have!r}, must be {want!r}")
                elif have != want:
                    out.append(f"{key} is {have!r}, must be {want!r}")
        return out

    def check(self, config: Mapping[str, Any]) -> None:
        """Raise ContractViolationError listing every mismatch, if any."""
        problems = self.mismatches(config)
        if problems:
            raise ContractViolationError(self.name, problems)

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "required": dict(self.required)}


SLIDE_ENCODER_CONTRACT = Contract(
    name="slide-encoder-two-stage",
    required={
        "model.slide_embedding_dim": 1024,
        "model.dna_input_dim": 1673,
        "pretrain.max_epochs": 101,
        "pretrain.warmup_epochs": 5,
        "pretrain.rankme_eps": 1e-7,
        "finetune.epochs": 5,
        "finetune.selection": "final epoch",
    },
)
"""The contract of the two-stage slide-encoder recipe this project was built for."""


def _lookup(node: Any, dotted: str) -> list[Any]:
    """The values at every spelling of `dotted` in a config: flat, nested, mixed."""
    if not isinstance(node, Mapping):
        return []
    found = [node[dotted]] if dotted in node else []
    parts = dotted.split(".")
    for cut in range(1, len(parts)):
        head = ".".join(parts[:cut])
        if head in node:
            found.extend(_lookup(node[head], ".".join(parts[cut:])))
    return found


def metric_number(name: str, value: Any) -> float | int:
    """A metric as a Python number, or MetricError naming the metric and type.

    Accepts int, float, numpy integer/floating scalars, and tensors or arrays
    with exactly one real element. Refuses bool, str, complex and the rest.
    """
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        # msgpack (the event body) stores integers of at most 64 bits.
        if -(2**63) <= value < 2**64:
            return value
        raise MetricError(
            name, f"metric {name!r} is an int beyond 64 bits: pass it as a float"
        )
    # A numpy or torch value exists only once its module is imported: looking
    # the modules up, rather than importing them, spares readers of the ledger
    # torch's second-long import.
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    if np is not None and isinstance(value, (np.integer, np.floating)):
        return value.item()
    if torch is not None and isinstance(value, torch.Tensor):
        count, is_complex = value.numel(), value.is_complex()
        is_bool = value.dtype == torch.bool
    elif np is not None and isinstance(value, np.ndarray):
        count, is_complex = value.size, np.iscomplexobj(value)
        is_bool = value.dtype == np.bool_
    else:
        raise MetricError(
            name,
            f"metric {name!r} must be a number (int, float, numpy scalar or 0-dim "
            f"tensor), got {kind.__name__} {value!r:.40}",
        )
    if count == 1 and not is_complex and not is_bool:
        item = value.reshape(-1)[0].item()
        return item
    raise MetricError(
        name,
        f"metric {name!r} must be a single number, got a "
        f"{kind.__name__} of {count} element(s) with dtype {value.dtype}",
    )


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | int]:
    """Validate every metric of a save; return them as Python numbers."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise MetricError(
            "",
            f"metrics must be a dict of name to number, got {type(metrics).__name__}",
        )
    out: dict[str, float | int] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise MetricError(str(name), f"metric names must be str, got {name!r}")
        out[name] = metric_number(name, value)
    return out


def rankme(embeddings: torch.Tensor | np.ndarray, eps: float = 1e-7) -> float:
    """RankMe: the effective rank of an embedding matrix (n samples x d dims).

    exp of the entropy of the singular values normalised to sum 1, with `eps`
    added to each normalised value. An identity matrix of size k gives k, a
    rank-one matrix gives 1 (both up to `eps`). Embeddings holding NaN or inf
    give NaN, which the best-policy never promotes.

    Raises:
        ValueError: not a non-empty 2-D matrix, or `eps` is not > 0.
    """
    if not _is_real(eps) or not 0 < eps < math.inf:
        raise ValueError(f"rankme eps must be a finite number > 0, got {eps!r}")
    import torch  # here, not above: torch takes about a second to import

    z = torch.as_tensor(embeddings).detach().to(torch.float64)
    if z.ndim != 2 or z.numel() == 0:
        raise ValueError(
            f"rankme needs a non-empty 2-D matrix, got shape {tuple(z.shape)}"
        )
    if not bool(torch.isfinite(z).all()):
        return math.nan
    s = torch.linalg.svdvals(z)
    total = s.sum()
    if total <= 0:
        return 1.0
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_real(value: Any) -> bool:
    return type(value) in (int, float)
