"""ZeRO-0 on one rank skips DeepSpeed's gradient all-reduce: same gradients bit for bit, fewer bytes written."""

import json
import os
import subprocess
import sys

from fastmae.train import launch_local as L

HERE = os.path.dirname(os.path.abspath(__file__))


def test_single_rank_zero0_skips_the_identity_allreduce(tmp_path):
    env = {**L.child_env(str(tmp_path)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(L.free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_single_rank_allreduce_worker.py"), str(tmp_path / "o")],
                          env=env, cwd=L.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["allreduce_on"] is False  # what build_engine set for one rank
    assert r["equal"] and r["grad_tensors"] > 50  # DeepSpeed's one-rank reduction changes no gradient
    # its flatten into one buffer + copy back: two copies of every gradient written
    assert r["bytes_True"] - r["bytes_False"] >= 2 * r["grad_bytes"], r
