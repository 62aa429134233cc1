"""fastmae.train.host_waits: the profile's count of host waits for the device, by call site."""

import pytest
import torch

from fastmae.train.host_waits import HostWaitCounter


def test_counts_deepspeed_synchronize_calls_by_site_and_restores_them():
    get_accelerator = pytest.importorskip("deepspeed.accelerator").get_accelerator  # the GPU image has none

    accel = get_accelerator()
    original = type(accel).synchronize
    counter = HostWaitCounter(torch.device("cpu"))
    counter.start()
    for _ in range(3):
        accel.synchronize()
    counter.stop()
    accel.synchronize()  # after stop: not counted
    assert sum(counter.sites.values()) == 3
    (site,) = counter.sites
    assert site.startswith("synchronize ") and "test_host_waits.py:" in site
    assert type(accel).synchronize is original


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sync debug mode)")
def test_cuda_counts_synchronizing_tensor_ops_once_each():
    x = torch.randn(1000, device="cuda")
    counter = HostWaitCounter(torch.device("cuda"))
    counter.start()
    x.sum().item()  # a synchronizing op: one wait
    torch.cuda.synchronize()  # an explicit one: counted once, not again by the sync debug mode
    y = x * 2  # no wait
    counter.stop()
    ops = {k: v for k, v in counter.sites.items() if k.startswith("sync op")}
    syncs = {k: v for k, v in counter.sites.items() if k.startswith("synchronize")}
    assert sum(ops.values()) == 1 and sum(syncs.values()) == 1, dict(counter.sites)
    assert all("test_host_waits.py:" in k for k in counter.sites)
    assert torch.cuda.get_sync_debug_mode() == 0 and y.shape == x.shape
