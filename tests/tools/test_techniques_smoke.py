"""Smoke run of tools/techniques.py at a tiny size: every on/off pair runs,
and each switched-off technique is switched back on afterwards."""

import importlib.util
import json
import sys
from pathlib import Path

import ledger._blobio as blobio
import ledger._codec as codec

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load_techniques():
    sys.path.insert(0, str(TOOLS))  # it imports the workload from bench.py
    try:
        spec = importlib.util.spec_from_file_location(
            "ckpt_techniques", TOOLS / "techniques.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module


def test_a_tiny_techniques_run_measures_each_pair_and_restores_the_code(tmp_path):
    techniques = _load_techniques()
    pooled_min, buffer = codec._POOLED_MIN, blobio.tensor_buffer
    out = tmp_path / "techniques.json"
    argv = ["--sizes", "4M", "--reps", "1", "--cold-pause", "0"]
    argv += ["--dir", str(tmp_path), "--json", str(out)]

    techniques.main(argv)

    rows = json.loads(out.read_text())
    ops = {r["op"] for r in rows}
    assert {"save fresh: pooled hashing", "save fresh: one thread"} <= ops
    assert {"load: unfilled buffers", "load: zero-filled buffers"} <= ops
    assert all(r["median_s"] > 0 for r in rows)
    unchanged = [r for r in rows if r["op"].startswith("save unchanged")]
    assert unchanged and all(r["bytes_written"] == 0 for r in unchanged)
    assert codec._POOLED_MIN == pooled_min and blobio.tensor_buffer is buffer
