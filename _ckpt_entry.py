"""The `ckpt` console script: imports the CLI inside its own Ctrl-C guard.

Importing the CLI still takes a moment (and a command that saves or loads
imports torch, which takes seconds); a Ctrl-C then would end in a
KeyboardInterrupt traceback before `ledger.cli.main` could catch it. So the
script starts here, outside both packages, in a module that imports nothing
heavy. The cost is one more top-level module installed.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run `ckpt` on the command line; a Ctrl-C at any point exits 130."""
    try:
        from ledger.cli import main as run_ckpt

        return run_ckpt()
    except KeyboardInterrupt:
        print("ckpt: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
