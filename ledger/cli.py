"""The `ckpt` command: inspect, verify, collect, export and import checkpoints.

Each command parses its arguments, calls the public API and renders the answer
as a rich table (or JSON with `--json`); no decision is taken here. Errors are
caught only in `main`, which turns each into one line on stderr and an exit
status: 0 all well, 1 the store has a problem, 2 bad usage or a refused call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from cas import CasError, CorruptBlobError, MissingBlobError
from ledger._audit import Head
from ledger._errors import LedgerError, LedgerStateError
from ledger._events import KINDS, Event
from ledger._policies import check_metrics
from ledger._replay import RunState
from ledger._store import Store, default_store_path, unknown_run

app = typer.Typer(
    name="ckpt",
    help=(
        "Inspect and maintain a ckpt-ledger checkpoint store.\n\n"
        "Exit status: 0 all well, 1 verify or gc found a problem (or a checkpoint "
        "is damaged), 2 bad usage or a refused operation."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Typer vendors click from 0.23 on: take its exceptions from where it defines them.
_click = sys.modules[typer.BadParameter.__module__]


class _NeverRaised(Exception):
    """Stands in for NoArgsIsHelpError, which click before 8.2 lacks."""


_NoArgsIsHelp: type[Exception] = getattr(_click, "NoArgsIsHelpError", _NeverRaised)

_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT
_RICH_ROWS = 1000  # longer logs skip rich: 0.25 s per 1,000 rows, 56 s per 100,000
_DURATION = re.compile(r"(\d+(?:\.\d*)?)([smhd]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print JSON with stable keys instead.")
]


@app.callback()
def _root(
    ctx: typer.Context,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            metavar="PATH",
            help="The store directory (default: $CKPT_STORE, else ./.ckpt).",
        ),
    ] = None,
) -> None:
    ctx.obj = store if store is not None else default_store_path()


@contextlib.contextmanager
def _open_store(ctx: typer.Context, *, create: bool = False) -> Iterator[Store]:
    path: Path = ctx.obj
    if not create and not (path / "ledger.db").is_file():
        raise LedgerStateError(
            f"no store at {path} (no ledger.db there): pass --store PATH or set "
            "CKPT_STORE"
        )
    with Store(path) as store:
        yield store


@app.command()
def runs(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the runs of the store, one row each.

    Example: ckpt --store ./.ckpt runs --json

    Exit status: 0 listed, 2 no store or bad usage.
    """
    with _open_store(ctx) as store:
        rows = [_run_row(store.get_run(name).state()) for name in store.runs()]
    if as_json:
        _print_json(rows)
        return
    if not rows:
        print(f"no runs in {ctx.obj}")
        return
    table = _table("run", "stage", "events", "last", "best", "final", "resumed")
    for row in rows:
        best = None
        if row["best"] is not None:
            best = f"{_epoch(row['best_epoch'])} = {_number(row['best_value'])}"
        resumed = None
        if row["resumes"]:
            origin = row["resumed_from"]
            source = "fresh start" if origin is None else f"from #{origin}"
            resumed = f"{row['resumes']}x, last {source}"
        _add_row(
            table,
            row["run"],
            row["stage"],
            row["events"],
            _epoch(row["last_epoch"]) if row["last"] is not None else None,
            best,
            _epoch(row["final_epoch"]) if row["final"] is not None else None,
            resumed,
        )
    _out().print(table)


def _run_row(state: RunState) -> dict[str, Any]:
    summary = state.summary()
    picked = "last last_epoch best best_epoch best_value final final_epoch resumes"
    return {
        "run": state.run,
        "stage": state.options.get("stage"),
        "events": state.events,
        **{key: summary[key] for key in (*picked.split(), "resumed_from")},
    }


