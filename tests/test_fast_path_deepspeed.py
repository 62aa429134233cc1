"""The fast-path training step runs under DeepSpeed ZeRO-2: two CPU ranks over gloo (torchrun)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fast_path_step_under_deepspeed_zero2(tmp_path):
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(HERE.parent / ".build/torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TMPDIR": str(tmp_path),  # torchelastic's scratch folders land here and go with tmp_path
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(HERE / "_ds_fast_path_worker.py")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["zero_stage"] == 2 and r["optimizer"] == "AdamW" and r["fused"], r
        assert r["backend"] == "torch" and r["checkpointing"], r  # "auto" on CPU resolves to torch
        assert all(0 < loss < 10 for loss in r["losses"]), r
        assert r["changed"] > 0 and r["ranks_agree"], r
    assert results[0]["losses"][0] != results[1]["losses"][0], "ranks should see different data"
