"""`pretrain.py --profile_steps N`: the real trainer, profiled over N optimizer steps after its warm-up; rank 0
writes the top ops, the kernel kinds and a summary with wall time, kernel time and their ratio per step."""

import json
import os

import pytest

from fastmae.train import launch_local as L
from fastmae.train.step_profiler import WARMUP_STEPS

pytestmark = pytest.mark.slow


def test_profile_steps_writes_a_measured_summary(tmp_path):
    out = tmp_path / "run"
    code, log = L.run(["--num_images", "128", "--epochs", "1", "--warmup_epochs", "0", "--loader", "torchvision",
                       "--num_workers", "0", "--batch_size", "8", "--max_steps", str(WARMUP_STEPS + 3),
                       "--profile_steps", "2", "--output_dir", str(out)], 1, tmp_dir=str(tmp_path), timeout=300)
    assert code == 0, log[-3000:]
    prof = out / "profile"
    assert {"trainer.top.txt", "trainer.categories.json", "trainer.kernels.json", "trainer.kernel_times.json",
            "trainer.summary.json"} <= set(os.listdir(prof))
    summary = json.loads((prof / "trainer.summary.json").read_text())
    assert summary["steps"] == 2 and summary["after_warmup_steps"] == WARMUP_STEPS
    assert summary["wall_ms_per_step"] > summary["kernel_ms_per_step"] > 0  # the host does more than aten ops
    assert 0 < summary["busy"] < 1 and summary["kernel_kind"] == "aten self CPU time"
    assert "matmul" in summary["shares"] and abs(sum(summary["shares"].values()) - 1) < 1e-6
    assert "aten::" in (prof / "trainer.top.txt").read_text()
    assert summary["host_waits_per_step"] == 0 and summary["host_wait_sites"] == {}  # nothing synchronizes
    assert "synchronize() calls only" in summary["host_waits_counted"]
    assert summary["allocator_events"] is None  # CUDA's caching allocator: nothing to count on a CPU


def test_profile_names_the_host_waits_a_deepspeed_setting_adds(tmp_path):
    """DeepSpeed's throughput timer, turned back on by a DeepSpeed file, synchronizes at every forward and
    step end: the profile summary counts 2 waits per step and names their lines."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"timers": {"throughput": {"enabled": True}}}))
    out = tmp_path / "run"
    code, log = L.run(["--num_images", "128", "--epochs", "1", "--warmup_epochs", "0", "--loader", "synthetic",
                       "--batch_size", "8", "--max_steps", str(WARMUP_STEPS + 3), "--profile_steps", "2",
                       "--deepspeed_config", str(ds), "--output_dir", str(out)], 1, tmp_dir=str(tmp_path), timeout=300)
    assert code == 0, log[-3000:]
    summary = json.loads((out / "profile" / "trainer.summary.json").read_text())
    assert summary["host_waits_per_step"] == 2, summary["host_wait_sites"]
    assert all(site.startswith("synchronize deepspeed/utils/timer.py:") for site in summary["host_wait_sites"])


def test_summary_counts_the_allocator_events_inside_the_window(tmp_path, monkeypatch):
    """On CUDA the summary says what torch's caching allocator did during the profiled steps (driver
    allocations and frees, cache-flush retries): the counters at the window's end minus those at its start."""
    import torch

    from fastmae import profiling
    from fastmae.train.step_profiler import StepProfiler

    reads = iter([{"num_device_alloc": 10, "num_device_free": 2}, {"num_device_alloc": 13, "num_device_free": 2}])
    monkeypatch.setattr(profiling, "allocator_events", lambda device: next(reads))
    profiler = StepProfiler(2, torch.device("cpu"), str(tmp_path), enabled=True)
    for _ in range(WARMUP_STEPS + 2):
        torch.ones(64, 64) @ torch.ones(64, 64)  # something for the profiler to see
        profiler.step_done()
    summary = json.loads((tmp_path / "profile" / "trainer.summary.json").read_text())
    assert summary["allocator_events"] == {"num_device_alloc": 3, "num_device_free": 0}