@app.command()
def log(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="The run id.")],
    kind: Annotated[
        str | None,
        typer.Option("--kind", help=f"Only events of this kind: {', '.join(KINDS)}."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show a run's events in order, and the head of the ledger's hash chain.

    Resume events show the save they branched from. A table of more than
    1,000 events is not wrapped to the terminal: one line per event.

    Example: ckpt log pretrain --kind promote

    Exit status: 0 shown, 2 unknown run, unknown kind or bad usage.
    """
    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(
            f"unknown event kind {kind!r}: use one of {', '.join(KINDS)}",
            param_hint="'--kind'",
        )
    with _open_store(ctx) as store:
        # Not store.get_run: it replays the run, and imports torch with Run.
        if run not in store.runs():
            raise unknown_run(store, run)
        events = store.events(run, kind=kind)
        chain_head = _head_record(store)
    if as_json:
        _print_log_json(run, events, chain_head)
        return
    # The step column only for runs that save by step: the table fits 80 columns.
    has_step = any(ev.step is not None for ev in events)
    step_column = ["step"] if has_step else []
    header = ["seq", "time (UTC)", "kind", "epoch", *step_column, "metrics"]
    header += ["manifest", "target"]
    rows = [
        _cells(
            ev.seq,
            ev.time[:19].replace("T", " "),
            ev.kind,
            ev.epoch,
            *([ev.step] if has_step else []),
            _metrics_text(ev),
            ev.manifest[:10] if ev.manifest else None,
            _target_text(ev),
        )
        for ev in events
    ]
    if len(rows) > _RICH_ROWS:
        _print_plain_table(header, rows)
    else:
        table = _table(*header)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        _out().print(table)
    _print_head(chain_head)


def _print_log_json(
    run: str, events: list[Event], chain_head: dict[str, Any] | None
) -> None:
    # One event per line, each by json's C encoder: the indented form runs the
    # pure-Python encoder, which takes seconds for 100,000 events.
    # Written event by event, so a closed pipe (`| head`) stops it early.
    encode = json.JSONEncoder(default=str).encode
    out = sys.stdout
    out.write(f'{{"run": {encode(run)}, "events": [')
    separator = "\n"
    for ev in events:
        out.write(separator + encode(_event_record(ev)))
        separator = ",\n"
    out.write(f'\n], "chain_head": {encode(chain_head)}}}\n')


def _head_record(store: Store) -> dict[str, Any] | None:
    pinned = store.head()
    return {"seq": pinned.seq, "hash": pinned.hash} if pinned.seq else None


def _print_head(chain_head: dict[str, Any] | None) -> None:
    if chain_head is not None:
        print(
            f"chain head: #{chain_head['seq']} {chain_head['hash'][:16]} "
            "(newest event of the whole ledger)"
        )


def _event_record(ev: Event) -> dict[str, Any]:
    return {
        "seq": ev.seq,
        "time": ev.time,
        "kind": ev.kind,
        "epoch": ev.epoch,
        "step": ev.step,
        "metric": ev.metric,
        "value": _json_number(ev.value),
        "metrics": {k: _json_number(v) for k, v in ev.metrics.items()},
        "manifest": ev.manifest,
        "target": ev.target,
        "host": ev.host,
        "pid": ev.pid,
        "hash": ev.hash,
    }


def _metrics_text(ev: Event) -> str | None:
    if ev.kind == "save":
        shown = " ".join(f"{k}={_number(v)}" for k, v in ev.metrics.items())
        return shown or None
    if ev.metric is not None:
        return f"{ev.metric}={_number(ev.value)}"
    return None


def _target_text(ev: Event) -> str | None:
    if ev.target is None:
        return None
    if ev.kind == "resume":
        return f"from #{ev.target} ({_epoch(ev.epoch)})"
    if ev.kind == "expire":
        return f"#{ev.target} ({ev.body.get('reason', '')})"
    return f"#{ev.target}"


@app.command()
def show(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="The run id.")],
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            metavar="SEQ|TIME",
            help="As of this event number or ISO 8601 UTC time.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show a run's state as derived by replaying its events.

    With --at, the state as it was at an earlier event or moment.

    Example: ckpt show pretrain --at 2026-12-03T18:00:00Z

    Exit status: 0 shown, 2 unknown run, bad --at or bad usage.
    """
    moment: int | str | None = int(at) if at is not None and at.isdigit() else at
    with _open_store(ctx) as store:
        state = store.get_run(run).state(at=moment)
        chain_head = _head_record(store)
    if state.events == 0:
        raise LedgerStateError(f"run {run!r} has no events at or before {at}")
    summary = state.summary()
    if as_json:
        _print_json({**summary, "chain_head": chain_head})
        return
    table = _table("field", "value", show_header=False)
    for key, value in summary.items():
        shown = ", ".join(f"#{s}" for s in value) if key == "live_saves" else value
        _add_row(table, key, shown)
    _out().print(table)
    _print_head(chain_head)


@app.command("head")
def head_command(ctx: typer.Context) -> None:
    """Print the head of the ledger's hash chain as one line: SEQ HASH.

    Keep it elsewhere (a git commit, a paper's appendix): `ckpt verify --head
    FILE` later proves that the ledger still extends it.

    Example: ckpt head > head.txt

    Exit status: 0 printed, 2 no store or bad usage.
    """
    with _open_store(ctx) as store:
        print(store.head())


@app.command()
def verify(
    ctx: typer.Context,
    run: Annotated[
        str | None, typer.Argument(help="Only this run (default: every run).")
    ] = None,
    head_file: Annotated[
        Path | None,
        typer.Option(
            "--head",
            metavar="FILE",
            help="Also prove the ledger extends the head `ckpt head` wrote there.",
        ),
    ] = None,
) -> None:
    """Prove the store: the hash chain, the run policies and every live blob.

    Prints one line per problem, naming the event (and the blob); the first
    names the first bad event.

    Example: ckpt verify pretrain --head head.txt

    Exit status: 0 sound, 1 problems found, 2 no store, unknown run or bad usage.
    """
    pinned = _read_head(head_file) if head_file is not None else None
    with _open_store(ctx) as store:
        if run is not None:
            store.get_run(run)
        problems = _verify_with_progress(store, run, pinned)
    scope = f"run {run!r}" if run else f"store {ctx.obj}"
    if not problems:
        print(f"verify: {scope} is sound")
        return
    for problem in problems:
        print(problem)
    _say(f"verify: {len(problems)} problems in {scope}")
    raise typer.Exit(1)


def _read_head(path: Path) -> Head:
    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror or exc}; give the file "
            "`ckpt head > FILE` wrote",
            param_hint="'--head'",
        ) from exc
    return Head.parse(text)


