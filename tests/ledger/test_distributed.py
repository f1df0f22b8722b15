"""Shared case C09: two real gloo ranks on CPU train, save and load `best`.

Each rank is its own Python process running the worker below, joined by
`init_method=tcp://127.0.0.1:<free port>`; real processes rather than threads,
because what is tested is which process writes the ledger and when.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ledger import Store

_WORKER = """
import json, os, sys
import numpy as np
import torch
import torch.distributed as dist
from ledger import BestPolicy, RunOptions, Store

rank, port, store_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
)
torch.manual_seed(rank)  # different weights per rank: only rank 0's are saved
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(16, 4), torch.randn(16, 2)
store = Store(store_path)
run = store.run(
    "c09", config={"lr": 0.1}, options=RunOptions(best=BestPolicy("score"))
)
report = {"pid": os.getpid(), "saves": []}
for epoch, score in [(1, 0.1), (2, 0.2)]:
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    result = run.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        epoch=epoch,
        metrics={"score": score},
    )
    # Read right after the save returns: rank 0's event must already be there.
    committed = [ev.epoch for ev in store.events("c09", kind="save")]
    report["saves"].append(
        {"seq": None if result is None else result.seq, "committed": committed}
    )
best = run.load("best")["model"]
np.savez(f"{out}/loaded{rank}.npz", **{k: v.numpy() for k, v in best.items()})
own = {k: v.detach().numpy() for k, v in model.state_dict().items()}
np.savez(f"{out}/own{rank}.npz", **own)
with open(f"{out}/report{rank}.json", "w") as f:
    json.dump(report, f)
store.close()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _arrays(path: Path) -> dict[str, Any]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_c09_only_rank_zero_writes_and_both_ranks_load_the_same_best(
    tmp_path: Path,
) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER))
    store_path, port = tmp_path / "store", str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(rank),
                port,
                str(store_path),
                str(tmp_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]

    outputs = [p.communicate(timeout=300)[0] for p in procs]

    assert [p.returncode for p in procs] == [0, 0], outputs
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in (0, 1)]
    assert all(s["seq"] is not None for s in reports[0]["saves"])
    assert [s["seq"] for s in reports[1]["saves"]] == [None, None]
    for report in reports:
        assert [s["committed"] for s in report["saves"]] == [[1], [1, 2]]
    with Store(store_path) as store:
        events = store.events()
        assert {ev.pid for ev in events} == {reports[0]["pid"]}
        assert [ev.kind for ev in events] == [
            "open",
            "save",
            "promote",
            "save",
            "promote",
        ]
        best = store.get_run("c09").state().best
        assert best == reports[0]["saves"][1]["seq"]
    loaded = [_arrays(tmp_path / f"loaded{r}.npz") for r in (0, 1)]
    own = [_arrays(tmp_path / f"own{r}.npz") for r in (0, 1)]
    assert loaded[0].keys() == loaded[1].keys() == own[0].keys()
    for name in own[0]:
        assert np.array_equal(loaded[0][name], loaded[1][name])
        assert np.array_equal(loaded[1][name], own[0][name])
    assert not all(np.array_equal(own[0][k], own[1][k]) for k in own[0])
