"""The trainer's steady step never makes the host wait for the device (CPU runs of the real trainer).

A host wait per step idles a GPU while the host runs DeepSpeed's step, the loader and the next forward's
launches. `_host_sync_worker.py` counts, per optimizer step, every tensor read back to the host and every
DeepSpeed synchronize() made by the trainer, the model or DeepSpeed. Before 2026-11-28 a ZeRO-2 step made four:
DeepSpeed's throughput timer (2 synchronize), DeepSpeed's finite-norm check and the trainer's NaN/preemption
flag read. Now the only read is of the previous step's flags, copied to host memory a step earlier.

The lag must not change what a bad step does: it is skipped on the device (fused AdamW's found_inf) and
counted a step later, so a run that reads its flags late ends bit-identical to one that reads them at once.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastmae.train import checkpoint as ckpt
from fastmae.train import launch_local as L

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 6
QUIET = ["--log_every", "1000", "--save_every_steps", "1000"]  # no step reads the device for a log or checkpoint
COMMON = ["--num_images", "96", "--epochs", "1", "--warmup_epochs", "0", "--loader", "torchvision",
          "--num_workers", "0", "--batch_size", "8", "--max_steps", str(STEPS)]


def _count_syncs(tmp_path, zero_stage: int, precision: str) -> list[dict]:
    out = tmp_path / "syncs.json"
    cmd = [sys.executable, os.path.join(HERE, "_host_sync_worker.py"), str(out), "--", *COMMON, *QUIET,
           "--zero_stage", str(zero_stage), "--precision", precision, "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=L.child_env(str(tmp_path)), cwd=L.ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert len(steps) == STEPS
    return steps


@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (2, "fp32"), (2, "bf16-pure")])
def test_a_steady_step_reads_only_the_previous_steps_flags(tmp_path, zero_stage, precision):
    """(bf16 autocast takes the fp32-weights path of DeepSpeed, counted the same by hand on 2026-11-28.)"""
    steps = _count_syncs(tmp_path, zero_stage, precision)
    # DeepSpeed's timer starts at its step 2, the first flag read is step 1's during step 2: steady from step 3
    for step, sites in enumerate(steps[2:], start=3):
        assert not [s for s in sites if s.startswith("synchronize")], (step, sites)
        assert sum(sites.values()) == 1 and all("fastmae/train/step_flags.py" in s for s in sites), (step, sites)


def _final_state(out: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    path = os.path.join(ckpt.root_dir(out), ckpt.tag_for(step))
    found = {}
    for f in sorted(os.listdir(path)):
        if f.startswith(("mp_rank", "zero_pp")):
            sd = torch.load(os.path.join(path, f), map_location="cpu", weights_only=False)
            found.update({f"{f}/{k}": v for k, v in sd["module"].items()} if "module" in sd and sd["module"] else {})
            opt = sd.get("optimizer_state_dict") or sd.get("optimizer") or {}  # ZeRO-1/2/3 files, ZeRO-0 file
            for i, t in enumerate(_tensors(opt)):
                found[f"{f}/opt{i}"] = t
    return found


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])  # fp32 master partitions; bf16 weights copied back
def test_a_late_read_bad_step_is_skipped_exactly_as_a_read_at_once(tmp_path, precision):
    """2 ranks, ZeRO-2, a NaN loss at step 3: read late (no log line, no checkpoint until the end) vs read at
    once (a log line every step) end in the same weights and AdamW state, bit for bit, and both count it."""
    runs = {}
    for name, extra in (("late", QUIET), ("at_once", ["--log_every", "1", "--save_every_steps", "1000"])):
        out = str(tmp_path / name)
        code, log = L.run([*COMMON, *extra, "--zero_stage", "2", "--precision", precision, "--fault_nan_steps", "3",
                           "--output_dir", out], 2, tmp_dir=str(tmp_path), timeout=300)
        assert code == 0, log[-3000:]
        trainer = torch.load(os.path.join(ckpt.root_dir(out), ckpt.tag_for(STEPS), "trainer_rank00000.pt"),
                             weights_only=False)
        assert trainer["skipped_steps"] == 1, name
        runs[name] = _final_state(out)
    late, at_once = runs["late"], runs["at_once"]
    assert late.keys() == at_once.keys() and len(late) > 10
    for k in late:
        assert torch.equal(late[k], at_once[k]), k  # NaN never equals itself: a NaN step applied would fail here
    steps = L.read_steps(str(tmp_path / "at_once"))
    assert [steps[s]["bad_step"] for s in range(1, STEPS + 1)] == [False, False, True, False, False, False]


def test_a_late_read_streak_of_bad_steps_stops_the_run(tmp_path):
    out = str(tmp_path / "streak")
    code, log = L.run([*COMMON, *QUIET, "--fault_nan_steps", "3,4", "--max_bad_steps", "2", "--output_dir", out], 1,
                      tmp_dir=str(tmp_path), timeout=300)
    assert code == 3, log[-3000:]
    stop = [ln for ln in log.splitlines() if "consecutive" in ln]
    assert len(stop) == 1 and "(step 4)" in stop[0], stop
    assert stop[0].endswith("last good checkpoint: none (no checkpoint was written yet)"), stop
    assert ckpt.complete_checkpoints(ckpt.root_dir(out)) == []


def test_a_late_read_preemption_checkpoints_on_every_rank_at_the_same_step(tmp_path):
    """SIGUSR1 to one of 2 ranks while no step reads its flags at once: both ranks learn it a step later from
    the all-reduced flags, write one checkpoint at the same step and exit 0."""
    out, log_path = str(tmp_path / "preempt"), str(tmp_path / "preempt.log")
    args = ["--num_images", "640", "--epochs", "1", "--warmup_epochs", "0", "--loader", "torchvision",
            "--num_workers", "0", "--batch_size", "8", "--max_steps", "40", *QUIET, "--zero_stage", "2",
            "--fault_step_sleep", "0.5", "--output_dir", out]
    proc = L.start(args, 2, tmp_dir=str(tmp_path), log_path=log_path)
    deadline = time.time() + 240
    while "fastmae: mae_vit" not in open(log_path, errors="replace").read():  # the start-up line: steps begin
        assert proc.poll() is None and time.time() < deadline, open(log_path, errors="replace").read()[-3000:]
        time.sleep(0.2)
    time.sleep(2.0)  # a few steps in
    workers = L.worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0, open(log_path, errors="replace").read()[-3000:]
    saved = ckpt.complete_checkpoints(ckpt.root_dir(out))
    assert len(saved) == 1 and 1 <= saved[0][0] < 40, saved
    step, path = saved[0]
    assert f"checkpoint {path} written at step {step}; exiting" in open(log_path, errors="replace").read()
    for rank in (0, 1):
        state = torch.load(os.path.join(path, f"trainer_rank{rank:05d}.pt"), weights_only=False)
        assert state["step"] == step and state["loader"]["batch"] == step and state["skipped_steps"] == 0


@pytest.mark.parametrize("zero_stage", [0, 2])  # the guard reads kept .grad (ZeRO-0) or hooks them (ZeRO-1/2/3)
def test_an_inf_gradient_with_a_finite_loss_is_skipped(tmp_path, zero_stage):
    """Every gradient of step 3 made Inf behind a finite loss: the guard must see the gradients themselves
    (a NaN-loss fault would not tell), skip the step and count it; the run ends normally with finite weights
    (a checkpoint of non-finite weights is refused, exit 4)."""
    out = str(tmp_path / "inf")
    code, log = L.run([*COMMON, "--log_every", "1", "--save_every_steps", "1000", "--zero_stage", str(zero_stage),
                       "--fault_inf_grad_steps", "3", "--output_dir", out], 1, tmp_dir=str(tmp_path), timeout=300)
    assert code == 0, log[-3000:]
    steps = L.read_steps(out)
    assert [steps[s]["bad_step"] for s in range(1, STEPS + 1)] == [False, False, True, False, False, False]
    assert all(torch.isfinite(torch.tensor(steps[s]["loss"])) for s in steps)
    trainer = torch.load(os.path.join(ckpt.root_dir(out), ckpt.tag_for(STEPS), "trainer_rank00000.pt"),
                         weights_only=False)
    assert trainer["skipped_steps"] == 1


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_gradient_accumulation_skips_a_bad_step_and_changes_nothing(tmp_path, zero_stage):
    """accum 2: both micro-batches of step 3 get Inf gradients behind finite losses. The guard sees them (ZeRO-0:
    in the accumulated .grad; ZeRO-2: in its hooks, before DeepSpeed moves them), the step changes no weight
    and no AdamW state (checkpoints 2 and 3 equal bit for bit), and the next good step does."""
    out = str(tmp_path / "accum")
    code, log = L.run([*COMMON, "--batch_size", "4", "--accum_iter", "2", "--log_every", "1", "--save_every_steps", "1",
                       "--keep_last", "10", "--zero_stage", str(zero_stage), "--fault_inf_grad_steps", "3",
                       "--output_dir", out], 1, tmp_dir=str(tmp_path), timeout=300)
    assert code == 0, log[-3000:]
    steps = L.read_steps(out)
    assert [steps[s]["bad_step"] for s in range(1, STEPS + 1)] == [False, False, True, False, False, False]
    before, skipped, after = (_final_state(out, s) for s in (2, 3, 4))
    assert before.keys() == skipped.keys() and any("opt" in k for k in before) and len(before) > 10
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert not all(torch.equal(skipped[k], after[k]) for k in before)
