"""Lightning through the ledger: the callback, the CheckpointIO, resume, DDP.

Real Trainers on the CPU with a tiny regression model. The kill and DDP cases
need real processes: this file is also a script (`python test_lightning.py
killed-fit ...` / `ddp ...`) that the tests start.
"""

import argparse
import copy
import dataclasses
import enum
import importlib.util
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ledger import (
    BestPolicy,
    MetricWarning,
    PolicyError,
    RunOptions,
    RunState,
    Store,
    UnsupportedTypeError,
)
from ledger._codec import build, decode_manifest, encode
from ledger.lightning import (
    TAG,
    CheckpointTypeError,
    LedgerCheckpoint,
    LedgerCheckpointIO,
    _Types,
    ledger_epoch,
    parse_reference,
)

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning"
)

EPOCHS = 4
POLICY = RunOptions(best=BestPolicy("train_loss", mode="min"), final_epoch=EPOCHS)


class Regressor(pl.LightningModule):
    """Two linear layers, Adam and a StepLR: every kind of state Lightning saves."""

    def __init__(self, lr: float = 0.05, scores: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.hparams["scores"]:
            self.log("score", self.hparams["scores"][self.current_epoch])
        self.snapshots[self.current_epoch] = {
            k: v.detach().clone() for k, v in self.state_dict().items()
        }

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class Validated(Regressor):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))


