"""Replay: a run's state is a pure fold of its events, now and at any earlier seq.

Random sequences of real operations (save, resume, finalize, expire, retention,
and saves of a second run interleaved) are applied to a store; after each one
the incrementally kept state must equal a fold from scratch, and afterwards
every earlier state must be what `state(at=seq)` gives back.
"""

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledger
from ledger import BestPolicy, RunOptions, RunState, Store
from ledger._events import Event
from ledger._replay import fold

_FINAL_EPOCH = 3

_SAVE = st.tuples(
    st.just("save"),
    st.sampled_from([None, 1, 2, _FINAL_EPOCH, _FINAL_EPOCH, 4, 5]),
    st.sampled_from([None, math.nan, 0.1, 0.2, 0.2, 0.5, 0.9]),
)
_OPS = st.lists(
    st.one_of(
        _SAVE,
        _SAVE,
        st.tuples(
            st.just("resume"),
            st.sampled_from(["auto", "last", "best", "final", "ref"]),
            st.integers(0, 20),
        ),
        st.tuples(st.just("finalize"), st.booleans(), st.integers(0, 20)),
        st.tuples(st.just("finalize"), st.just(True), st.integers(0, 20)),
        st.tuples(st.just("expire"), st.just(None), st.integers(0, 20)),
        st.tuples(st.just("other"), st.integers(1, 5), st.just(0.3)),
    ),
    min_size=3,
    max_size=16,
)


def _plain(state: RunState) -> dict[str, Any]:
    """The state as comparable data (sets sorted, NaN metrics compared by repr)."""
    out = {}
    for item in dataclasses.fields(state):
        value = getattr(state, item.name)
        if isinstance(value, set):
            value = sorted(value)
        elif item.name == "saves":
            value = {
                seq: (s.epoch, s.step, s.manifest, repr(sorted(s.metrics.items())))
                for seq, s in value.items()
            }
        out[item.name] = value
    return out


def _apply(run: ledger.Run, other: ledger.Run, op: tuple[Any, Any, Any]) -> None:
    kind, arg, value = op
    saves = [ev.seq for ev in run.history("save")]
    if kind == "save":
        metrics = {} if value is None else {"m": value}
        run.save({"w": torch.tensor([float(len(saves))])}, epoch=arg, metrics=metrics)
        return
    if kind == "other":
        other.save({"w": torch.tensor([value])}, epoch=arg, metrics={"m": value})
        return
    # An index into the saves so far; a seq no event has when there are none.
    chosen = saves[value % len(saves)] if saves else 10**6
    if kind == "resume" and arg == "ref":
        run.resume("auto", ref=chosen)
    elif kind == "resume":
        run.resume(arg)
    elif kind == "finalize" and arg:
        state = run.state()
        at_final = [s for s in state.live if state.saves[s].epoch == _FINAL_EPOCH]
        run.finalize(max(at_final) if at_final else chosen)
    elif kind == "finalize":
        run.finalize(chosen)
    else:
        run.expire(chosen)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=_OPS,
    keep_last=st.sampled_from([None, 1, 2, 3]),
    mode=st.sampled_from(["max", "min"]),
    start=st.integers(1, 3),
)
def test_incremental_state_equals_replay_from_scratch_and_prefixes_give_history(
    tmp_path: Path,
    ops: list[tuple[Any, Any, Any]],
    keep_last: int | None,
    mode: str,
    start: int,
) -> None:
    options = RunOptions(
        best=BestPolicy("m", mode=mode, start_epoch=start),
        final_epoch=_FINAL_EPOCH,
        keep_last=keep_last,
    )
    with Store(tmp_path / "store") as store:
        name = f"r{len(store.runs())}"
        run = store.run(name, options=options)
        other = store.run(f"{name}-other", options=RunOptions(keep_last=1))
        history = [(run.state().seq, _plain(run.state()))]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ledger.MetricWarning)
            for op in ops:
                before = _plain(run.state())
                try:
                    _apply(run, other, op)
                except (ledger.PolicyError, ledger.UnknownReferenceError):
                    assert _plain(run.state()) == before
                now = run.state()
                scratch = fold(store.events(name), run=name)
                assert _plain(now) == _plain(scratch)
                history.append((now.seq, _plain(now)))

        for seq, expected in history:
            assert _plain(run.state(at=seq)) == expected
        with Store(tmp_path / "store") as again:
            assert _plain(again.get_run(name).state()) == history[-1][1]


def test_state_at_an_event_number_is_the_prefix_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(best=BestPolicy("loss", mode="min")))
    first = run.save({"w": torch.zeros(2)}, epoch=1, metrics={"loss": 1.0})
    second = run.save({"w": torch.ones(2)}, epoch=2, metrics={"loss": 0.5})
    assert first is not None and second is not None

    then = run.state(at=first.seq)
    now = run.state()

    assert (then.last, then.best, then.best_value) == (first.seq, None, None)
    assert then.seq == first.seq and sorted(then.saves) == [first.seq]
    assert (now.last, now.best, now.best_value) == (second.seq, second.seq, 0.5)
    store.close()


