"""Which technique moves which figure: each one switched off and on, side by side.

Runs, interleaved in one process like `tools/bench.py` (whose workload and
measuring it reuses), the save and load of one state dict with a technique in
place and with it switched back to what came before it:

- pooled hashing: a save's large tensors hashed on one thread per core, against
  every tensor hashed in turn on the saving thread;
- unfilled load buffers: each large tensor read into new torch memory that
  nobody zero-fills, against a `bytearray`, which is zero-filled first.

The "off" variants swap a private function or threshold for the duration of
the call, so they measure exactly the code path that the technique replaced.

    python tools/techniques.py --sizes 256M,1G --reps 7 --cold-pause 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from bench import (
    Op,
    Prepared,
    _can_reset_hwm,
    _nothing,
    _size_text,
    _torch_save,
    make_state_dict,
    parse_size,
    run_group,
)
from rich.console import Console
from rich.table import Table

import ledger._blobio as blobio
import ledger._codec as codec
from ledger import Store


@contextlib.contextmanager
def hashing_on_one_thread() -> Iterator[None]:
    saved = codec._POOLED_MIN
    codec._POOLED_MIN = 1 << 62  # every tensor below it: hashed inline, in turn
    try:
        yield
    finally:
        codec._POOLED_MIN = saved


@contextlib.contextmanager
def plain_load_buffers() -> Iterator[None]:
    saved = blobio.tensor_buffer
    blobio.tensor_buffer = bytearray  # type: ignore[assignment]
    try:
        yield
    finally:
        blobio.tensor_buffer = saved


def _switch(off: Callable[[], contextlib.AbstractContextManager[None]] | None) -> Any:
    return off() if off is not None else contextlib.nullcontext()


def save_ops(state: dict[str, Any], fixtures: Path) -> list[Op]:
    def torch_save(work: Path) -> Prepared:
        return (lambda: _torch_save(state, work / "model.pt")), _nothing

    def ckpt_save(where: str, off: Any) -> Callable[[Path], Prepared]:
        def prepare(work: Path) -> Prepared:
            store = Store(work / "store" if where == "fresh" else fixtures / "store")
            run = store.run("bench")

            def timed() -> int:
                with _switch(off):
                    return run.save(state, epoch=1).bytes_written

            return timed, store.close

        return prepare

    return [
        Op("torch.save+fsync", "save", torch_save, baseline=True),
        Op("save fresh: pooled hashing", "save", ckpt_save("fresh", None)),
        Op("save fresh: one thread", "save", ckpt_save("fresh", hashing_on_one_thread)),
        Op("save unchanged: pooled hashing", "save", ckpt_save("same", None)),
        Op(
            "save unchanged: one thread",
            "save",
            ckpt_save("same", hashing_on_one_thread),
        ),
    ]


def load_ops(fixtures: Path, total: int) -> list[Op]:
    def loader(fn: Callable[[], Any]) -> Callable[[Path], Prepared]:
        def prepare(work: Path) -> Prepared:
            held: list[Any] = []

            def timed() -> int:
                held.append(fn())  # freed after the measurement, not during it
                return total

            return timed, held.clear

        return prepare

    def ckpt_load(off: Any) -> Callable[[], Any]:
        def load() -> Any:
            with _switch(off), Store(fixtures / "store") as store:
                return store.get_run("bench").load("last")

        return load

    def torch_load() -> Any:
        return torch.load(fixtures / "model.pt", weights_only=True)

    return [
        Op("torch.load(weights_only)", "load", loader(torch_load), baseline=True),
        Op("load: unfilled buffers", "load", loader(ckpt_load(None))),
        Op("load: zero-filled buffers", "load", loader(ckpt_load(plain_load_buffers))),
    ]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256M", help="state dict sizes (256M)")
    p.add_argument("--reps", type=int, default=7, help="repetitions (7)")
    p.add_argument("--cold-pause", type=float, default=3.0, help="seconds (3)")
    p.add_argument("--regimes", default="warm,cold", help="warm, cold or both")
    p.add_argument("--dir", type=Path, default=None, help="where stores go")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args(argv)
    console = Console(stderr=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt-techniques-", dir=args.dir))
    try:
        rows = run_all(args, root, console)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    render(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


def run_all(
    args: argparse.Namespace, root: Path, console: Console
) -> list[dict[str, Any]]:
    reset_hwm = _can_reset_hwm()
    rows: list[dict[str, Any]] = []
    for size in (parse_size(s) for s in args.sizes.split(",")):
        state, _ = make_state_dict(size)
        fixtures = root / f"fixtures-{size}"
        fixtures.mkdir()
        _torch_save(state, fixtures / "model.pt")
        with Store(fixtures / "store") as store:
            store.run("bench").save(state, epoch=1)
        for regime in args.regimes.split(","):
            pause = args.cold_pause if regime == "cold" else 0.0
            for ops in (save_ops(state, fixtures), load_ops(fixtures, size)):
                rows += run_group(
                    ops,
                    size=size,
                    regime=regime,
                    reps=args.reps,
                    pause=pause,
                    root=root,
                    reset_hwm=reset_hwm,
                    progress=lambda text: (
                        console.log(text) if "rep 1/" in text else None
                    ),
                )
        del state
    return rows


def render(rows: list[dict[str, Any]]) -> None:
    table = Table(title="techniques, on and off, interleaved", title_justify="left")
    for col in ("regime", "size", "operation", "median s", "min-max s", "ratio"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    for row in rows:
        table.add_row(
            row["regime"],
            _size_text(row["size"]),
            row["op"],
            f"{row['median_s']:.3f}",
            f"{row['min_s']:.3f}-{row['max_s']:.3f}",
            f"{row['ratio']:.2f}x" if row["ratio"] is not None else "",
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
