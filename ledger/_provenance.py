"""Provenance: where and with what a run was opened or resumed.

Recorded in open and resume events so a checkpoint can be traced to the code,
the versions and the machine that made it. Reading the git revision runs `git`
with a short timeout in the training script's directory; when that fails the
revision is simply absent, never an error.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def provenance(seed: int | None = None) -> dict[str, Any]:
    """Versions, host, pid, command line, code revision and seed, as plain data."""
    # Imported here, not above: torch takes about a second to import, and
    # only writers (opening or resuming a run) record provenance.
    import numpy as np
    import torch

    record: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ckpt_ledger": _own_version(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
    }
    revision = code_revision(
        Path(sys.argv[0]).resolve().parent if sys.argv[0] else Path.cwd()
    )
    if revision is not None:
        record["git"] = revision
    if seed is not None:
        record["seed"] = seed
    return record


def code_revision(where: Path) -> dict[str, Any] | None:
    """The git commit of the checkout holding `where`, and whether it is dirty."""
    try:
        commit = _git(where, "rev-parse", "HEAD")
        dirty = bool(_git(where, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(where: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(where), *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    )
    return out.stdout.strip()


def _own_version() -> str:
    try:
        return metadata.version("ckpt-ledger")
    except metadata.PackageNotFoundError:
        return "unknown"
