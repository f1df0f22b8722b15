"""Crash torture: SIGKILL a saving process at random moments while gc runs beside it.

One interpreter imports torch once and forks everything else (the saver, the
collector, each `ckpt verify`): a fresh interpreter per kill would spend seconds
importing, so a thousand kills take minutes instead of hours. The cost is that
the children share the parent's imports, so torch runs single-threaded here.
Kills are SIGKILLs, not power cuts: the kernel keeps what a dead process wrote,
so the default store lives on tmpfs and fsync durability is not what is tested.

    python tools/crashtest.py --kills 50 --seed 1

Ends with one line, `kills: N, committed events lost: 0, dangling references: 0,
corrupt blobs accepted: 0`; exits 1 when a figure is not 0 or a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cas import BlobStore, CorruptBlobError, MissingBlobError
from ledger import BestPolicy, RunOptions, Store
from ledger._replay import fold

STEPS = (
    "leased",
    "tmp_open",
    "write",
    "fsync",
    "rename",
    "dir_fsync",
    "blobs_written",
    "committed",
)
# Statements inside the ledger's transactions: a saver that kills itself when
# one starts dies inside the lease or the commit transaction.
SQL_STEPS = ("INSERT INTO leases", "INSERT INTO events", "INSERT INTO refs", "COMMIT")
OPTIONS = RunOptions(best=BestPolicy("loss", mode="min"), keep_last=2)
BACKBONE = np.random.default_rng(0).standard_normal(16384).astype(np.float32)
KILLS_PER_RUN = 10


@dataclass(frozen=True)
class Plan:
    """How one saver lives and dies.

    Attributes:
        run: the run it saves into.
        seed: its random seed (checkpoint contents, metrics, sleeps).
        kill_at: a protocol step or an SQL statement start ("sql:COMMIT") at
            which it SIGKILLs itself; None leaves the kill to the parent's timer.
        kill_nth: at which occurrence of `kill_at`.
        sleep_chance: chance of a short sleep at each protocol step, which
            widens the windows a timer kill can land in.
        lease_ttl: the saver's lease TTL; a tiny one lets leases lapse mid-save.
        timer: seconds after which the parent SIGKILLs it.
    """

    run: str
    seed: int
    kill_at: str | None
    kill_nth: int
    sleep_chance: float
    lease_ttl: float
    timer: float


@dataclass
class Findings:
    """What the checks found, as sets so a problem seen twice counts once."""

    lost: set[int] = field(default_factory=set)
    dangling: set[tuple[int | None, str | None]] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.dangling or self.corrupt or self.failures)


def make_plan(rng: random.Random, index: int) -> Plan:
    """A random way to die for the `index`-th saver."""
    kill_at = None
    if rng.random() < 0.6:
        kill_at = rng.choice(STEPS + tuple(f"sql:{s}" for s in SQL_STEPS))
    lapsing = rng.random() < 0.05
    return Plan(
        run=f"run-{index // KILLS_PER_RUN}",
        seed=rng.getrandbits(32),
        kill_at=kill_at,
        kill_nth=rng.randint(1, 12),
        sleep_chance=rng.choice((0.0, 0.1, 0.3)),
        lease_ttl=0.01 if lapsing else 2.0,
        timer=rng.uniform(0.02, 0.5),
    )


def checkpoint(rng: np.random.Generator, epoch: int, keep: Any) -> dict[str, Any]:
    """A small training state: a frozen backbone (identical in every save), a
    fresh head, optimizer moments that stay unchanged half the time, and now
    and then a table of just over 1 MiB (the large-blob write path)."""
    moments = keep if keep is not None and rng.random() < 0.5 else None
    if moments is None:
        moments = _random(rng, 1024)
    state: dict[str, Any] = {
        "model": {"backbone": torch.from_numpy(BACKBONE), "head": _random(rng, 2048)},
        "optimizer": {"step": epoch, "exp_avg": moments},
        "epoch": epoch,
    }
    if rng.random() < 0.1:
        state["model"]["table"] = _random(rng, (1 << 18) + 1000)
    return state


def _random(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(n).astype(np.float32))


def saver(store_path: Path, log_path: Path, error_path: Path, plan: Plan) -> None:
    """Save checkpoints in a loop until killed; log each committed event number
    only after `save` returned."""
    rng = random.Random(plan.seed)
    data = np.random.default_rng(plan.seed)
    calls: Counter[str] = Counter()

    def maybe_die(step: str) -> None:
        calls[step] += 1
        if step == plan.kill_at and calls[step] == plan.kill_nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def hook(step: str, detail: str) -> None:
        maybe_die(step)
        if plan.sleep_chance and rng.random() < plan.sleep_chance:
            time.sleep(rng.uniform(0.0, 0.01))

    def trace(statement: str) -> None:
        for start in SQL_STEPS:
            if statement.lstrip().startswith(start):
                maybe_die(f"sql:{start}")

    # Without a hook the blobs are written on several threads: test that too.
    hooked = plan.sleep_chance > 0 or plan.kill_at in STEPS
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        store = Store(
            store_path, hook=hook if hooked else None, lease_ttl=plan.lease_ttl
        )
        store.db.db.conn.set_trace_callback(trace)
        run = store.run(plan.run, options=OPTIONS)
        moments = None
        harness = os.getppid()
        while os.getppid() == harness:  # never outlive the harness
            state = run.state()
            if state.last in state.live and rng.random() < 0.1:
                run.resume("last")
                state = run.state()
            epoch = (state.epoch_of(state.last) or 0) + 1
            ckpt = checkpoint(data, epoch, moments)
            moments = ckpt["optimizer"]["exp_avg"]
            loss = 1.0 / epoch + rng.uniform(0.0, 0.3)
            saved = run.save(ckpt, epoch=epoch, metrics={"loss": loss})
            assert saved is not None
            os.write(log_fd, f"{saved.seq} {saved.manifest}\n".encode())
    except BaseException:  # noqa: BLE001 - a worker hands its failure back
        error_path.write_text(traceback.format_exc())
        raise


def collector(store_path: Path, gc_log: Path, interval: float) -> None:
    """Run gc with a zero grace period in a loop until SIGTERM; log refusals."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    harness = os.getppid()
    with Store(store_path) as store, open(gc_log, "a") as log:
        while not stopping and os.getppid() == harness:
            try:
                report = store.gc(grace=0)
            except Exception as exc:  # noqa: BLE001 - logged for the parent
                log.write(f"error {type(exc).__name__}: {exc}\n")
                log.flush()
                continue
            for problem in report.missing:
                log.write(f"missing {problem.seq} {problem.digest} {problem}\n")
            log.flush()
            time.sleep(interval)


