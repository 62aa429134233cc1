"""The fast path keeps the math: block checkpointing, fused AdamW and torch.compile against the plain versions."""

import copy

import pytest
import torch

from fastmae.models import create_model
from fastmae.speed import choose_adamw_impl, make_optimizer, optimize_model

TINY = "mae_vit_tiny_patch4_dec64d2b"  # 32 px, 64 patches, 16 kept at ratio 0.75


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return create_model(TINY, backend="torch", norm_pix_loss=True).to(dtype)


def _inputs(batch=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype), torch.rand(batch, 64, generator=g, dtype=dtype)


def _loss_and_grads(model, imgs, noise, masked_only=False):
    model.zero_grad(set_to_none=True)
    loss = model(imgs, 0.75, noise, masked_only=masked_only)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _counted(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


def test_grad_checkpointing_recomputes_each_block_and_keeps_gradients():
    plain = _model()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    for blk in [*ckpt.blocks, *ckpt.decoder_blocks]:
        blk.forward = _counted(blk.forward, calls)  # not a forward hook: checkpoint's recompute skips hooks
    imgs, noise = _inputs()
    loss_p, grads_p = _loss_and_grads(plain, imgs, noise)
    loss_c, grads_c = _loss_and_grads(ckpt, imgs, noise)
    blocks = len(ckpt.blocks) + len(ckpt.decoder_blocks)
    assert len(calls) == 2 * blocks, "each block should run twice: forward, then recomputed in backward"
    # fp64 recompute of the same ops: equal to rounding
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-12, atol=0)
    for name, g in grads_p.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_c[name], g, rtol=1e-10, atol=1e-13, msg=name)
    calls.clear()
    with torch.no_grad():
        ckpt(imgs, 0.75, noise)
    assert len(calls) == blocks, "no recompute (and no checkpoint overhead) without grad"


def test_optimize_model_is_in_place_and_resolves_backend():
    model = create_model(TINY)  # backend "auto"
    keys = list(model.state_dict())
    out = optimize_model(model, compile=False, grad_checkpointing=True)
    assert out is model and model.grad_checkpointing
    assert model.backend == "torch"  # what "auto" means on CPU: triton/cuda need a GPU
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="mode must be"):
        optimize_model(model, mode="fastest")


def test_adamw_selection():
    cpu = [torch.nn.Parameter(torch.randn(3))]
    assert choose_adamw_impl(cpu, "auto") == "torch-fused"  # torch >= 2.4 has a fused CPU AdamW
    assert choose_adamw_impl(cpu, "torch-foreach") == "torch-foreach"
    opt = make_optimizer(cpu, lr=1e-3)
    assert opt.defaults["fused"] is True
    with pytest.raises(ValueError, match="impl must be"):
        choose_adamw_impl(cpu, "adafactor")
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer([], lr=1e-3)


@pytest.mark.parametrize("impl", ["torch-fused", "torch-foreach"])
def test_fast_adamw_equals_plain_adamw(impl):
    """Five steps with the official betas and a no-decay group: the same update as the for-loop AdamW."""
    torch.manual_seed(0)
    shapes = [(17, 5), (5,), (3, 1, 7)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    fast = [torch.nn.Parameter(p.detach().clone()) for p in ref]

    def groups(ps):
        return [{"params": ps[:1], "weight_decay": 0.05}, {"params": ps[1:], "weight_decay": 0.0}]

    opt_ref = make_optimizer(groups(ref), lr=1e-2, impl="torch-loop")
    opt_fast = make_optimizer(groups(fast), lr=1e-2, impl=impl)
    for step in range(5):
        for a, b in zip(ref, fast):
            g = torch.randn_like(a) * (step + 1)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_fast.step()
    for a, b, s in zip(ref, fast, shapes):
        assert not torch.equal(a, torch.zeros(s))
        # fp32: the fused kernel reorders a few ops; 5 steps of lr 1e-2 stay within ~1e-6
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked_only", [False, True], ids=["full", "masked_only"])
@pytest.mark.parametrize("backend, grad_checkpointing", [("torch", False), ("torch", True), ("triton", False)])
def test_compiled_model_has_no_graph_breaks(backend, grad_checkpointing, masked_only):
    """Dynamo alone (no inductor: seconds): one graph for the whole forward, the kernels' custom ops included
    (triton runs here under TRITON_INTERPRET=1, set by conftest; the cuda backend needs a GPU)."""
    import fastmae_kernels as fk

    reason = fk.dispatch.unavailable_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    model = _model(torch.float32)
    model.backend = backend
    optimize_model(model, compile=False, grad_checkpointing=grad_checkpointing)
    imgs, noise = _inputs(dtype=torch.float32)
    explanation = torch._dynamo.explain(model)(imgs, 0.75, noise, masked_only=masked_only)
    reasons = [b.reason.splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1
    if grad_checkpointing:  # the blocks are traced as checkpoint regions, not inlined
        assert "checkpoint" in explanation.graphs[0].code


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """Inductor (C++ on CPU, ~45 s to compile fwd+bwd): same loss and gradients, then a fused AdamW step.
    The forward the trainer compiles (masked_only) against the plain eager one."""
    eager = _model(torch.float32)
    compiled = copy.deepcopy(eager)
    optimize_model(compiled, compile=True, mode="default", fullgraph=True)
    imgs, noise = _inputs(dtype=torch.float32)
    loss_e, grads_e = _loss_and_grads(eager, imgs, noise)
    loss_c, grads_c = _loss_and_grads(compiled, imgs, noise, masked_only=True)
    # fp32 with fused/reordered reductions: ~1e-6 relative; 1e-4 leaves room for 5 blocks of it
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert all(k.split(".")[0] != "_orig_mod" for k in compiled.state_dict())
    # a deep copy of the compiled model computes with its own weights (its forward is rebound to it)
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        twin.decoder_pred.bias.add_(1.0)  # every predicted pixel moves by 1: the loss must change
    assert not torch.allclose(twin(imgs, 0.75, noise, masked_only=True)[0].detach(), loss_c)
    opt = make_optimizer(compiled.parameters(), lr=1e-3)
    before = compiled.blocks[0].attn.qkv.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, compiled.blocks[0].attn.qkv.weight)


def test_fresh_process_auto_backend_compiles_without_graph_breaks():
    """In a fresh process (no backend module imported yet) "auto" resolved by optimize_model must not leave
    the backend's import to the first call, inside the trace, where fullgraph=True makes it an error.
    Other tests import the modules first, so this one runs in its own interpreter."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from fastmae.models import create_model\n"
        "from fastmae.speed import optimize_model\n"
        "m = create_model('mae_vit_tiny_patch4_dec64d2b')\n"  # backend 'auto', the trainer's default
        "optimize_model(m, compile=False)\n"
        "m.compile(backend='eager', fullgraph=True)\n"  # dynamo only: any graph break raises
        "loss = m(torch.randn(2, 3, 32, 32), 0.75)[0]\n"
        "loss.backward()\n"
        "print('ok', m.backend, float(loss))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok torch ")
