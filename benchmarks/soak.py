"""Fault soak: CPU pretraining on 2 ranks (torchrun, gloo, ZeRO-2, fp32), SIGKILL one rank at random
steps K times, resume with `--resume auto` each time, then check

  - every checkpoint left on disk is readable (each .pt loads, COMPLETE parses),
  - the final loss trajectory equals an uninterrupted run's at every logged step (rel 1e-6).

Prints kills / resumes / unreadable checkpoints / mismatched steps and writes a JSON + Markdown summary.

    python benchmarks/soak.py --kills 20 --out benchmarks/results   # the committed run
    python benchmarks/soak.py --kills 3 --steps 24                     # the CI version (tests/test_reliability_soak.py)
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastmae.train import checkpoint as ckpt  # noqa: E402
from fastmae.train import launch_local as L  # noqa: E402

REL_TOL = 1e-6


def train_args(out: str, steps: int, save_every: int) -> list[str]:
    # 64 images / 2 ranks / batch 8 = 4 batches per epoch: the run crosses many epoch boundaries
    return ["--num_images", "64", "--epochs", str(max(2, steps // 4 + 1)), "--warmup_epochs", "1",
            "--batch_size", "8", "--zero_stage", "2", "--precision", "fp32", "--loader", "torchvision",
            "--num_workers", "0", "--log_every", "1", "--max_steps", str(steps), "--save_every_steps",
            str(save_every), "--keep_last", "3", "--output_dir", out]


def readable(path: str) -> bool:
    """A complete checkpoint whose every file loads."""
    try:
        with open(os.path.join(path, ckpt.COMPLETE)) as f:
            json.load(f)
        for name in os.listdir(path):
            if name.endswith(".pt"):
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
        return True
    except Exception:  # noqa: BLE001 - any failure to read is what we count
        return False


def check_disk(out: str) -> tuple[int, int]:
    """(complete checkpoints on disk, unreadable ones among them)."""
    found = ckpt.complete_checkpoints(ckpt.root_dir(out))
    return len(found), sum(not readable(p) for _, p in found)


def kill_one_run(out: str, args: list[str], rng: random.Random, tmp: str, log: str, step_sleep: float) -> dict:
    """Starts (resuming), waits for a random step one to two checkpoint periods past the newest
    checkpoint (so every run makes progress), then SIGKILLs one random rank anywhere within that step."""
    found = ckpt.complete_checkpoints(ckpt.root_dir(out))
    base = found[-1][0] if found else 0
    save_every = int(args[args.index("--save_every_steps") + 1])
    target = base + save_every + rng.randint(1, save_every)  # past the next checkpoint step
    proc = L.start([*args, "--resume", "auto", "--fault_step_sleep", str(step_sleep)], 2, tmp_dir=tmp, log_path=log)
    t0 = time.time()
    while proc.poll() is None and max(L.read_steps(out), default=0) < target and time.time() - t0 < 600:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, step_sleep * 2))  # land anywhere in a step, a checkpoint write included
    victim = None
    if proc.poll() is None:
        workers = L.worker_pids(proc.pid)
        if workers:
            victim = rng.randrange(len(workers))
            try:
                os.kill(workers[victim], signal.SIGKILL)
            except ProcessLookupError:
                victim = None
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"target_step": target, "reached": max(L.read_steps(out), default=0), "killed_rank": victim,
            "exit_code": proc.returncode, "checkpoint_before": base}


def soak(kills: int, steps: int, save_every: int, seed: int, work: str, step_sleep: float = 0.15) -> dict:
    rng = random.Random(seed)
    tmp = os.path.join(work, "tmp")
    os.makedirs(tmp, exist_ok=True)
    t_start = time.time()
    ref_out = os.path.join(work, "reference")
    code, log = L.run(train_args(ref_out, steps, save_every), 2, tmp_dir=tmp)
    if code != 0:
        raise RuntimeError(f"reference run failed ({code}):\n{log[-3000:]}")
    reference = L.read_steps(ref_out)
    out = os.path.join(work, "soak")
    args = train_args(out, steps, save_every)
    events, unreadable_seen, kills_done = [], 0, 0
    for i in range(kills):
        ev = kill_one_run(out, args, rng, tmp, os.path.join(work, f"run{i:02d}.log"), step_sleep)
        n, bad = check_disk(out)
        ev.update(checkpoints_on_disk=n, unreadable=bad)
        unreadable_seen += bad
        kills_done += ev["killed_rank"] is not None
        events.append(ev)
        print(f"[soak] run {i + 1}/{kills}: killed rank {ev['killed_rank']} at step ~{ev['reached']} "
              f"(newest checkpoint before: {ev['checkpoint_before']}); {n} checkpoints on disk, {bad} unreadable",
              flush=True)
    final_log = os.path.join(work, "final.log")
    proc = L.start([*args, "--resume", "auto"], 2, tmp_dir=tmp, log_path=final_log)
    final_code = proc.wait(timeout=900)
    logs = [open(os.path.join(work, f), errors="replace").read() for f in sorted(os.listdir(work)) if f.endswith(".log")]
    resumes = sum(text.count("fastmae: resumed from") for text in logs)
    n, bad = check_disk(out)
    got = L.read_steps(out)
    mismatched = [s for s in sorted(reference)
                  if s not in got or abs(got[s]["loss"] - reference[s]["loss"]) > REL_TOL * abs(reference[s]["loss"])]
    return {
        "kills": kills_done, "runs_killed_attempted": kills, "resumes": resumes,
        "unreadable_checkpoints": unreadable_seen + bad, "checkpoints_checked": sum(e["checkpoints_on_disk"] for e in events) + n,
        "mismatched_steps": mismatched, "steps": steps, "logged_steps_final": len(got), "final_exit_code": final_code,
        "max_abs_loss_diff": max((abs(got[s]["loss"] - reference[s]["loss"]) for s in reference if s in got), default=None),
        "final_loss": got.get(steps, {}).get("loss"), "reference_final_loss": reference[steps]["loss"],
        "events": events, "wall_s": round(time.time() - t_start, 1), "seed": seed, "save_every_steps": save_every,
    }


def environment() -> dict:
    import deepspeed

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=L.ROOT).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, no GPU", "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "setup": "2 ranks, torchrun, gloo, ZeRO-2, fp32, mae_vit_tiny_patch4_dec64d2b @ 32px, batch 8/rank"}


def write_summary(result: dict, out_dir: str, name: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1)
    env = result["environment"]
    lines = [
        f"# Fault soak: {result['kills']} SIGKILLs, resume after each", "",
        f"{env['date']}, commit {env['commit']}, {env['machine']}, torch {env['torch']}, "
        f"deepspeed {env['deepspeed']}; {env['setup']}; {result['steps']} steps, checkpoint every "
        f"{result['save_every_steps']}; wall {result['wall_s']} s. Command: `python benchmarks/soak.py --kills "
        f"{result['runs_killed_attempted']} --steps {result['steps']}`.", "",
        "| kills | resumes | checkpoints checked | unreadable checkpoints | mismatched steps | max abs loss diff |",
        "|---|---|---|---|---|---|",
        f"| {result['kills']} | {result['resumes']} | {result['checkpoints_checked']} | "
        f"{result['unreadable_checkpoints']} | {len(result['mismatched_steps'])} | {result['max_abs_loss_diff']} |", "",
        "| run | killed rank | at step | newest checkpoint before | checkpoints on disk | unreadable |",
        "|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(result["events"]):
        lines.append(f"| {i + 1} | {e['killed_rank']} | {e['reached']} | {e['checkpoint_before']} | "
                     f"{e['checkpoints_on_disk']} | {e['unreadable']} |")
    with open(mpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath, mpath


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of the run (> kills x 2 x save_every)")
    p.add_argument("--save_every", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for soak_<kills>kills.json/.md (default: print only)")
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one, removed)")
    a = p.parse_args(argv)
    work = a.work_dir or tempfile.mkdtemp(prefix="fastmae-soak-")
    try:
        result = soak(a.kills, a.steps, a.save_every, a.seed, work)
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["environment"] = environment()
    print(f"kills: {result['kills']}  resumes: {result['resumes']}  unreadable checkpoints: "
          f"{result['unreadable_checkpoints']}  mismatched steps: {len(result['mismatched_steps'])}  "
          f"(final exit {result['final_exit_code']}, {result['wall_s']} s)")
    if a.out:
        for path in write_summary(result, a.out, f"soak_{a.kills}kills"):
            print(f"wrote {path}")
    ok = result["unreadable_checkpoints"] == 0 and not result["mismatched_steps"] and result["final_exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