@contextlib.contextmanager
def collecting(store_path: Path, gc_log: Path, interval: float) -> Iterator[int]:
    """A collector process for the duration of the block, whatever happens."""
    pid = fork(collector, store_path, gc_log, interval)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            wait(pid, timeout=60)


def fork(work: Any, *args: Any) -> int:
    """Run `work(*args)` in a child process; it exits 0 on return, 3 on error."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        work(*args)
        code = 0
    finally:
        os._exit(code)


def cli_verify(store_path: Path, run: str | None, out_path: Path) -> None:
    """`ckpt verify [RUN]` in this (forked) process, as the console script runs
    it."""
    from ledger import cli

    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = cli.main(["--store", str(store_path), "verify", *([run] if run else [])])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def warm_up_cli(store_path: Path) -> None:
    """Run `ckpt verify` here once, so that the lazy imports and caches of the
    CLI's libraries are already in place in every forked child."""
    from ledger import cli

    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        cli.main(["--store", str(store_path), "verify"])


def wait(pid: int, timeout: float | None = None) -> tuple[int, bool]:
    """Wait for a child, SIGKILLing it after `timeout` seconds; return its wait
    status and whether this process sent the kill."""
    if timeout is None:
        return os.waitpid(pid, 0)[1], False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1], True


def recorded(log_path: Path) -> dict[int, str]:
    """Event numbers (and manifests) of saves whose `save` returned."""
    if not log_path.exists():
        return {}
    out = {}
    for line in log_path.read_text().splitlines():
        seq, manifest = line.split()
        out[int(seq)] = manifest
    return out


def check_store(
    store: Store, log_path: Path, run_name: str, found: Findings, deep: bool
) -> None:
    """The ledger holds every recorded save, every blob a live save of the run
    (of every run when `deep`) needs is there and sound, and replay agrees
    with itself. `deep` also hashes every blob file on disk."""
    saves = {
        r["seq"]: r["manifest"]
        for r in store.db.rows("SELECT seq, manifest FROM events WHERE kind = 'save'")
    }
    for seq, manifest in recorded(log_path).items():
        if saves.get(seq) != manifest:
            found.lost.add(seq)

    runs = store.runs()
    scope = [None] if deep else [run_name] if run_name in runs else []
    for problem in (p for run in scope for p in store.verify(run)):
        if problem.digest is None:  # the chain or a policy: not about blobs
            found.failures.append(str(problem))
        elif "missing" in problem.message:  # from disk or from the refs table
            found.dangling.add((problem.seq, problem.digest))
        else:
            found.corrupt.add(problem.digest)
    if deep:
        for error in store.blobs.verify_all():
            found.corrupt.add(error.digest)

    if run_name in runs:
        run = store.get_run(run_name)
        state = run.state()
        replayed = fold(store.events(run_name), run=run_name)
        newest = max((e.seq for e in store.events(run_name, kind="save")), default=None)
        if state != replayed or state.last != newest:
            found.failures.append(f"{run_name}: replay disagrees with itself")