def _verify_with_progress(
    store: Store, run: str | None, pinned: Head | None
) -> list[Any]:
    if not sys.stderr.isatty():
        return list(store.verify(run, head=pinned))
    columns = (
        TextColumn("verifying"),
        BarColumn(),
        MofNCompleteColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("verify", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return list(store.verify(run, head=pinned, progress=tick))


@app.command()
def gc(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")
    ] = False,
    grace: Annotated[
        str,
        typer.Option(
            "--grace",
            metavar="DURATION",
            help="Keep unreferenced blobs younger than this: 0, 30s, 15m, 1h, 2d.",
        ),
    ] = "1h",
) -> None:
    """Remove blobs no live save needs (older than the grace) and temp leftovers.

    Refuses, deleting nothing, when a blob a live save needs is missing.

    Example: ckpt gc --grace 15m --dry-run

    Exit status: 0 collected, 1 referenced blobs missing, 2 bad usage.
    """
    seconds = _parse_duration(grace)
    with _open_store(ctx) as store:
        report = store.gc(grace=seconds, dry_run=dry_run)
    if report.missing:
        for problem in report.missing:
            print(problem)
        if any(problem.digest for problem in report.missing):
            advice = "restore the blobs or expire their saves"
        else:
            advice = "repair or restore ledger.db first"
        _say(
            f"gc refused: {len(report.missing)} problem(s) found, nothing was "
            f"deleted: {advice}"
        )
        raise typer.Exit(1)
    verb = "would remove" if dry_run else "removed"
    line = f"gc: {verb} {report.blobs_removed} blobs ({_size(report.bytes_freed)})"
    if not dry_run:
        line += f" and {report.tmp_removed} temp files ({_size(report.tmp_bytes)})"
    line += (
        f"; kept {report.live_blobs} live, {report.leased_blobs} leased and "
        f"{report.kept_young} younger than {grace}"
    )
    print(line)


def _parse_duration(text: str) -> float:
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise typer.BadParameter(
            f"invalid duration {text!r}: use a number with s, m, h or d, such as "
            "0, 30s, 15m, 1h or 2d",
            param_hint="'--grace'",
        )
    return float(found.group(1)) * _SECONDS[found.group(2)]


@app.command()
def export(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            metavar="RUN@REF",
            help="REF: last, best, final, an event number or a digest prefix.",
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="A .pt or .safetensors file.")
    ],
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Export only this part: a key, or a dotted path such as "
            "model.encoder.",
        ),
    ] = None,
) -> None:
    """Write a stored checkpoint to a .pt or .safetensors file.

    A .safetensors file needs a flat dict of tensors: pick one with --key (the
    refusal lists the keys that work).

    Example: ckpt export pretrain@best -o encoder.safetensors --key model.encoder

    Exit status: 0 written, 1 the checkpoint is damaged, 2 bad reference or usage.
    """
    # Imported here: torch takes about a second, which reading commands skip.
    from ledger._transfer import check_export_target, write_checkpoint_file

    name, sep, ref = target.partition("@")
    if not sep or not name or not ref:
        raise typer.BadParameter(
            f"{target!r} is not RUN@REF (e.g. pretrain@best, pretrain@12)",
            param_hint="'RUN@REF'",
        )
    check_export_target(output)
    with _open_store(ctx) as store:
        run = store.get_run(name)
        info = run.resolve(ref)
        checkpoint = run.read_save(info.seq)
    what = f"save #{info.seq} of run {name!r}" + (f" key {key!r}" if key else "")
    size = write_checkpoint_file(
        checkpoint,
        output,
        what=what,
        key=key,
        metadata={
            "ckpt_run": name,
            "ckpt_save": str(info.seq),
            "ckpt_manifest": info.manifest,
            **({"ckpt_key": key} if key else {}),
        },
    )
    print(f"exported {what} ({_epoch(info.epoch)}) to {output} ({_size(size)})")


