"""Run the trainer in child processes on this machine (torchrun over gloo), for the tests and the soak
benchmark: one node with N ranks, or a simulated multi-node job (one torchrun per "node", all on
127.0.0.1). Also reads a run's step log back."""

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(ROOT, "fastmae", "pretrain.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(tmp_dir: str | None = None) -> dict:
    """CPU, quiet, one thread per rank; torchrun's scratch files go under tmp_dir (cleaned with it)."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    if tmp_dir:
        env["TMPDIR"] = tmp_dir
    return env


def torchrun_cmd(args: list[str], nproc: int, *, nnodes: int = 1, node_rank: int = 0,
                 port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
           "--max_restarts=0", "--monitor_interval=0.2", PRETRAIN]
    return cmd + list(args)


def start(args: list[str], nproc: int = 1, *, tmp_dir: str | None = None, log_path: str | None = None,
          nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> subprocess.Popen:
    """Starts a run; a single process without torchrun when nproc == nnodes == 1."""
    if nproc == 1 and nnodes == 1:
        cmd = [sys.executable, PRETRAIN, *args]
    else:
        cmd = torchrun_cmd(args, nproc, nnodes=nnodes, node_rank=node_rank, port=port)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(tmp_dir), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run(args: list[str], nproc: int = 1, *, tmp_dir: str | None = None, timeout: float = 600,
        **kw) -> tuple[int, str]:
    """Runs to completion; returns (exit code, combined output)."""
    log_path = os.path.join(tmp_dir or "/tmp", f"run-{time.time_ns()}.log")
    proc = start(args, nproc, tmp_dir=tmp_dir, log_path=log_path, **kw)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise
    with open(log_path, errors="replace") as f:
        return code, f.read()


def read_steps(output_dir: str) -> dict[int, dict]:
    """{step: record} from train_steps.jsonl; a step logged twice (re-run after a resume) keeps the last."""
    path = os.path.join(output_dir, "train_steps.jsonl")
    steps: dict[int, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by SIGKILL
                        continue
                    steps[rec["step"]] = rec
    return steps


def worker_pids(launcher_pid: int) -> list[int]:
    """The trainer processes under a torchrun launcher (its children), oldest first."""
    import psutil

    try:
        kids = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in sorted(kids, key=lambda p: p.create_time()) if "pretrain.py" in " ".join(_cmdline(p))]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - the process may be gone
        return []
