"""Train a tiny Lightning model through the ledger, and resume it from there.

One `LedgerCheckpoint` on the Trainer saves every epoch (the full trainer
state), lets the ledger promote the lowest validation loss, and records the
last epoch as final; `--resume ledger:last` picks up where a killed run
stopped. A toy regression keeps it to seconds on a CPU.

    python tools/train_lightning.py [--store PATH] [--run NAME] [--epochs N]
        [--resume ledger:last|ledger:best|ledger:#12]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import ledger
from ledger.lightning import LedgerCheckpoint


class Regressor(pl.LightningModule):
    """A two-layer MLP fitted to a noisy linear target."""

    def __init__(self, lr: float = 0.02, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def loaders(seed: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(512, 1, generator=gen)
    train = TensorDataset(x[:448], y[:448])
    val = TensorDataset(x[448:], y[448:])
    return DataLoader(train, batch_size=32), DataLoader(val, batch_size=64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store (default $CKPT_STORE)")
    parser.add_argument("--run", default="lightning-demo")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", default=None, help="e.g. ledger:last")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    store = ledger.Store(args.store)
    options = ledger.RunOptions(
        best=ledger.BestPolicy("val_loss", mode="min"), final_epoch=args.epochs
    )
    callback = LedgerCheckpoint(
        store, args.run, options=options, config={"seed": args.seed}
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = loaders(args.seed)
    trainer.fit(Regressor(), train, val, ckpt_path=args.resume)

    state = callback.run.state()
    best = "none" if state.best is None else f"#{state.best} ({state.best_value:.4g})"
    print(
        f"run {args.run}: last #{state.last} (epoch {state.epoch_of(state.last)}), "
        f"best {best}, final #{state.final}; store {store.path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