@app.command("import")
def import_file(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="A .pt, .pth, .ckpt or .safetensors."),
    ],
    run: Annotated[str, typer.Option("--run", help="Save into this run.")],
    epoch: Annotated[int, typer.Option("--epoch", min=0, help="Its epoch.")],
    step: Annotated[
        int | None, typer.Option("--step", min=0, help="Its global step.")
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", metavar="NAME=VALUE", help="A metric; repeatable."),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow full unpickling, which can run code hidden in the file.",
        ),
    ] = False,
) -> None:
    """Adopt an outside checkpoint file as a save of a run (created if new).

    Torch files are read with weights_only=True; one that needs full unpickling
    is refused unless --trust-pickle is given. The file is hashed before and
    after it is read, and refused if it changed meanwhile.

    Example: ckpt import model.pt --run finetune --epoch 3 --metric acc=0.91

    Exit status: 0 imported, 2 refused file, bad metric or bad usage.
    """
    # Imported here: torch takes about a second, which reading commands skip.
    from ledger._codec import encode
    from ledger._transfer import check_suffix, read_checkpoint_file

    metrics = check_metrics(_parse_metrics(metric or []))
    check_suffix(file, "import")
    checkpoint, source = read_checkpoint_file(file, trust_pickle=trust_pickle)
    # Refuse an unstorable checkpoint before the store (or a new run) is touched.
    encode(checkpoint)
    with _open_store(ctx, create=True) as store:
        target = store.get_run(run) if run in store.runs() else store.run(run)
        result = target.save(checkpoint, epoch=epoch, step=step, metrics=metrics)
    if result is None:
        return
    promoted = ", promoted to best" if result.promoted else ""
    print(
        f"imported {source.name} ({_size(source.size)}, blake3 {source.blake3}) "
        f"as save #{result.seq} of run {run!r} ({_epoch(epoch)}{promoted})"
    )


