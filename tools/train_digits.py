"""Train a digits encoder in two stages through the ledger: the project's main job.

Contrastive pre-training lets the ledger promote the best epoch by RankMe;
fine-tuning freezes that encoder and trains a linear head, its last epoch final.
Each epoch's draws depend on the seed and the epoch alone, so a killed run resumes
from its last save and ends bit-identical to an uninterrupted one; the price is
a single compute thread.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from torch import nn

import ledger
from cas import CasError, hash_bytes

console = Console(highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Recipe:
    """The hyper-parameters of both stages, recorded in the runs' configs.

    Attributes:
        seed: seeds the data split, the initial weights and every epoch's draws.
        pretrain_epochs: epochs of self-supervised pre-training.
        warmup_epochs: pre-training epochs that can not be promoted to best.
        finetune_epochs: epochs of linear-head training; the last is final.
        batch_size: images per pre-training step.
        finetune_batch_size: images per fine-tuning step.
        hidden_dim: width of the encoder's two hidden layers.
        embedding_dim: width of the encoder's output (RankMe is at most this).
        temperature: NT-Xent softmax temperature.
        pretrain_lr: Adam learning rate of the encoder and projector.
        finetune_lr: Adam learning rate of the linear head.
    """

    seed: int = 0
    pretrain_epochs: int = 30
    warmup_epochs: int = 5
    finetune_epochs: int = 5
    batch_size: int = 128
    finetune_batch_size: int = 64
    hidden_dim: int = 256
    embedding_dim: int = 128
    temperature: float = 0.2
    pretrain_lr: float = 1e-3
    finetune_lr: float = 5e-2


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split by the seed."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data(seed: int, held_out: int = 360) -> Digits:
    """The digits split into train, validation and test (`held_out` each)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, val, train = (
        order[:held_out],
        order[held_out : 2 * held_out],
        order[2 * held_out :],
    )
    return Digits(x[train], y[train], x[val], y[val], x[test], y[test])


def build_encoder(recipe: Recipe) -> nn.Sequential:
    hidden = recipe.hidden_dim
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, recipe.embedding_dim),
    )