def data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(max_epochs: int = EPOCHS, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def model(kind: type[Regressor] = Regressor, **kwargs: Any) -> Regressor:
    pl.seed_everything(7, verbose=False)
    return kind(**kwargs)


class Probe(pl.Callback):
    """Copies what the trainer holds once the resumed states are restored."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.scheduler = copy.deepcopy(scheduler.state_dict())
        self.epoch, self.step = trainer.current_epoch, trainer.global_step
        progress = trainer.fit_loop.epoch_loop
        self.batches = progress.batch_progress.total.completed
        self.steps = progress.automatic_optimization.optim_progress.optimizer_steps


def assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b, path


def run_script(*args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_core_package_imports_without_lightning() -> None:
    block = "import sys; sys.modules['lightning'] = None; "
    check = "import ledger; print(ledger.Store.__name__)"
    refused = "import ledger.lightning"

    core = subprocess.run([sys.executable, "-c", block + check], capture_output=True)
    plugin = subprocess.run(
        [sys.executable, "-c", block + refused], capture_output=True
    )

    assert core.returncode == 0, core.stderr
    assert plugin.returncode == 1
    assert b"pip install 'ckpt-ledger[lightning]'" in plugin.stderr


def test_ledger_epoch_counts_the_epochs_that_ran_to_their_end() -> None:
    in_end_hook = {"ready": 2, "started": 2, "processed": 2, "completed": 1}
    mid_epoch = {"ready": 2, "started": 2, "processed": 1, "completed": 1}
    after_fit = {"ready": 2, "started": 2, "processed": 2, "completed": 2}

    epochs = [ledger_epoch(p) for p in (in_end_hook, mid_epoch, after_fit)]

    assert epochs == [2, 1, 2]


def test_parse_reference_reads_ledger_references_and_leaves_paths() -> None:
    refs = ["ledger:last", "ledger:best", "ledger:#12", "ledger:7", "ledger:abcdef12"]

    parsed = [parse_reference(r) for r in refs]

    assert parsed == ["last", "best", 12, 7, "abcdef12"]
    assert parse_reference("ckpts/epoch=1.ckpt") is None
    with pytest.raises(KeyError, match="invalid ledger reference"):
        parse_reference("ledger:yesterday")


def test_killed_fit_resumes_from_the_ledger_and_ends_like_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    killed = run_script("killed-fit", str(store), "--kill-epoch", "2")
    output = killed.communicate(timeout=300)[0]
    with Store(store) as s:
        saved_epochs = [ev.epoch for ev in s.events("fit", kind="save")]
        saved_seq = s.get_run("fit").state().last
        saved = s.get_run("fit").load("last")
    probe = Probe()
    resumed = model()
    callback = LedgerCheckpoint(store, "fit", options=POLICY)
    whole = model()
    whole_callback = LedgerCheckpoint(tmp_path / "whole", "fit", options=POLICY)

    trainer(callbacks=[callback, probe]).fit(resumed, data(), ckpt_path="ledger:last")
    trainer(callbacks=[whole_callback]).fit(whole, data())

    assert killed.returncode == -signal.SIGKILL, output
    assert saved_epochs == [1, 2]
    assert_same(probe.optimizer, saved["optimizer_states"][0])
    assert_same(probe.scheduler, saved["lr_schedulers"][0])
    assert (probe.epoch, probe.step) == (2, saved["global_step"]) == (2, 16)
    fit_loop = saved["loops"]["fit_loop"]
    assert probe.batches == fit_loop["epoch_loop.batch_progress"]["total"]["completed"]
    assert probe.steps == 16
    assert_same(resumed.state_dict(), whole.state_dict())
    with Store(store) as s, Store(tmp_path / "whole") as w:
        state, whole_state = s.get_run("fit").state(), w.get_run("fit").state()
        resumes = s.events("fit", kind="resume")
    assert [ev.target for ev in resumes] == [saved_seq]
    assert callback.io is not None and callback.io.resumed is not None
    assert callback.io.resumed.seq == saved_seq
    last, whole_last = last_save(state), last_save(whole_state)
    assert (last.epoch, last.metrics) == (whole_last.epoch, whole_last.metrics)
    assert state.final == state.last
    assert state.best_value == whole_state.best_value


def last_save(state: RunState) -> Any:
    assert state.last is not None
    return state.saves[state.last]


def test_model_checkpoint_top_k_and_last_store_through_the_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ckpts = tmp_path / "store", tmp_path / "ckpts"
    io = LedgerCheckpointIO(store, "mc")
    checkpoint = ModelCheckpoint(
        dirpath=ckpts, monitor="score", mode="min", save_top_k=2, save_last=True
    )
    net = model(scores=(0.5, 0.3, 0.4, 0.2, 0.6))
    fit = trainer(max_epochs=5, callbacks=[checkpoint], plugins=[io])
    removed: list[str] = []
    remove = fit.strategy.remove_checkpoint

    def spy(path: str) -> None:
        removed.append(os.path.normpath(path))
        remove(path)

    monkeypatch.setattr(fit.strategy, "remove_checkpoint", spy)

    fit.fit(net, data())
    best = io.load_checkpoint(checkpoint.best_model_path)
    reopened = LedgerCheckpointIO(store, "mc").load_checkpoint(
        checkpoint.last_model_path
    )

    with Store(store) as s:
        expires = s.events("mc", kind="expire")
        saves = s.events("mc", kind="save")
        # last.ckpt right after a top-k save: only its manifest is new.
        manifest_size = s.blobs.size_of(saves[1].manifest or "")
    by_lightning = [e for e in expires if e.body["reason"].startswith("removed")]
    assert [e.body["reason"].split(": ")[1] for e in by_lightning] == removed
    assert [os.path.basename(p) for p in removed] == [
        "epoch=0-step=8.ckpt",
        "epoch=2-step=24.ckpt",
    ]
    replaced = [e for e in expires if e.body["reason"].startswith("replaced")]
    # save_last writes last.ckpt after each top-k save; epoch 4 made no top-k.
    assert len(saves) == 4 + 4 and len(replaced) == 3
    assert not ckpts.exists()
    assert saves[1].body["bytes_written"] == manifest_size
    assert best["epoch"] == 3
    assert_same(best["state_dict"], net.snapshots[3])
    assert_same(reopened["state_dict"], net.snapshots[3])
    assert saves[-1].metrics == {}
    assert [ev.metrics for ev in saves[:4]] == [
        {"score": 0.5},
        {},
        {"score": pytest.approx(0.3)},
        {},
    ]


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass(frozen=True)
class Schedule:
    warmup: int
    name: str = "cosine"
    seen: int = dataclasses.field(default=0, init=False)


def lightning_like(**hyper: Any) -> dict[str, Any]:
    return {"epoch": 0, "global_step": 3, "hyper_parameters": hyper}


def test_plugin_round_trips_the_types_lightning_checkpoints_hold(
    tmp_path: Path,
) -> None:
    io = LedgerCheckpointIO(tmp_path, "types", types=[Colour, Schedule])
    hyper = {
        "args": argparse.Namespace(lr=0.1, dims=(4, 8)),
        "nested": AttributeDict(a=1, path=pathlib.Path("/data/x")),
        "pure": pathlib.PureWindowsPath("C:/data"),
        "colour": Colour.RED,
        "schedule": Schedule(warmup=5),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
    }

    io.save_checkpoint(lightning_like(**hyper), tmp_path / "a.ckpt")
    loaded = LedgerCheckpointIO(tmp_path, "types", types=[Colour, Schedule])
    back = loaded.load_checkpoint(tmp_path / "a.ckpt")["hyper_parameters"]

    assert back == hyper
    assert [type(back[k]) for k in hyper] == [type(v) for v in hyper.values()]


TEXT = st.text(st.characters(codec="utf-8"), max_size=8).filter(lambda t: t != TAG)
NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    TEXT,
    st.builds(pathlib.PurePosixPath, TEXT),
    st.builds(pathlib.Path, TEXT),
    st.sampled_from([torch.float32, torch.bfloat16, torch.device("cpu")]),
    st.sampled_from(Colour),
    st.builds(Schedule, st.integers(0, 9), TEXT),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(TEXT, inner, max_size=3),
        st.dictionaries(TEXT, inner, max_size=3).map(AttributeDict),
        st.dictionaries(NAMES, inner, max_size=3).map(
            lambda d: argparse.Namespace(**d)
        ),
    ),
    max_leaves=12,
)


def typed(value: Any) -> Any:
    """A value with every container's type spelled out (AttributeDict == dict)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value) | {"<namespace>": True}
    if isinstance(value, dict):
        return (type(value), {k: typed(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value), [typed(v) for v in value])
    return (type(value), value)


@settings(max_examples=60, deadline=None)
@given(VALUES)
def test_tagged_types_round_trip_through_the_codec(value: Any) -> None:
    types = _Types([Colour, Schedule])

    encoded = encode({"v": types.plain(value)})
    root, refs = decode_manifest(encoded.manifest)
    back = types.rebuild(build(root, refs, lambda ref: bytearray()))["v"]

    assert typed(back) == typed(value)


def test_plugin_refuses_unregistered_types_naming_the_path_and_the_way_out(
    tmp_path: Path,
) -> None:
    io = LedgerCheckpointIO(tmp_path, "types")

    with pytest.raises(UnsupportedTypeError, match=r"hyper_parameters\.c.*types="):
        io.save_checkpoint(lightning_like(c=Colour.RED), tmp_path / "a.ckpt")
    with pytest.raises(UnsupportedTypeError, match=r"hyper_parameters\.s.*on_save"):
        io.save_checkpoint(lightning_like(s={1, 2}), tmp_path / "a.ckpt")
    with pytest.raises(UnsupportedTypeError, match="reserved"):
        io.save_checkpoint(lightning_like(x={"__ckpt_ledger__": 1}), tmp_path / "b")
    assert Store(tmp_path).events("types", kind="save") == []


def test_loading_a_type_the_reader_did_not_register_is_refused(tmp_path: Path) -> None:
    LedgerCheckpointIO(tmp_path, "types", types=[Colour]).save_checkpoint(
        lightning_like(c=Colour.RED), tmp_path / "a.ckpt"
    )
    reader = LedgerCheckpointIO(tmp_path, "types")

    with pytest.raises(CheckpointTypeError, match=r"hyper_parameters\.c.*types="):
        reader.load_checkpoint(tmp_path / "a.ckpt")


def test_plugin_without_options_takes_an_existing_run_as_it_was_opened(
    tmp_path: Path,
) -> None:
    options = RunOptions(final_epoch=4, keep_last=3)
    Store(tmp_path).run("r", options=options, config={"lr": 0.1}).store.close()
    io = LedgerCheckpointIO(tmp_path, "r")

    io.save_checkpoint(lightning_like(), tmp_path / "a.ckpt")

    run = Store(tmp_path).get_run("r")
    assert (run.options, run.config) == (options, {"lr": 0.1})
    assert [ev.epoch for ev in run.history("save")] == [1]


def test_callback_refuses_a_trainer_whose_last_epoch_is_not_the_final_one(
    tmp_path: Path,
) -> None:
    callback = LedgerCheckpoint(tmp_path, "ft", options=RunOptions(final_epoch=3))

    with pytest.raises(PolicyError, match="max_epochs=3"):
        trainer(max_epochs=2, callbacks=[callback]).fit(model(), data())


def test_validate_best_loads_the_ledgers_best_without_a_resume_event(
    tmp_path: Path,
) -> None:
    options = RunOptions(best=BestPolicy("score", mode="max"))
    callback = LedgerCheckpoint(tmp_path, "val", options=options)
    net = model(Validated, scores=(0.9, 0.1))
    fit = trainer(max_epochs=2, callbacks=[callback])
    fit.fit(net, data(), data())
    first = model()
    first.load_state_dict(net.snapshots[0])
    x, y = next(iter(DataLoader(data().dataset, batch_size=64)))

    scores = fit.validate(net, data(), ckpt_path="best", verbose=False)

    state = callback.run.state()
    assert callback.best_model_path == f"ledger:#{state.best}"
    assert state.epoch_of(state.best) == 1
    expected = torch.nn.functional.mse_loss(first.net(x), y).item()
    assert scores[0]["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert callback.run.history("resume") == []


def test_example_trains_then_resumes_through_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(__file__).parents[2] / "tools" / "train_lightning.py"
    spec = importlib.util.spec_from_file_location("train_lightning", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--store", str(tmp_path), "--run", "demo", "--epochs", "2"]

    first = example.main(args)
    again = example.main([*args, "--resume", "ledger:last"])

    assert first == again == 0
    with Store(tmp_path) as s:
        kinds = [ev.kind for ev in s.events("demo")]
    assert kinds.count("save") == 2 and kinds.count("final") == 1
    assert kinds[-1] == "resume"
    assert "run demo: last #" in capsys.readouterr().out


def test_ddp_writes_only_on_rank_zero_and_both_ranks_resume_from_one_event(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    common |= {"WORLD_SIZE": "2", "NODE_RANK": "0"}

    ranks = [
        run_script("ddp", str(tmp_path), env={**common, "RANK": r, "LOCAL_RANK": r})
        for r in ("0", "1")
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()

    assert [p.returncode for p in ranks] == [0, 0], outputs
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    with Store(tmp_path / "store") as s:
        events, plugin_events = s.events("ddp"), s.events("ddp-mc")
    writers = {ev.pid for ev in events + plugin_events}
    assert writers == {reports[0]["pid"]} != {reports[1]["pid"]}
    resumes = [ev for ev in events if ev.kind == "resume"]
    assert len(resumes) == 1
    assert reports[0]["resumed"] == reports[1]["resumed"] == resumes[0].target
    assert reports[0]["weights"] == reports[1]["weights"]
    assert [ev.epoch for ev in events if ev.kind == "save"] == [1, 2, 3]
    assert reports[0]["best"] == reports[1]["best"]
    assert reports[0]["callback_best"].startswith("ledger:#")
    assert [ev.kind for ev in plugin_events].count("expire") >= 1


def test_a_save_in_an_epoch_without_validation_carries_no_stale_score(
    tmp_path: Path,
) -> None:
    options = RunOptions(best=BestPolicy("val_loss", mode="min"))
    callback = LedgerCheckpoint(tmp_path, "val", options=options)
    fit = trainer(callbacks=[callback], check_val_every_n_epoch=2)

    with pytest.warns(MetricWarning, match="'val_loss' is missing"):
        fit.fit(model(Validated), data(), data())

    state = callback.run.state()
    saves = callback.run.history("save")
    assert [ev.epoch for ev in saves] == [1, 2, 3, 4]
    assert ["val_loss" in ev.metrics for ev in saves] == [False, True, False, True]
    assert "train_loss" in saves[2].metrics
    promoted = {ev.target for ev in callback.run.history("promote")}
    assert promoted <= {saves[1].seq, saves[3].seq}
    assert state.epoch_of(state.best) in (2, 4)


def test_an_epoch_cut_off_by_max_steps_is_neither_saved_nor_final(
    tmp_path: Path,
) -> None:
    options = RunOptions(final_epoch=3)
    callback = LedgerCheckpoint(tmp_path, "steps", options=options)

    trainer(max_epochs=3, max_steps=20, callbacks=[callback]).fit(model(), data())

    state = callback.run.state()
    assert [ev.epoch for ev in callback.run.history("save")] == [1, 2]
    assert state.final is None


class Noisy(Regressor):
    """Dropout, and draws from numpy and Python's random in every step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8),
            torch.nn.Tanh(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(8, 1),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return scale * super().training_step(batch, batch_idx)


def shuffled() -> DataLoader:
    return DataLoader(data().dataset, batch_size=8, shuffle=True)


def test_resume_restores_random_states_and_ends_like_an_uninterrupted_fit(
    tmp_path: Path,
) -> None:
    whole = model(Noisy)  # seeds torch, numpy and random
    trainer(callbacks=[LedgerCheckpoint(tmp_path / "a", "rng")]).fit(whole, shuffled())
    stopped = model(Noisy)
    trainer(2, callbacks=[LedgerCheckpoint(tmp_path / "b", "rng")]).fit(
        stopped, shuffled()
    )
    resumed = model(Noisy)
    # A fresh process would start from other states than those saved.
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)

    again = LedgerCheckpoint(tmp_path / "b", "rng")
    trainer(callbacks=[again]).fit(resumed, shuffled(), ckpt_path="ledger:last")

    assert_same(resumed.state_dict(), whole.state_dict())
    assert len(again.run.history("resume")) == 1


def test_checkpoint_files_beside_the_callback_load_with_weights_only(
    tmp_path: Path,
) -> None:
    files = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer(2, callbacks=[LedgerCheckpoint(tmp_path, "files"), files]).fit(
        model(), data()
    )

    loaded = torch.load(files.last_model_path, weights_only=True)

    rng = loaded["callbacks"]["LedgerCheckpoint"]["rng"]
    assert isinstance(rng["numpy"]["keys"], list)


def test_a_plugin_save_after_fit_records_the_epochs_completed(
    tmp_path: Path,
) -> None:
    io = LedgerCheckpointIO(tmp_path, "after")
    fit = trainer(max_epochs=2, plugins=[io], enable_checkpointing=False)
    fit.fit(model(), data())

    fit.save_checkpoint(tmp_path / "after.ckpt")

    with Store(tmp_path) as s:
        assert [ev.epoch for ev in s.events("after", kind="save")] == [2]


def test_fast_dev_run_leaves_the_run_alone(tmp_path: Path) -> None:
    callback = LedgerCheckpoint(tmp_path, "dev", options=POLICY)

    trainer(callbacks=[callback], fast_dev_run=True).fit(model(), data())

    with Store(tmp_path) as s:
        assert "dev" not in s.runs()


def test_best_model_path_after_ddp_fit_is_read_without_a_collective(
    tmp_path: Path,
) -> None:
    # A rank 0 alone, in a process group of one: a collective open would hang
    # with two ranks, and with one it would show as a store reopened for it.
    callback = LedgerCheckpoint(tmp_path, "alone", options=POLICY)
    trainer(callbacks=[callback]).fit(model(), data())
    assert callback._handle._run is None

    path = callback.best_model_path

    assert callback._handle._run is None
    assert path == f"ledger:#{callback.run.state().best}"


@dataclasses.dataclass
class Scaled:
    lr: float
    calls: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        self.lr *= 10
        self.calls += 1


class Carrying(Regressor):
    """Puts `extra` into its checkpoints and keeps what it loads back."""

    extra: dict[str, Any] = {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["extra"] = self.extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded = checkpoint["extra"]


def test_dataclasses_come_back_as_saved_without_rerunning_post_init(
    tmp_path: Path,
) -> None:
    schedule = Schedule(warmup=2)
    object.__setattr__(schedule, "seen", 9)
    net = model(Carrying)
    net.extra = {"scaled": Scaled(0.1), "schedule": schedule}
    types = [Scaled, Schedule]
    trainer(1, callbacks=[LedgerCheckpoint(tmp_path, "dc", types=types)]).fit(
        net, data()
    )
    back = model(Carrying)

    callback = LedgerCheckpoint(tmp_path, "dc", types=types)
    trainer(2, callbacks=[callback]).fit(back, data(), ckpt_path="ledger:last")

    assert back.loaded == net.extra
    assert (back.loaded["scaled"].lr, back.loaded["scaled"].calls) == (1.0, 1)
    assert back.loaded["schedule"].seen == 9


def test_a_resume_that_cannot_rebuild_the_checkpoint_records_no_resume(
    tmp_path: Path,
) -> None:
    net = model(Carrying)
    net.extra = {"colour": Colour.RED}
    trainer(1, callbacks=[LedgerCheckpoint(tmp_path, "t", types=[Colour])]).fit(
        net, data()
    )
    callback = LedgerCheckpoint(tmp_path, "t")

    with pytest.raises(CheckpointTypeError, match="types="):
        trainer(2, callbacks=[callback]).fit(
            model(Carrying), data(), ckpt_path="ledger:last"
        )

    assert callback.run.history("resume") == []


def test_model_checkpoint_save_last_link_over_the_plugin_is_refused(
    tmp_path: Path,
) -> None:
    io = LedgerCheckpointIO(tmp_path, "link")
    link = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last="link")
    callback = LedgerCheckpoint(tmp_path, "link")
    fit = trainer(callbacks=[callback, link], plugins=[io])

    with pytest.raises(PolicyError, match="save_last=True"):
        fit.fit(model(), data())

    with Store(tmp_path) as s:
        assert "link" not in s.runs()


class KillAt(pl.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, b: Any, i: int
    ) -> None:
        if (trainer.current_epoch, i) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class Report(pl.Callback):
    """Notes, once the trainer restored its states, what this rank resumed."""

    def __init__(self, callback: LedgerCheckpoint) -> None:
        self.callback = callback
        self.report: dict[str, Any] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        io = self.callback.io
        self.report["resumed"] = io.resumed.seq if io and io.resumed else None
        weights = pl_module.state_dict().values()
        self.report["weights"] = [v.sum().item() for v in weights]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["killed-fit", "ddp"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--kill-epoch", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "killed-fit":
        callbacks = [LedgerCheckpoint(args.dir, "fit", options=POLICY)]
        killer = KillAt(args.kill_epoch, 3)
        trainer(callbacks=[*callbacks, killer]).fit(model(), data())
        return
    store, rank = args.dir / "store", int(os.environ["RANK"])
    ddp = {"strategy": "ddp", "devices": 2}
    options = RunOptions(best=BestPolicy("train_loss", mode="min"))

    # The callback: fit 2 epochs, then a new Trainer resumes and fits a third.
    first = LedgerCheckpoint(store, "ddp", options=options)
    trainer(2, callbacks=[first], **ddp).fit(model(), data())
    second = LedgerCheckpoint(store, "ddp", options=options)
    report = Report(second)
    again = trainer(3, callbacks=[second, report], **ddp)
    again.fit(model(), data(), ckpt_path="ledger:last")
    if rank == 0:  # a property read on one rank alone must not wait for others
        report.report["callback_best"] = second.best_model_path

    # The plugin: rank 0 alone saves and removes, then every rank loads best.
    top = ModelCheckpoint(args.dir / "ckpts", monitor="train_loss", save_top_k=1)
    plugin = LedgerCheckpointIO(store, "ddp-mc")
    third = trainer(3, callbacks=[top], plugins=[plugin], **ddp)
    third.fit(model(Validated), data(), data())
    third.validate(ckpt_path=top.best_model_path, dataloaders=data(), verbose=False)
    report.report |= {"pid": os.getpid(), "best": top.best_model_path}
    (args.dir / f"rank{rank}.json").write_text(json.dumps(report.report))


if __name__ == "__main__":
    main(sys.argv[1:])