def _parse_metrics(items: Sequence[str]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError(item)
            number = float(value)
        except ValueError:
            raise typer.BadParameter(
                f"{item!r} is not NAME=NUMBER (e.g. val_loss=0.31)",
                param_hint="'--metric'",
            ) from None
        if name in metrics:
            raise typer.BadParameter(
                f"{name!r} is given twice ({metrics[name]:g} and {number:g}); "
                "give each metric once",
                param_hint="'--metric'",
            )
        metrics[name] = number
    return metrics


@app.command()
def du(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Compare logical bytes (every save counted whole) with bytes on disk.

    Example: ckpt du --json

    Exit status: 0 shown, 2 no store or bad usage.
    """
    with _open_store(ctx) as store:
        usage = store.usage()
    record = {
        "logical_bytes": usage.logical_bytes,
        "physical_bytes": usage.physical_bytes,
        "dedup_ratio": round(usage.dedup_ratio, 4),
        "blobs": usage.blobs,
        "saves": usage.saves,
    }
    if as_json:
        _print_json(record)
        return
    print(
        f"{usage.saves} saves: {_size(usage.logical_bytes)} logical, "
        f"{_size(usage.physical_bytes)} on disk in {usage.blobs} blobs "
        f"(dedup ratio {usage.dedup_ratio:.2f}x)"
    )


def _out() -> Console:
    # A console per call follows whatever sys.stdout is now (tests swap it).
    return Console(highlight=False)


def _say(message: str, level: str = "error") -> None:
    print(f"ckpt: {level}: {' '.join(message.split())}", file=sys.stderr)


def _table(*names: str, show_header: bool = True) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD,
        show_header=show_header,
        pad_edge=False,
        collapse_padding=True,
    )
    for name in names:
        wraps = name in ("metrics", "target", "best", "resumed", "value")
        table.add_column(
            name, no_wrap=not wraps, overflow="fold" if wraps else "ellipsis"
        )
    return table


def _add_row(table: Table, *cells: object) -> None:
    table.add_row(*(Text(cell) for cell in _cells(*cells)))


def _cells(*cells: object) -> list[str]:
    return ["-" if c is None else str(c) for c in cells]


def _print_plain_table(header: list[str], rows: list[list[str]]) -> None:
    """Print rows as `_table` draws them when they fit, without rich: rich
    lays out a table cell by cell, minutes for 100,000 rows. Nothing wraps."""
    # Plain ASCII pads by str.format; other text by its width on the terminal.
    is_ascii = all(map(str.isascii, map("".join, [header, *rows])))
    width = len if is_ascii else cell_len
    widths = [max(map(width, column)) for column in zip(header, *rows, strict=True)]
    inner = sum(widths) + 2 * (len(widths) - 1)
    if is_ascii:
        form = " " + "  ".join(f"{{:<{w}}}" for w in widths) + " \n"
        lines = (form.format(*row) for row in rows)
    else:
        lines = (_wide_line(row, widths) for row in rows)
    out = sys.stdout
    out.write(" " * (inner + 2) + "\n")
    out.write(_wide_line(header, widths))
    out.write(" " + "─" * inner + " \n")
    out.writelines(lines)
    out.write(" " * (inner + 2) + "\n")


def _wide_line(cells: list[str], widths: list[int]) -> str:
    pads = [" " * (w - cell_len(c)) for c, w in zip(cells, widths, strict=True)]
    return " " + "  ".join(map(str.__add__, cells, pads)) + " \n"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _json_number(value: Any) -> Any:
    # JSON has no NaN or infinity: such metrics are written as strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _epoch(epoch: int | None) -> str:
    return "-" if epoch is None else f"e{epoch}"


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class _StderrLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _say(record.getMessage(), "warning")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ckpt` with `argv` (default: the command line); return the exit status."""
    command = typer.main.get_command(app)
    handler = _StderrLines(logging.WARNING)
    for name in ("cas", "ledger"):
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = command.main(
                    args=list(sys.argv[1:] if argv is None else argv),
                    prog_name="ckpt",
                    standalone_mode=False,
                )
            finally:
                for warning in caught:
                    if not issubclass(warning.category, DeprecationWarning):
                        _say(str(warning.message), "warning")
    except _NoArgsIsHelp as exc:
        # Typer's rich help may already be on the screen; the message is then empty.
        if str(exc).strip():
            print(exc, file=sys.stderr)
        return 2
    except _click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "ckpt"
        _say(f"{exc.format_message()} (see `{where} --help`)")
        return 2
    except _click.ClickException as exc:
        _say(exc.format_message())
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _say("interrupted")
        return _INTERRUPTED
    except (CorruptBlobError, MissingBlobError) as exc:
        _say(str(exc))
        return 1
    except (LedgerError, CasError, OSError, ValueError) as exc:
        _say(str(exc) or type(exc).__name__)
        return 2
    finally:
        for name in ("cas", "ledger"):
            logging.getLogger(name).removeHandler(handler)
    if code == _INTERRUPTED:
        # Typer turns a Ctrl-C inside a command into this status, silently.
        _say("interrupted")
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
