"""Smoke run of tools/bench.py at a tiny size: it runs end to end and writes
the JSON it prints. Speed itself is never asserted here, only by the benchmark."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench.py"
SAVES = {
    "torch.save+fsync",
    "safetensors save+fsync",
    "ckpt save (fresh)",
    "ckpt save (unchanged)",
    "raw write+fsync",
    "O_DIRECT write+fsync",
}
LOADS = {"torch.load(weights_only)", "safetensors load", "ckpt load (verified)"}


def _load_bench():
    spec = importlib.util.spec_from_file_location("ckpt_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ckpt_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_a_tiny_bench_run_writes_every_operation_and_target_as_json(tmp_path):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    argv = ["--sizes", "1M", "--reps", "1", "--cold-pause", "0", "--appends", "3"]
    argv += ["--ledger-events", "200", "--dir", str(tmp_path), "--json", str(out)]

    bench.main(argv)

    doc = json.loads(out.read_text())
    rows = doc["results"]
    for regime in ("warm", "cold"):
        ops = {r["op"] for r in rows if r["regime"] == regime}
        assert SAVES | LOADS <= ops
        assert {"torch.save+fsync x10", "ckpt save x10"} <= ops
    assert all(r["reps"] == 1 and r["median_s"] > 0 for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["op"] == "torch.save+fsync")
    unchanged = [r for r in rows if r["op"] == "ckpt save (unchanged)"]
    assert all(r["bytes_written"] == 0 for r in unchanged)
    history = doc["ledger"]["history"]
    assert history["events"] >= 190
    assert history["gc_removed"] > 0
    assert doc["targets"]
    assert all(isinstance(t["met"], bool) for t in doc["targets"])
    assert list(tmp_path.iterdir()) == [out]
