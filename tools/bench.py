"""Benchmark ckpt-ledger saves and loads against torch.save and safetensors.

Compared operations run interleaved (A, B, A, B, ...) in one process on one
disk, so a noisy neighbour slows them alike; each figure is the median of the
repetitions with their min-max, in a warm regime (back to back) and a cold one
(a pause before each operation). Peak extra memory is the RSS high-water mark
(VmHWM, reset through /proc/self/clear_refs just before the operation) minus the
RSS before it; where the reset is refused a thread samples /proc/self/statm.

    python tools/bench.py --sizes 256M,1G --reps 5 --cold-pause 3 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import safetensors.torch
import torch
from rich.console import Console
from rich.table import Table

from ledger import Store

_PAGE = os.sysconf("SC_PAGE_SIZE")
_ALIGN = 4096
_MIB = 1 << 20
_SEQUENCE_SAVES = 10

Timed = Callable[[], int]
Prepared = tuple[Timed, Callable[[], None]]


# The workload ------------------------------------------------------------------


def parse_size(text: str) -> int:
    """`256M`, `1G`, `512K` or plain bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 256M or 1G")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]
    return int(float(match.group(1)) * scale)


def make_state_dict(nbytes: int, seed: int = 0) -> tuple[dict[str, Any], set[str]]:
    """A transformer-like float32 state dict of about `nbytes`: 8 blocks of six
    large matrices with their biases and norms, an embedding, one int64 buffer.

    Returns the state dict and the names of the last block and final norm,
    about 10% of the bytes: what a fine-tuning run trains.
    """
    layers = 8
    params = max(nbytes // 4, 1 << 14)
    d = max(64, int(math.sqrt(params * 0.96 / (12 * layers))) // 64 * 64)
    vocab = max(1, (params - 12 * layers * d * d - 16 * layers * d) // d)
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
    for i in range(layers):
        block = f"layers.{i}"
        for name in ("q", "k", "v", "o"):
            shapes[f"{block}.attn.{name}.weight"] = (d, d)
            shapes[f"{block}.attn.{name}.bias"] = (d,)
        shapes[f"{block}.mlp.up.weight"] = (4 * d, d)
        shapes[f"{block}.mlp.up.bias"] = (4 * d,)
        shapes[f"{block}.mlp.down.weight"] = (d, 4 * d)
        shapes[f"{block}.mlp.down.bias"] = (d,)
        for norm in ("norm1", "norm2"):
            shapes[f"{block}.{norm}.weight"] = (d,)
            shapes[f"{block}.{norm}.bias"] = (d,)
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    state: dict[str, Any] = {
        name: torch.randn(shape, generator=gen) for name, shape in shapes.items()
    }
    # The int64 buffer takes up what the shapes leave, so the size is exact.
    rest = max(0, nbytes - sum(t.nbytes for t in state.values())) // 8
    state["embed.position_ids"] = torch.arange(max(rest, 1), dtype=torch.int64)
    trained = {n for n in state if n.startswith((f"layers.{layers - 1}.", "norm."))}
    return state, trained


def tensor_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _views(state: dict[str, Any]) -> list[memoryview]:
    return [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in state.values()]


# Measuring ---------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _hwm()
    except (OSError, RuntimeError):
        return False
    return True


def _disk_write_bytes() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _PeakSampler:
    """Fallback: the highest RSS seen by a thread polling every millisecond."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss())


@dataclass
class Sample:
    seconds: float
    payload: int
    disk: int
    peak_extra: int


def _trim_heap() -> None:
    # Hand freed heap memory back to the OS, so that RSS before an operation
    # does not hide memory it allocates again (glibc keeps freed blocks).
    name = ctypes.util.find_library("c")
    if name is not None:
        ctypes.CDLL(name).malloc_trim(0)


def measure(timed: Timed, *, pause: float, reset_hwm: bool) -> Sample:
    """Run `timed` once after `pause` seconds; its time, bytes and peak memory."""
    gc.collect()
    _trim_heap()
    if pause:
        time.sleep(pause)
    before = _rss()
    sampler = None
    if reset_hwm:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    else:
        sampler = _PeakSampler()
    disk0 = _disk_write_bytes()
    t0 = time.perf_counter()
    payload = timed()
    seconds = time.perf_counter() - t0
    disk = _disk_write_bytes() - disk0
    peak = sampler.stop() if sampler is not None else _hwm()
    return Sample(seconds, payload, disk, max(0, peak - before))


# The compared operations -------------------------------------------------------


@dataclass
class Op:
    """One compared operation: `prepare(workdir)` (untimed) returns the timed
    call, which returns the payload bytes, and a cleanup."""

    name: str
    kind: str  # "save", "load" or "sequence"
    prepare: Callable[[Path], Prepared]
    baseline: bool = False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(state: dict[str, Any], path: Path) -> int:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _nothing() -> None:
    return None


def save_ops(state: dict[str, Any], fixtures: Path) -> list[Op]:
    views = _views(state)
    total = sum(v.nbytes for v in views)

    def torch_save(work: Path) -> Prepared:
        return (lambda: _torch_save(state, work / "model.pt")), _nothing

    def st_save(work: Path) -> Prepared:
        def timed() -> int:
            path = work / "model.safetensors"
            safetensors.torch.save_file(state, str(path))
            _fsync_path(path)
            return path.stat().st_size

        return timed, _nothing

    def ckpt_save(work: Path) -> Prepared:
        store = Store(work / "store")
        run = store.run("bench")
        return (lambda: run.save(state, epoch=1).bytes_written), store.close

    def ckpt_unchanged(work: Path) -> Prepared:
        store = Store(fixtures / "store")
        run = store.run("bench")
        return (lambda: run.save(state, epoch=1).bytes_written), store.close

    def raw_write(work: Path) -> Prepared:
        def timed() -> int:
            fd = os.open(work / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                for view in views:
                    done = 0
                    while done < view.nbytes:
                        done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            return total

        return timed, _nothing

    staged: list[mmap.mmap] = []

    def direct_write(work: Path) -> Prepared:
        # The device floor: the same bytes, pre-staged in one aligned buffer.
        if not staged:
            buf = mmap.mmap(-1, -(-total // _ALIGN) * _ALIGN)
            pos = 0
            for view in views:
                buf[pos : pos + view.nbytes] = view
                pos += view.nbytes
            staged.append(buf)
        buf = memoryview(staged[0])

        def timed() -> int:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT
            fd = os.open(work / "direct.bin", flags)
            try:
                done = 0
                while done < buf.nbytes:
                    done += os.write(fd, buf[done : done + 64 * _MIB])
                os.fsync(fd)
            finally:
                os.close(fd)
            return buf.nbytes

        return timed, _nothing

    return [
        Op("torch.save+fsync", "save", torch_save, baseline=True),
        Op("safetensors save+fsync", "save", st_save),
        Op("ckpt save (fresh)", "save", ckpt_save),
        Op("ckpt save (unchanged)", "save", ckpt_unchanged),
        Op("raw write+fsync", "save", raw_write),
        Op("O_DIRECT write+fsync", "save", direct_write),
    ]


def write_fixtures(state: dict[str, Any], fixtures: Path) -> None:
    """The files the loads read: one per format, written once per size."""
    fixtures.mkdir(parents=True, exist_ok=True)
    _torch_save(state, fixtures / "model.pt")
    safetensors.torch.save_file(state, str(fixtures / "model.safetensors"))
    with open(fixtures / "raw.bin", "wb") as f:
        for view in _views(state):
            f.write(view)
    with Store(fixtures / "store") as store:
        run = store.run("bench")
        run.save(state, epoch=1)
        loaded = run.load("last")
    if loaded.keys() != state.keys() or not all(
        torch.equal(loaded[k], state[k]) for k in state
    ):
        raise RuntimeError("ckpt load returned different tensors than were saved")


def load_ops(fixtures: Path, total: int) -> list[Op]:
    def loader(fn: Callable[[], Any]) -> Callable[[Path], Prepared]:
        def prepare(work: Path) -> Prepared:
            held: list[Any] = []

            def timed() -> int:
                held.append(fn())  # kept alive until measured
                return total

            return timed, held.clear

        return prepare

    def ckpt_load() -> Any:
        with Store(fixtures / "store") as store:
            return store.get_run("bench").load("last")

    def raw_read() -> Any:
        path = fixtures / "raw.bin"
        buf = bytearray(path.stat().st_size)
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)
        return buf

    return [
        Op(
            "torch.load(weights_only)",
            "load",
            loader(lambda: torch.load(fixtures / "model.pt", weights_only=True)),
            baseline=True,
        ),
        Op(
            "safetensors load",
            "load",
            loader(lambda: safetensors.torch.load_file(fixtures / "model.safetensors")),
        ),
        Op("ckpt load (verified)", "load", loader(ckpt_load)),
        Op("raw read", "load", loader(raw_read)),
    ]


def sequence_ops(state: dict[str, Any], trained: set[str]) -> list[Op]:
    def step() -> None:
        with torch.no_grad():
            for name in trained:
                state[name].add_(1e-3)

    def torch_seq(work: Path) -> Prepared:
        def timed() -> int:
            written = 0
            for i in range(_SEQUENCE_SAVES):
                step()
                written += _torch_save(state, work / f"epoch{i}.pt")
            return written

        return timed, _nothing

    def ckpt_seq(work: Path) -> Prepared:
        # The pre-trained weights are already in the store, as after pre-training.
        store = Store(work / "store")
        run = store.run("finetune")
        run.save(state, epoch=0)

        def timed() -> int:
            written = 0
            for i in range(_SEQUENCE_SAVES):
                step()
                written += run.save(state, epoch=i + 1).bytes_written
            return written

        return timed, store.close

    return [
        Op(f"torch.save+fsync x{_SEQUENCE_SAVES}", "sequence", torch_seq, True),
        Op(f"ckpt save x{_SEQUENCE_SAVES}", "sequence", ckpt_seq),
    ]


# Running -----------------------------------------------------------------------


@dataclass
class Result:
    """The repetitions of one operation at one size in one regime."""

    op: str
    kind: str
    size: int
    regime: str
    samples: list[Sample] = field(default_factory=list)
    baseline: bool = False

    def median(self, attr: str = "seconds") -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    def summary(self, base: Result | None) -> dict[str, Any]:
        secs = [s.seconds for s in self.samples]
        med = self.median()
        payload = int(self.median("payload"))
        scale = _SEQUENCE_SAVES if self.kind == "sequence" else 1
        out: dict[str, Any] = {
            "op": self.op,
            "kind": self.kind,
            "size": self.size,
            "regime": self.regime,
            "reps": len(secs),
            "seconds": secs,
            "median_s": med,
            "min_s": min(secs),
            "max_s": max(secs),
            "gb_per_s": self.size * scale / med / 1e9 if med > 0 else None,
            "bytes_written": payload if self.kind != "load" else 0,
            "disk_bytes": int(self.median("disk")),
            "peak_extra_bytes": int(max(s.peak_extra for s in self.samples)),
            "ratio": None,
            "paired_ratios": None,
        }
        if base is not None and base.samples:
            out["ratio"] = med / base.median()
            out["paired_ratios"] = [
                a.seconds / b.seconds
                for a, b in zip(self.samples, base.samples, strict=False)
            ]
        return out


def run_group(
    ops: Sequence[Op],
    *,
    size: int,
    regime: str,
    reps: int,
    pause: float,
    root: Path,
    reset_hwm: bool,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Run `ops` interleaved, `reps` times each; summaries with ratios."""
    results = [
        Result(op.name, op.kind, size, regime, baseline=op.baseline) for op in ops
    ]
    for rep in range(reps):
        for op, result in zip(ops, results, strict=True):
            progress(f"{regime} {_size_text(size)} rep {rep + 1}/{reps}: {op.name}")
            work = Path(tempfile.mkdtemp(prefix="op-", dir=root))
            timed, cleanup = op.prepare(work)
            try:
                result.samples.append(measure(timed, pause=pause, reset_hwm=reset_hwm))
            finally:
                cleanup()
                shutil.rmtree(work, ignore_errors=True)
    base = next((r for r in results if r.baseline), None)
    return [r.summary(base) for r in results]


# Ledger figures ----------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_appends(root: Path, count: int) -> dict[str, Any]:
    """Latency of appending save events: the public save of a checkpoint with
    no tensors (lease, manifest blob, commit), and the bare event transaction."""
    with Store(root / "appends") as store:
        run = store.run("appends")
        saves = []
        for i in range(count):
            t0 = time.perf_counter()
            run.save({"step": i}, step=i, metrics={"loss": 1.0 / (i + 1)})
            saves.append(time.perf_counter() - t0)
        events = []
        for i in range(count):
            t0 = time.perf_counter()
            with store.db.write():
                store._append("appends", "save", step=i, body={"metrics": {}})
            events.append(time.perf_counter() - t0)
    return {
        "count": count,
        "save_p50_s": statistics.median(saves),
        "save_p99_s": _percentile(saves, 0.99),
        "event_p50_s": statistics.median(events),
        "event_p99_s": _percentile(events, 0.99),
    }


def build_history(path: Path, n_events: int) -> tuple[int, int]:
    """A run of `n_events` events (80% saves, 10% promotes, 10% expires), each
    save naming one blob, plus unreferenced blobs: as many blobs as events.

    Written through the ledger's private append in one transaction, since a
    hundred thousand real saves would take longer than the benchmark itself.
    Returns (last event number, blob count).
    """
    with Store(path) as store:
        store.run("history")
        blobs_dir = path / "blobs"
        digests = []
        for i in range(n_events):
            data = b"bench blob %d" % i
            digest = blake3.blake3(data).hexdigest()
            shard = blobs_dir / digest[:2]
            shard.mkdir(parents=True, exist_ok=True)
            (shard / digest).write_bytes(data)
            digests.append((digest, len(data)))
        saves: list[int] = []
        promoted: set[int] = set()
        expired = 0
        seq = 0
        with store.db.write():
            i = 0
            while seq < n_events:  # the open event is #1
                i += 1
                if i % 10 == 8 and saves:
                    target = saves[-1]
                    promoted.add(target)
                    ev = store._append(
                        "history", "promote", target=target, metric="loss", value=0.1
                    )
                elif i % 10 == 9 and expired < len(saves) - 1:
                    target = saves[expired]
                    expired += 1
                    if target in promoted:
                        continue
                    ev = store._append(
                        "history", "expire", target=target, body={"reason": "bench"}
                    )
                else:
                    digest, size = digests[len(saves)]
                    ev = store._append(
                        "history",
                        "save",
                        epoch=len(saves) + 1,
                        step=i,
                        manifest=digest,
                        metric="loss",
                        value=1.0 / (i + 1),
                        body={"metrics": {"loss": 1.0 / (i + 1)}, "bytes_written": 0},
                        refs=[(digest, size)],
                    )
                    saves.append(ev.seq)
                seq = ev.seq
    return seq, len(digests)


def _cli_command() -> list[str] | None:
    script = Path(sys.executable).with_name("ckpt")
    if script.exists():
        return [str(script)]
    try:
        import ledger.cli  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-c", "import sys; from ledger.cli import main; main()"]


def bench_history(root: Path, n_events: int, reps: int) -> dict[str, Any]:
    path = root / "history"
    t0 = time.perf_counter()
    last, n_blobs = build_history(path, n_events)
    out: dict[str, Any] = {
        "events": last,
        "blobs": n_blobs,
        "build_s": time.perf_counter() - t0,
    }
    with Store(path) as store:
        run = store.get_run("history")
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            state = run.state(at=last)
            times.append(time.perf_counter() - t0)
        out["replay_s"] = statistics.median(times)
        out["replay_live_saves"] = len(state.live)

    cli = _cli_command()
    if cli is None:
        out["log_note"] = "ledger.cli is not installed: `ckpt log` not timed"
    else:
        t0 = time.perf_counter()
        subprocess.run([*cli, "--help"], capture_output=True, check=False)
        out["cli_start_s"] = time.perf_counter() - t0
        # log_s is the --json form (its key since the first bench), and
        # log_table_s the table a person reads.
        for key, form in (("log", ["--json"]), ("log_table", [])):
            args = [*cli, "--store", str(path), "log", "history", *form]
            times, rc = [], 0
            for _ in range(max(1, min(reps, 3))):
                t0 = time.perf_counter()
                proc = subprocess.run(args, capture_output=True, check=False)
                times.append(time.perf_counter() - t0)
                rc = proc.returncode
            out[f"{key}_s"] = statistics.median(times)
            out[f"{key}_rc"] = rc
            if rc != 0:
                note = proc.stderr.decode(errors="replace").strip()[-300:]
                out["log_note"] = f"`ckpt log history {' '.join(form)}`: {note}"

    with Store(path) as store:
        t0 = time.perf_counter()
        report = store.gc(grace=0)
        out["gc_s"] = time.perf_counter() - t0
        out["gc_removed"] = report.blobs_removed
        out["gc_live"] = report.live_blobs
    return out


# Reporting ---------------------------------------------------------------------


def _size_text(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every target of the performance issue against this run."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float) -> None:
        met = value is not None and value <= limit
        checks.append({"target": name, "value": value, "limit": limit, "met": met})

    for row in doc["results"]:
        tag = f"{_size_text(row['size'])} {row['regime']}"
        if row["op"] == "ckpt save (fresh)":
            check(f"fresh save ratio, {tag}", row["ratio"], 0.8)
            check(f"save peak extra MiB, {tag}", row["peak_extra_bytes"] / _MIB, 32)
        elif row["op"] == "ckpt save (unchanged)":
            check(f"unchanged save ratio, {tag}", row["ratio"], 0.1)
            check(f"unchanged save bytes, {tag}", row["bytes_written"], 0)
        elif row["op"] == "ckpt load (verified)":
            check(f"verified load ratio, {tag}", row["ratio"], 1.1)
            peak = row["peak_extra_bytes"] / row["size"]
            check(f"load peak / checkpoint, {tag}", peak, 1.05)
        elif row["op"].startswith("ckpt save x"):
            changed = doc["sequence"]["changed_bytes"]
            check(f"sequence ratio, {tag}", row["ratio"], 0.25)
            check(
                f"sequence bytes / changed bytes, {tag}",
                row["bytes_written"] / changed,
                1.01,
            )
    ledger_doc = doc.get("ledger") or {}
    if "appends" in ledger_doc:
        check(
            "append p50 ms (save event)", ledger_doc["appends"]["save_p50_s"] * 1e3, 5
        )
    hist = ledger_doc.get("history") or {}
    if "replay_s" in hist:
        check(f"replay of {hist['events']} events, s", hist["replay_s"], 0.5)
    if "log_s" in hist:
        check(f"ckpt log --json of {hist['events']} events, s", hist["log_s"], 2.0)
    if "log_table_s" in hist:
        check(
            f"ckpt log (table) of {hist['events']} events, s", hist["log_table_s"], 2.0
        )
    if "gc_s" in hist:
        check(f"gc of {hist['blobs']} blobs, s", hist["gc_s"], 10.0)
    return checks


def render(doc: dict[str, Any], console: Console) -> None:
    table = Table(title="ckpt-ledger benchmark", title_justify="left")
    for col in ("regime", "size", "operation", "median s", "min-max s", "GB/s"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    for col in ("ratio", "written", "peak extra"):
        table.add_column(col, justify="right")
    for row in doc["results"]:
        ratio = row["ratio"]
        table.add_row(
            row["regime"],
            _size_text(row["size"]),
            row["op"],
            f"{row['median_s']:.3f}",
            f"{row['min_s']:.3f}-{row['max_s']:.3f}",
            f"{row['gb_per_s']:.2f}" if row["gb_per_s"] else "",
            f"{ratio:.2f}x" if ratio is not None else "",
            _size_text(row["bytes_written"]) if row["kind"] != "load" else "",
            _size_text(row["peak_extra_bytes"]),
        )
    if doc["results"]:
        console.print(table)

    ledger_doc = doc.get("ledger") or {}
    if ledger_doc:
        lt = Table(title="ledger", title_justify="left")
        lt.add_column("figure")
        lt.add_column("value", justify="right")
        ap = ledger_doc.get("appends", {})
        if ap:
            lt.add_row("save event, no tensors: p50 / p99 ms", _ms(ap, "save"))
            lt.add_row("bare event transaction: p50 / p99 ms", _ms(ap, "event"))
        hist = ledger_doc.get("history", {})
        if "replay_s" in hist:
            lt.add_row(
                f"replay of {hist['events']} events", f"{hist['replay_s']:.3f} s"
            )
        if "log_s" in hist:
            lt.add_row(
                f"`ckpt log --json` of {hist['events']} events (subprocess)",
                f"{hist['log_s']:.3f} s (start-up {hist['cli_start_s']:.2f} s)",
            )
        if "log_table_s" in hist:
            lt.add_row(
                f"`ckpt log` table of {hist['events']} events (subprocess)",
                f"{hist['log_table_s']:.3f} s",
            )
        if hist.get("log_note"):
            lt.add_row("`ckpt log`", hist["log_note"])
        if "gc_s" in hist:
            lt.add_row(
                f"gc mark+sweep over {hist['blobs']} blobs",
                f"{hist['gc_s']:.3f} s ({hist['gc_removed']} removed)",
            )
        console.print(lt)

    tt = Table(title="targets", title_justify="left")
    for col in ("target", "value", "limit", "met"):
        tt.add_column(col, justify="left" if col == "target" else "right")
    for t in doc["targets"]:
        value = t["value"]
        tt.add_row(
            t["target"],
            "n/a" if value is None else f"{value:.3g}",
            f"{t['limit']:g}",
            "yes" if t["met"] else "[bold red]no[/]",
        )
    console.print(tt)


def _ms(doc: dict[str, Any], key: str) -> str:
    return f"{doc[key + '_p50_s'] * 1e3:.2f} / {doc[key + '_p99_s'] * 1e3:.2f}"


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in f
                    if ln.startswith("model name")
                ),
                cpu,
            )
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "blake3": getattr(blake3, "__version__", "?"),
        "safetensors": getattr(safetensors, "__version__", "?"),
    }


def _filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mount = parts[1]
            inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


# Entry point -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="state dict sizes (default 256M,1G)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    p.add_argument(
        "--cold-pause", type=float, default=None, help="seconds before a cold op (3)"
    )
    p.add_argument("--regimes", default="warm,cold", help="warm, cold or both")
    p.add_argument(
        "--sequence-size", default=None, help="fine-tuning size (default: smallest)"
    )
    p.add_argument("--ledger-events", type=int, default=None, help="default 100000")
    p.add_argument("--appends", type=int, default=None, help="default 200")
    p.add_argument(
        "--only",
        default="save,load,sequence,ledger",
        help="parts to run: save, load, sequence, ledger",
    )
    p.add_argument(
        "--dir", type=Path, default=None, help="where stores go (default: $TMPDIR)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--quick", action="store_true", help="a small run (32M, 3 reps)")
    args = p.parse_args(argv)
    args.sizes = [
        parse_size(s) for s in (args.sizes or _q(args, "32M", "256M,1G")).split(",")
    ]
    args.reps = args.reps or _q(args, 3, 5)
    args.ledger_events = args.ledger_events or _q(args, 2000, 100_000)
    args.appends = args.appends or _q(args, 30, 200)
    args.regimes = [r for r in args.regimes.split(",") if r]
    args.only = set(args.only.split(","))
    if args.cold_pause is None:
        args.cold_pause = _q(args, 0.5, 3.0)
    args.sequence_size = (
        parse_size(args.sequence_size) if args.sequence_size else min(args.sizes)
    )
    return args


def _q(args: argparse.Namespace, quick: Any, full: Any) -> Any:
    return quick if args.quick else full


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    console = Console(stderr=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    fs = _filesystem(root.resolve())
    if fs in ("tmpfs", "ramfs"):
        console.print(f"[yellow]{root} is on {fs}: pass --dir on a real disk[/]")
    reset_hwm = _can_reset_hwm()
    doc: dict[str, Any] = {
        "machine": {**machine(), "filesystem": fs, "bench_dir": str(root)},
        "config": {
            "sizes": args.sizes,
            "reps": args.reps,
            "cold_pause_s": args.cold_pause,
            "regimes": args.regimes,
            "memory_method": "VmHWM reset via /proc/self/clear_refs"
            if reset_hwm
            else "RSS sampled every 1 ms from /proc/self/statm",
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "results": [],
    }
    pauses = {"warm": 0.0, "cold": args.cold_pause}

    def progress(text: str) -> None:
        console.log(text)

    try:
        for size in args.sizes if args.only & {"save", "load"} else []:
            state, _ = make_state_dict(size)
            total = tensor_bytes(state)
            fixtures = root / f"fixtures-{size}"
            write_fixtures(state, fixtures)
            for regime in args.regimes:
                common = {
                    "size": total,
                    "regime": regime,
                    "reps": args.reps,
                    "pause": pauses[regime],
                    "root": root,
                    "reset_hwm": reset_hwm,
                    "progress": progress,
                }
                if "save" in args.only:
                    doc["results"] += run_group(save_ops(state, fixtures), **common)
                if "load" in args.only:
                    doc["results"] += run_group(load_ops(fixtures, total), **common)
            del state
            shutil.rmtree(fixtures, ignore_errors=True)

        if "sequence" in args.only:
            state, trained = make_state_dict(args.sequence_size, seed=1)
            changed = sum(state[n].nbytes for n in trained) * _SEQUENCE_SAVES
            doc["sequence"] = {
                "size": tensor_bytes(state),
                "saves": _SEQUENCE_SAVES,
                "changed_bytes": changed,
                "frozen_fraction": 1 - changed / _SEQUENCE_SAVES / tensor_bytes(state),
            }
            for regime in args.regimes:
                doc["results"] += run_group(
                    sequence_ops(state, trained),
                    size=tensor_bytes(state),
                    regime=regime,
                    reps=args.reps,
                    pause=pauses[regime],
                    root=root,
                    reset_hwm=reset_hwm,
                    progress=progress,
                )
            del state

        if "ledger" in args.only:
            progress(f"ledger: {args.appends} appends, {args.ledger_events} events")
            doc["ledger"] = {
                "appends": bench_appends(root, args.appends),
                "history": bench_history(root, args.ledger_events, args.reps),
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    doc["targets"] = evaluate_targets(doc)
    out = Console()
    render(doc, out if out.is_terminal else Console(width=150))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