def test_state_before_the_open_event_is_empty(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.run("a").save({"w": torch.zeros(1)}, epoch=1)
    run = store.run("b")

    state = run.state(at=2)

    assert state.opened is None and state.events == 0 and state.saves == {}
    store.close()


def test_fold_refuses_events_out_of_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r")
    run.save({"w": torch.zeros(1)}, epoch=1)
    events = run.history()

    with pytest.raises(ValueError, match="out of order"):
        fold(list(reversed(events)))

    store.close()


def test_fold_leaves_the_state_it_starts_from_untouched(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run = store.run("r", options=RunOptions(keep_last=1))
    run.save({"w": torch.zeros(1)}, epoch=1)
    opened, *rest = run.history()
    start = fold([opened])
    kept = _plain(start)

    later = fold(rest, start)

    assert _plain(start) == kept
    assert later.last is not None and start.last is None
    store.close()


_EVENT = st.tuples(
    st.sampled_from(["open", "save", "save", "promote", "final", "resume", "expire"]),
    st.sampled_from(["r", "r", "other"]),
    st.one_of(st.none(), st.integers(0, 40)),
    st.one_of(st.none(), st.integers(-1, 12)),
    st.one_of(st.none(), st.floats(allow_nan=True), st.just(-0.0)),
    st.dictionaries(st.sampled_from(["m", "loss", "é"]), st.floats(), max_size=2),
)


def _model(events: list[Event]) -> dict[str, Any]:
    """The state as the obvious fold of Event objects, one by one."""
    m: dict[str, Any] = {"saves": {}, "live": set(), "targets": set(), "resumes": 0}
    m.update(dict.fromkeys(["seq", "opened", "config_hash", "last", "best"]))
    m.update(dict.fromkeys(["best_value", "final", "resumed_from"]), options={})
    for ev in events:
        m["seq"] = ev.seq
        if ev.kind == "open":
            m["opened"], m["config_hash"] = ev.seq, ev.body.get("config_hash")
            m["options"] = ev.body.get("options", {})
        elif ev.kind == "save":
            m["saves"][ev.seq] = (ev.epoch, ev.step, ev.manifest or "", ev.metrics)
            m["live"].add(ev.seq)
            m["last"] = ev.seq
        elif ev.kind == "promote":
            m["best"], m["best_value"] = ev.target, ev.value
        elif ev.kind == "final":
            m["final"] = ev.target
        elif ev.kind == "resume":
            m["resumed_from"] = ev.target
            m["resumes"] += 1
            if ev.target is not None:
                m["targets"].add(ev.target)
            m["config_hash"] = ev.body.get("config_hash") or m["config_hash"]
        elif ev.target is not None:
            m["live"].discard(ev.target)
    m["events"] = len(events)
    m["live"], m["targets"] = sorted(m["live"]), sorted(m["targets"])
    return m


def _as_model(state: RunState) -> dict[str, Any]:
    return {
        "saves": {
            seq: (s.epoch, s.step, s.manifest, s.metrics)
            for seq, s in state.saves.items()
        },
        "live": sorted(state.live),
        "targets": sorted(state.resume_targets),
        "resumes": state.resumes,
        "seq": state.seq or None,
        "opened": state.opened,
        "config_hash": state.config_hash,
        "last": state.last,
        "best": state.best,
        "best_value": state.best_value,
        "final": state.final,
        "resumed_from": state.resumed_from,
        "options": state.options,
        "events": state.events,
    }


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(events=st.lists(_EVENT, min_size=8, max_size=30))
def test_replay_of_rows_equals_folding_event_objects_one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[tuple[Any, ...]],
) -> None:
    with Store(tmp_path_factory.mktemp("store")) as store:
        run = store.run("r")
        cached = store.get_run("r")
        for kind, name, target_pick, epoch, value, metrics in events:
            seqs = [ev.seq for ev in store.events()]
            target = None if target_pick is None else seqs[target_pick % len(seqs)]
            body: dict[str, Any] = {"metrics": metrics}
            if kind in ("open", "resume"):
                body = {"config_hash": f"h{epoch}" if epoch else None}
                body["options"] = {"keep_last": epoch}
            with store.db.write():
                store._append(
                    name,
                    kind,
                    epoch=epoch,
                    step=None if epoch is None else epoch * 10,
                    manifest=f"{len(seqs):064x}" if kind == "save" else None,
                    metric="m" if value is not None else None,
                    value=value,
                    target=target,
                    body=body,
                )
            cached.refresh()

        history = store.events("r")
        for i, ev in enumerate(history):
            expected = _model(history[: i + 1])
            assert repr(_as_model(run.state(at=ev.seq))) == repr(expected)
            assert repr(_as_model(fold(history[: i + 1]))) == repr(expected)
        assert repr(_as_model(cached.state())) == repr(_model(history))
