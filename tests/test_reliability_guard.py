"""In-process units of the NaN guard and the step gate (the multi-rank behaviour is in
test_reliability_resume.py): a non-finite gradient alone (finite loss) is caught, and a vetoed AdamW
step changes neither parameters nor optimizer state."""

import copy

import pytest
import torch

from fastmae.models.registry import create_model
from fastmae.train.nan_guard import NanGuard, params_finite_local
from fastmae.train.optim import StepGate, build_optimizer
from fastmae.train.step_flags import LaggedFlags, StepFlags


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 64, generator=g)


def _guarded_backward(model, guard: NanGuard, imgs, noise) -> torch.Tensor:
    """One forward + backward as the trainer does it: the guard sees the loss, then the gradients."""
    loss, _, _ = model(imgs, noise=noise)
    guard.note_loss(loss)
    loss.backward()
    return loss


def _guard_with_a_poisonable_gradient(param_of, grads_kept: bool):
    """The tiny MAE (seed 0) whose parameter `param_of(model)` gets an Inf gradient while poison["on"], and
    its guard (max 2 bad steps). The poison hook is registered before the guard's, so the guard sees what
    backward produced (hooks run in order)."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    poison = {"on": False}
    param_of(model).register_hook(lambda g: g * float("inf") if poison["on"] else g)
    return model, poison, NanGuard(model, torch.device("cpu"), max_bad_steps=2, grads_kept=grads_kept)


KEPT = pytest.mark.parametrize("grads_kept", [False, True], ids=["hooks", "grads_kept"])  # ZeRO-1/2/3 vs ZeRO-0


@KEPT
def test_guard_catches_a_nonfinite_gradient_with_a_finite_loss(grads_kept):
    model, poison, guard = _guard_with_a_poisonable_gradient(lambda m: m.blocks[1].mlp.fc1.weight, grads_kept)
    imgs, noise = _batch()
    _guarded_backward(model, guard, imgs, noise)
    assert guard.local_bad().item() == 0.0
    guard.reset()
    model.zero_grad()
    # an Inf appears in one gradient only (e.g. an overflow inside backward)
    poison["on"] = True
    loss = _guarded_backward(model, guard, imgs, noise)
    assert torch.isfinite(loss) and guard.local_bad().item() == 1.0
    guard.record(True)
    guard.record(True)
    assert guard.should_stop and guard.skipped_steps == 2
    guard.record(False)
    assert guard.consecutive_bad == 0 and not guard.should_stop


@KEPT
def test_guard_sees_every_micro_batch_of_an_accumulated_step(grads_kept):
    """Gradient accumulation: an Inf in the first micro-batch's gradient must not be overwritten by the
    second's finite one (hooks: each parameter's sum has one slot per backward; kept gradients: the Inf stays
    in the accumulated .grad); reset clears it; bf16 gradients are reduced in fp32."""
    model, poison, guard = _guard_with_a_poisonable_gradient(lambda m: m.blocks[0].attn.qkv.weight, grads_kept)
    poison["on"] = True
    imgs, noise = _batch()
    for _ in range(2):  # micro-batch 1 poisoned, micro-batch 2 clean
        _guarded_backward(model, guard, imgs, noise)
        poison["on"] = False
    assert guard.local_bad().item() == 1.0
    guard.reset()
    model.zero_grad()  # as DeepSpeed's step does (kept gradients are read from .grad)
    assert guard.local_bad().item() == 0.0
    _guarded_backward(model, guard, imgs, noise)
    assert guard.local_bad().item() == 0.0
    bf16 = create_model("mae_vit_tiny_patch4_dec64d2b").bfloat16()
    guard = NanGuard(bf16, torch.device("cpu"), max_bad_steps=2, grads_kept=grads_kept)
    _guarded_backward(bf16, guard, imgs.bfloat16(), noise)
    assert guard.local_bad().item() == 0.0
    grads = [p.grad.float() for p in bf16.parameters() if p.requires_grad]
    want = sum(g.norm() for g in grads) if grads_kept else sum(g.sum() for g in grads)
    torch.testing.assert_close(guard._acc, want, rtol=1e-2, atol=1e-2)  # the reductions were really taken


def test_guard_catches_a_nan_loss():
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    guard = NanGuard(model, torch.device("cpu"), max_bad_steps=1)
    guard.note_loss(torch.tensor(float("nan")))
    assert guard.local_bad().item() == 1.0


def test_vetoed_step_changes_nothing():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    opt, gate = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    imgs, noise = _batch()
    for veto in (False, True):
        loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        gate.veto = veto
        opt.step()
        gate.veto = False
        opt.zero_grad()
        after = (model.state_dict(), opt.state_dict())
        same_params = all(torch.equal(before[0][k], after[0][k]) for k in before[0])
        assert same_params == veto
        if veto:
            for pid, st in before[1]["state"].items():
                for k, v in st.items():
                    assert torch.equal(v, after[1]["state"][pid][k]), k
    assert gate.calls == 2
    assert params_finite_local(model)
    with torch.no_grad():
        model.decoder_pred.bias[0] = float("nan")
    assert not params_finite_local(model)


def test_device_flag_skips_a_fused_adamw_step_without_a_host_read():
    """The trainer's usual skip: the all-reduced bad flag goes to fused AdamW as `found_inf`; a flag of 1
    leaves parameters, moments and step count as they were, a flag of 0 is a normal step."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    opt, gate = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert gate.skips_on_device  # torch's fused AdamW, on CPU too
    imgs, noise = _batch()
    for flag in (0.0, 1.0, 0.0):
        loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        gate.found_inf = torch.tensor(flag)
        opt.step()
        gate.found_inf = None
        opt.zero_grad()
        assert not hasattr(opt, "found_inf")  # not left on the optimizer for the next step
        same = [torch.equal(before[0][k], p) for k, p in model.named_parameters() if p.requires_grad]
        assert all(same) if flag else not any(same)
        moments = [torch.equal(v, opt.state_dict()["state"][pid][k])
                   for pid, st in before[1]["state"].items() for k, v in st.items()]
        if flag:  # after a first real step, so there are moments and step counts to keep
            assert moments and all(moments)
        elif moments:
            assert not all(moments)