def check_new_blobs(store_path: Path, since: float, found: Findings) -> None:
    """Hash every blob file written since `since`, at once and holding the
    ledger's write lock, so that no gc sweeps a misnamed file away first."""
    fd = os.open(store_path / "ledger.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        blobs = BlobStore(store_path)
        for info in blobs.iter_blobs():
            if info.mtime < since - 1.0:  # file times are coarse: look further back
                continue
            try:
                blobs.verify(info.digest)
            except CorruptBlobError:
                found.corrupt.add(info.digest)
            except MissingBlobError:
                pass  # a failed save took its blob back before the lock
    finally:
        os.close(fd)


def save_next(store: Store, log_path: Path, run_name: str, found: Findings) -> None:
    """The next save after a kill works and loads back."""
    try:
        run = store.run(run_name, options=OPTIONS)
        state = run.state()
        epoch = (state.epoch_of(state.last) or 0) + 1
        ckpt = checkpoint(np.random.default_rng(epoch), epoch, None)
        saved = run.save(ckpt, epoch=epoch, metrics={"loss": 1.0 / epoch})
        assert saved is not None
        with open(log_path, "a") as log:
            log.write(f"{saved.seq} {saved.manifest}\n")
        back = run.load(saved.seq)
        if not torch.equal(back["model"]["head"], ckpt["model"]["head"]):
            found.failures.append(f"save #{saved.seq} loads back different")
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        found.failures.append(f"the save after a kill failed: {exc}")


def check_cli(
    store_path: Path, run: str | None, scratch: Path, found: Findings
) -> None:
    out = scratch / "ckpt-verify.out"
    status, _ = wait(fork(cli_verify, store_path, run, out), timeout=600)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        found.failures.append(
            f"ckpt verify exited {code}: {out.read_text().strip()[-500:]}"
        )


def check_gc_log(gc_log: Path, offset: int, found: Findings) -> int:
    with open(gc_log) as log:
        log.seek(offset)
        for line in log:
            kind, rest = line.split(" ", 1)
            if kind == "missing":
                seq, digest, _ = rest.split(" ", 2)
                found.dangling.add((int(seq), digest))
            else:
                found.failures.append(f"gc: {rest.strip()}")
        return log.tell()


@contextlib.contextmanager
def store_dir(given: str | None) -> Iterator[tuple[Path, bool]]:
    if given is not None:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path, False
        return
    shm = "/dev/shm"
    base = shm if os.access(shm, os.W_OK) else None
    yield Path(tempfile.mkdtemp(prefix="crashtest-", dir=base)) / "store", True


@dataclass
class Torture:
    """One torture session: the store, the side logs and what was found."""

    path: Path
    scratch: Path
    has_cli: bool
    found: Findings = field(default_factory=Findings)
    sites: Counter[str] = field(default_factory=Counter)

    @property
    def log_path(self) -> Path:
        return self.scratch / "committed.log"

    def kill_once(self, plan: Plan, deep: bool) -> bool:
        """Start a saver, let it die as `plan` says, then check the store.
        Returns False when the saver did not die by SIGKILL (a failure)."""
        error_path = self.scratch / "saver.err"
        born = time.time()
        pid = fork(saver, self.path, self.log_path, error_path, plan)
        status, by_timer = wait(pid, plan.timer)
        check_new_blobs(self.path, born, self.found)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if killed:
            self.sites["timer" if by_timer else str(plan.kill_at)] += 1
        else:
            error = error_path.read_text()[-800:] if error_path.exists() else ""
            self.found.failures.append(f"saver ended with status {status}: {error}")
        error_path.unlink(missing_ok=True)

        with Store(self.path) as store:
            check_store(store, self.log_path, plan.run, self.found, deep)
            save_next(store, self.log_path, plan.run, self.found)
        if self.has_cli:
            check_cli(self.path, None if deep else plan.run, self.scratch, self.found)
        return killed


def torture(args: argparse.Namespace) -> tuple[int, Findings]:
    rng = random.Random(args.seed)
    has_cli = importlib.util.find_spec("ledger.cli") is not None
    if not has_cli:
        print("crashtest: no ledger.cli; checked with store.verify()", file=sys.stderr)
    started = time.monotonic()

    with store_dir(args.store) as (path, is_temp):
        job = Torture(path, Path(tempfile.mkdtemp(prefix="crashtest-logs-")), has_cli)
        gc_log = job.scratch / "gc.log"
        gc_log.touch()
        # The library's warnings (a save that outlived its lease) go to a file
        # that every forked child appends to, and are counted at the end.
        warned = logging.FileHandler(job.scratch / "warnings.log")
        for name in ("cas", "ledger"):
            logging.getLogger(name).addHandler(warned)
        Store(path).close()
        if has_cli:
            warm_up_cli(path)
        gc_offset, kills, attempt = 0, 0, 0
        with collecting(path, gc_log, args.gc_interval) as gc_pid:
            while kills < args.kills and len(job.found.failures) < 20:
                plan = make_plan(rng, attempt)
                attempt += 1
                deep = (kills + 1) % args.deep_every == 0 or kills + 1 == args.kills
                if job.kill_once(plan, deep):
                    kills += 1
                    if kills % 100 == 0:
                        elapsed = time.monotonic() - started
                        print(
                            f"crashtest: {kills} kills, {elapsed:.0f}s", file=sys.stderr
                        )
                gc_offset = check_gc_log(gc_log, gc_offset, job.found)
                if os.waitpid(gc_pid, os.WNOHANG)[0]:
                    job.found.failures.append("the gc process died")
                    break
        check_gc_log(gc_log, gc_offset, job.found)
        finish(path, job.log_path, has_cli, job.found)
        warned.close()
        lapses = (job.scratch / "warnings.log").read_text()
        print(
            f"crashtest: seed {args.seed}, {attempt} savers, "
            f"{len(recorded(job.log_path))} saves committed, "
            f"{lapses.count('outlived its lease')} saves outlived their lease, "
            f"{time.monotonic() - started:.1f}s, store {path}",
            file=sys.stderr,
        )
        print(
            "crashtest: kills by site: "
            + ", ".join(f"{site} {n}" for site, n in sorted(job.sites.items())),
            file=sys.stderr,
        )
        if job.found.ok:
            shutil.rmtree(job.scratch)
            if is_temp:
                shutil.rmtree(path.parent)
        else:
            print(f"crashtest: logs kept in {job.scratch}", file=sys.stderr)
    return kills, job.found


def finish(store_path: Path, log_path: Path, has_cli: bool, found: Findings) -> None:
    """Once nothing writes: a last gc leaves no temp file, and the real `ckpt
    verify` (a fresh interpreter) agrees."""
    with Store(store_path) as store:
        report = store.gc(grace=0)
        for problem in report.missing:
            found.dangling.add((problem.seq, problem.digest))
        for run_name in store.runs():
            check_store(store, log_path, run_name, found, deep=True)
        leftovers = list(store.blobs.tmp_dir.iterdir())
        if leftovers:
            found.failures.append(f"{len(leftovers)} temp files survived gc")
    if has_cli:
        done = subprocess.run(
            [sys.executable, "-m", "ledger.cli", "--store", str(store_path), "verify"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            found.failures.append(f"ckpt verify exited {done.returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="SIGKILL a saving process at random moments while gc runs.",
        epilog="Example: python tools/crashtest.py --kills 50 --seed 1",
    )
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to deliver")
    parser.add_argument("--store", help="store directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument(
        "--gc-interval",
        type=float,
        default=0.02,
        help="seconds between two gc runs of the collector (default 0.02)",
    )
    parser.add_argument(
        "--deep-every",
        type=int,
        default=10,
        help="after every N-th kill check every run, not only the killed "
        "saver's, and hash every blob on disk (default 10)",
    )
    args = parser.parse_args(argv)
    if args.kills < 1 or args.gc_interval < 0 or args.deep_every < 1:
        parser.error("--kills and --deep-every must be >= 1, --gc-interval >= 0")
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    # One thread: forking a process whose OpenMP pool is running can hang.
    torch.set_num_threads(1)

    kills, found = torture(args)

    for failure in found.failures[:20]:
        print(f"crashtest: {failure}", file=sys.stderr)
    print(
        f"kills: {kills}, committed events lost: {len(found.lost)}, "
        f"dangling references: {len(found.dangling)}, "
        f"corrupt blobs accepted: {len(found.corrupt)}"
    )
    return 0 if found.ok else 1


if __name__ == "__main__":
    sys.exit(main())