def build_projector(recipe: Recipe) -> nn.Sequential:
    dim = recipe.embedding_dim
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def epoch_generator(recipe: Recipe, stage: int, epoch: int) -> torch.Generator:
    """The only source of randomness of one epoch: a function of seed and epoch."""
    return torch.Generator().manual_seed(recipe.seed * 100_000 + stage * 10_000 + epoch)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random view of flat 8x8 images: shift by up to one pixel, drop 15% of
    the pixels, add Gaussian noise."""
    n = x.shape[0]
    padded = F.pad(x.view(n, 8, 8), (1, 1, 1, 1))
    rows = torch.randint(0, 3, (n, 1), generator=g) + torch.arange(8)
    cols = torch.randint(0, 3, (n, 1), generator=g) + torch.arange(8)
    shifted = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    keep = torch.rand(n, 64, generator=g) >= 0.15
    noise = 0.1 * torch.randn(n, 64, generator=g)
    return shifted.reshape(n, 64) * keep + noise


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The contrastive loss: each view must pick its twin among all 2n views."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / temperature).masked_fill(
        torch.eye(2 * n, dtype=torch.bool), float("-inf")
    )
    twins = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, twins)


def rng_states() -> dict[str, Any]:
    """The global generators of torch, numpy and Python, for the checkpoint.

    numpy's state is kept as a tensor and plain numbers, not as numpy arrays,
    so that an exported .pt of the checkpoint loads with plain `torch.load`.
    """
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            **numpy_state,
            "state": {
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                "pos": numpy_state["state"]["pos"],
            },
        },
        "python": random.getstate(),
    }


def seed_rng_states(seed: int) -> None:
    """Seed the global generators of torch, numpy and Python alike, so the
    states saved in every checkpoint depend on the seed alone."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def restore_rng_states(states: dict[str, Any]) -> None:
    numpy_state = states["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["state"]["key"].numpy().astype(np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    # Otherwise numpy's legacy tuple, as checkpoints before the tensor form held.
    torch.set_rng_state(states["torch"])
    np.random.set_state(numpy_state)
    random.setstate(states["python"])


def pretrain(
    store: ledger.Store, name: str, recipe: Recipe, data: Digits
) -> ledger.Run:
    """Stage 1: contrastive pre-training, RankMe of held-out embeddings watched."""
    best = ledger.BestPolicy("rankme", "max", warmup_epochs=recipe.warmup_epochs)
    run = store.run(
        name,
        config={"stage": "pretrain", "dataset": "sklearn-digits", **asdict(recipe)},
        options=ledger.RunOptions(
            best=best, final_epoch=recipe.pretrain_epochs, stage="pretrain"
        ),
        seed=recipe.seed,
    )
    if run.state().final is not None:
        console.print(f"{name}: finished earlier; nothing to train")
        return run

    seed_rng_states(recipe.seed)
    encoder, projector = build_encoder(recipe), build_projector(recipe)
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.Adam(params, lr=recipe.pretrain_lr)
    first = _resume(
        run, recipe, {"encoder": encoder, "projector": projector}, optimizer
    )

    for epoch in range(first, recipe.pretrain_epochs + 1):
        loss = _pretrain_epoch(encoder, projector, optimizer, data, recipe, epoch)
        with torch.no_grad():
            score = ledger.rankme(encoder(data.val_x))
        checkpoint = {
            "model": {
                "encoder": encoder.state_dict(),
                "projector": projector.state_dict(),
            },
            "optimizer": optimizer.state_dict(),
            "rng": rng_states(),
        }
        saved = run.save(
            checkpoint, epoch=epoch, metrics={"loss": loss, "rankme": score}
        )
        promoted = "  new best" if saved is not None and saved.promoted else ""
        console.print(
            f"pretrain  epoch {epoch:3d}/{recipe.pretrain_epochs}  loss {loss:.4f}  "
            f"rankme {score:6.2f}{promoted}"
        )
    run.finalize()
    return run


def _pretrain_epoch(
    encoder: nn.Module,
    projector: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Digits,
    recipe: Recipe,
    epoch: int,
) -> float:
    g = epoch_generator(recipe, 1, epoch)
    n = len(data.train_x)
    order = torch.randperm(n, generator=g)
    total = 0.0
    for start in range(0, n, recipe.batch_size):
        batch = data.train_x[order[start : start + recipe.batch_size]]
        view1, view2 = augment(batch, g), augment(batch, g)
        z1, z2 = projector(encoder(view1)), projector(encoder(view2))
        loss = nt_xent(z1, z2, recipe.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / n


def finetune(
    store: ledger.Store,
    name: str,
    pretrained: ledger.Run,
    recipe: Recipe,
    data: Digits,
) -> ledger.Run:
    """Stage 2: the pre-training's best encoder frozen, a linear head trained."""
    best = pretrained.resolve("best")
    config = {
        "stage": "finetune",
        "dataset": "sklearn-digits",
        "pretrain_run": pretrained.name,
        "pretrain_best_save": best.seq,
        "pretrain_best_epoch": best.epoch,
        "pretrain_best_manifest": best.manifest,
        "selection": "final epoch",
        **asdict(recipe),
    }
    run = store.run(
        name,
        config=config,
        options=ledger.RunOptions(final_epoch=recipe.finetune_epochs, stage="finetune"),
        seed=recipe.seed,
    )
    if run.state().final is not None:
        console.print(f"{name}: finished earlier; nothing to train")
        return run

    seed_rng_states(recipe.seed)
    encoder, head = build_encoder(recipe), nn.Linear(recipe.embedding_dim, 10)
    optimizer = torch.optim.Adam(head.parameters(), lr=recipe.finetune_lr)
    first = _resume(run, recipe, {"encoder": encoder, "head": head}, optimizer)
    if first == 1:
        encoder.load_state_dict(pretrained.load(best.seq)["model"]["encoder"])
        console.print(
            f"{name}: encoder from {pretrained.name} save #{best.seq} "
            f"(best, epoch {best.epoch}, rankme {best.metrics['rankme']:.2f})"
        )
    encoder.requires_grad_(False)
    with torch.no_grad():
        train_features, val_features = encoder(data.train_x), encoder(data.val_x)

    for epoch in range(first, recipe.finetune_epochs + 1):
        g = epoch_generator(recipe, 2, epoch)
        n = len(train_features)
        order = torch.randperm(n, generator=g)
        total = 0.0
        for start in range(0, n, recipe.finetune_batch_size):
            idx = order[start : start + recipe.finetune_batch_size]
            loss = F.cross_entropy(head(train_features[idx]), data.train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        with torch.no_grad():
            val_acc = accuracy(head(val_features), data.val_y)
        checkpoint = {
            "model": {"encoder": encoder.state_dict(), "head": head.state_dict()},
            "optimizer": optimizer.state_dict(),
            "rng": rng_states(),
        }
        run.save(
            checkpoint, epoch=epoch, metrics={"loss": total / n, "val_acc": val_acc}
        )
        console.print(
            f"finetune  epoch {epoch:3d}/{recipe.finetune_epochs}  "
            f"loss {total / n:.4f}  val_acc {val_acc:.4f}"
        )
    run.finalize()
    return run


def _resume(
    run: ledger.Run,
    recipe: Recipe,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
) -> int:
    """Restore the newest save if there is one; return the first epoch to train."""
    resumed = run.resume("auto", seed=recipe.seed)
    if resumed is None:
        return 1
    for key, module in modules.items():
        module.load_state_dict(resumed.state["model"][key])
    optimizer.load_state_dict(resumed.state["optimizer"])
    restore_rng_states(resumed.state["rng"])
    console.print(
        f"{run.name}: resumed from save #{resumed.seq} (epoch {resumed.epoch}); "
        f"resume event #{resumed.resume_event}"
    )
    return (resumed.epoch or 0) + 1


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def accuracy_on_test_split(run: ledger.Run, recipe: Recipe, data: Digits) -> float:
    """Accuracy on the test split of the run's final checkpoint, read back."""
    model = run.load("final")["model"]
    encoder, head = build_encoder(recipe), nn.Linear(recipe.embedding_dim, 10)
    encoder.load_state_dict(model["encoder"])
    head.load_state_dict(model["head"])
    with torch.no_grad():
        return accuracy(head(encoder(data.test_x)), data.test_y)


def history_table(run: ledger.Run) -> Table:
    """The run's events, one row each, in the columns of `ckpt log`."""
    table = Table(
        title=f"history of {run.name}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("seq", "time (UTC)", "kind", "epoch", "metrics", "manifest"):
        table.add_column(column, no_wrap=True)
    table.add_column("target")
    for ev in run.history():
        if ev.kind == "save":
            shown = " ".join(f"{k}={v:.4g}" for k, v in ev.metrics.items())
        elif ev.kind == "promote":
            shown = f"{ev.metric}={ev.value:.4g}"
        else:
            shown = ""
        target = "" if ev.target is None else f"#{ev.target}"
        if ev.kind == "resume":
            target = f"from {target}"
        table.add_row(
            str(ev.seq),
            ev.time[11:19],
            ev.kind,
            "" if ev.epoch is None else f"e{ev.epoch}",
            shown,
            (ev.manifest or "")[:8],
            target,
        )
    return table


def encoder_sharing(store: ledger.Store, run: ledger.Run) -> tuple[int, int, int]:
    """Tensors and bytes of the final encoder, and how many saves reference them."""
    encoder = run.load("final")["model"]["encoder"]
    digests = {hash_bytes(_tensor_bytes(t)): t.nbytes for t in encoder.values()}
    marks = ", ".join("?" for _ in digests)
    rows = store.db.rows(
        "SELECT COUNT(DISTINCT e.seq) AS saves FROM refs r "
        "JOIN events e ON e.seq = r.seq "
        f"WHERE e.run = ? AND e.kind = 'save' AND r.digest IN ({marks}) "
        "GROUP BY r.digest",
        [run.name, *digests],
    )
    saves = min((row["saves"] for row in rows), default=0)
    return len(digests), sum(digests.values()), saves


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def report(
    store: ledger.Store,
    pretrained: ledger.Run,
    tuned: ledger.Run,
    recipe: Recipe,
    data: Digits,
) -> None:
    """Print both histories, the best and final checkpoints, the test accuracy
    and what the store holds."""
    for run in (pretrained, tuned):
        console.print(history_table(run))
    best = pretrained.resolve("best")
    console.print(
        f"best pre-training checkpoint: save #{best.seq}, epoch {best.epoch}, "
        f"rankme {best.metrics['rankme']:.4f} (promoted by strict improvement "
        f"after {recipe.warmup_epochs} warm-up epochs)"
    )
    final = tuned.resolve("final")
    console.print(
        f"final fine-tuning checkpoint: save #{final.seq}, epoch {final.epoch}, "
        f"manifest {final.manifest[:16]}"
    )
    score = accuracy_on_test_split(tuned, recipe, data)
    console.print(f"test accuracy: {score:.4f} (chance 0.10)")

    tensors, nbytes, saves = encoder_sharing(store, tuned)
    console.print(
        f"frozen encoder: {tensors} tensors, {_size(nbytes)}, in {saves} "
        f"fine-tuning saves, stored once"
    )
    usage = store.usage()
    console.print(
        f"store {store.path}: {usage.saves} saves, {_size(usage.logical_bytes)} "
        f"logical, {_size(usage.physical_bytes)} physical in {usage.blobs} blobs "
        f"(dedup {usage.dedup_ratio:.2f}x)"
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _seed(text: str) -> int:
    # numpy seeds only take 0 .. 2**32 - 1; check before anything is written.
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= seed <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{seed} is not in 0 .. {2**32 - 1}")
    return seed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pre-train a digits encoder (contrastive, best by RankMe), then "
        "fine-tune a linear head on it, every epoch saved through the ledger. Run "
        "the same command again after an interruption to resume.",
    )
    parser.add_argument(
        "--store", default=None, help="store directory (default $CKPT_STORE or .ckpt)"
    )
    parser.add_argument(
        "--seed", type=_seed, default=Recipe.seed, help="0 .. 2**32-1 (default 0)"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=Recipe.pretrain_epochs)
    parser.add_argument("--warmup-epochs", type=int, default=Recipe.warmup_epochs)
    parser.add_argument(
        "--run-prefix",
        default="digits",
        help="runs are PREFIX-pretrain and PREFIX-finetune (default digits)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_epochs < args.pretrain_epochs:
        parser.error(
            f"--warmup-epochs ({args.warmup_epochs}) must be at least 0 and less "
            f"than --pretrain-epochs ({args.pretrain_epochs})"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # One thread: the reductions then run in one fixed order, so a resumed run
    # is bit-identical to an uninterrupted one.
    torch.set_num_threads(1)
    recipe = Recipe(
        seed=args.seed,
        pretrain_epochs=args.pretrain_epochs,
        warmup_epochs=args.warmup_epochs,
    )
    try:
        data = load_data(recipe.seed)
        with ledger.Store(args.store) as store:
            pretrained = pretrain(store, f"{args.run_prefix}-pretrain", recipe, data)
            tuned = finetune(
                store, f"{args.run_prefix}-finetune", pretrained, recipe, data
            )
            report(store, pretrained, tuned, recipe, data)
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to resume from the last save",
            file=sys.stderr,
        )
        return 130
    except ledger.ConfigMismatchError as exc:
        print(
            f"error: {exc.args[0].split(';')[0]}: use another --run-prefix or --store",
            file=sys.stderr,
        )
        return 2
    except (ledger.LedgerError, CasError, OSError) as exc:
        # A full disk, a damaged checkpoint, a store that cannot be opened.
        print(
            f"error: {' '.join(str(exc).split()) or type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