def test_only_fused_adam_skips_on_device():
    p = [torch.nn.Parameter(torch.randn(3))]
    assert StepGate(torch.optim.AdamW(p, fused=True)).skips_on_device
    assert not StepGate(torch.optim.AdamW(p, foreach=True)).skips_on_device
    assert not StepGate(torch.optim.AdamW(p, foreach=False)).skips_on_device


def test_lagged_flags_are_read_in_order_and_only_up_to_the_asked_step():
    flags = LaggedFlags(torch.device("cpu"))
    published = [flags.publish(1, torch.tensor(0.0), False), flags.publish(2, torch.tensor(1.0), False),
                 flags.publish(3, torch.tensor(0.0), True)]
    assert [f.tolist() for f in published] == [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # (bad, preempted), on device
    assert flags.take(0) == []
    assert flags.take(2) == [StepFlags(1, False, False), StepFlags(2, True, False)]
    assert flags.take(2) == []  # each step's flags are read once
    assert flags.take(5) == [StepFlags(3, False, True)]


def test_fp16_guard_leaves_gradient_overflow_to_the_loss_scaler_but_catches_a_nan_loss():
    """fp16 gradients are loss-scaled: an Inf there is DeepSpeed's scaler's business (it skips the step and
    lowers the scale), and early streaks of them must not stop the run; a non-finite loss still counts."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    model.blocks[1].mlp.fc1.weight.register_hook(lambda g: g * float("inf"))  # every step "overflows"
    guard = NanGuard(model, torch.device("cpu"), max_bad_steps=2, check_grads=False)
    imgs, noise = _batch()
    _guarded_backward(model, guard, imgs, noise)
    assert guard.local_bad().item() == 0.0
    assert not torch.isfinite(model.blocks[1].mlp.fc1.weight.grad).all()  # the overflow was there
    guard.reset()
    guard.note_loss(torch.tensor(float("nan")))
    assert guard.local_bad().item() == 1.0
