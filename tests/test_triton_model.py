"""Convergence guard: the tiny MAE trained with backend "torch" and with backend "triton" from the same
init, on the same images and masks, must give the same loss at every step (Liger's test/convergence)."""

import pytest
import torch
from _triton_helpers import DEVICE, requires_triton

from fastmae.models import create_model

pytestmark = requires_triton
TINY = "mae_vit_tiny_patch4_dec64d2b"


def _train(backend: str, init_state: dict, steps: int, norm_pix: bool, autocast: bool = False,
           masked_only: bool = False, attn: str = "sdpa") -> list[float]:
    model = create_model(TINY, backend=backend, norm_pix_loss=norm_pix, norm_backend=backend,
                         gelu_backend=backend, attn_backend=attn).to(DEVICE)
    model.load_state_dict(init_state, strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        imgs = torch.randn(4, 3, 32, 32, generator=g).to(DEVICE)
        noise = torch.rand(4, 64, generator=g).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            loss, _, _ = model(imgs, 0.75, noise, masked_only=masked_only)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("norm_pix, autocast, masked_only", [(True, False, False), (False, False, False),
                                                           (True, True, False), (True, False, True)])
def test_tiny_mae_trains_identically_with_triton_and_torch(norm_pix, autocast, masked_only):
    """masked_only: the trainer's forward (triton gathers the masked targets) against the plain torch one."""
    torch.manual_seed(0)
    init_state = create_model(TINY, norm_pix_loss=norm_pix).state_dict()
    reference = _train("torch", init_state, steps=4, norm_pix=norm_pix, autocast=autocast)
    fused = _train("triton", init_state, steps=4, norm_pix=norm_pix, autocast=autocast, masked_only=masked_only)
    assert reference[-1] < reference[0]  # it learns, so equal curves are not two flat lines
    # Gathers and insertion are bit-exact (also under bf16 autocast, where the decoder input is fp32 as in
    # the official code); the loss, the LayerNorms (the fused add_layer_norm kernel), the MLPs' bias + GELU
    # (bias_gelu: the sum not rounded before GELU, the bias gradient summed in fp32) and their gradients differ
    # from torch in the last fp32 bits (summation and multiplication order). In fp32 that stays ~1e-7; under
    # autocast a last-bit change of d pred (or of a normed activation) sometimes flips a bf16 rounding, which
    # after a few optimizer steps moves the loss by ~1e-4 relative (bf16 eps/30).
    rtol = 2e-3 if autocast else 1e-5
    for step, (want, got) in enumerate(zip(reference, fused)):
        assert abs(got - want) <= rtol * abs(want), f"step {step}: triton {got} vs torch {want}"


@pytest.mark.parametrize("autocast, backward", [(False, "head"), (True, "auto")])
def test_tiny_mae_trains_alike_with_triton_attention_and_sdpa(autocast, backward, monkeypatch):
    """Only the attention differs (every other op torch's), masked_only on: the decoder's last block attends
    from the masked rows only (fewer query rows than keys). The tiny model's few heads take the split backward
    by default (`auto`); the fp32 run forces the one-program-per-head backward."""
    monkeypatch.setenv("FASTMAE_ATTENTION_BACKWARD", backward)
    torch.manual_seed(0)
    init_state = create_model(TINY).state_dict()
    sdpa = _train("torch", init_state, steps=4, norm_pix=True, autocast=autocast, masked_only=True)
    triton_attn = _train("torch", init_state, steps=4, norm_pix=True, autocast=autocast, masked_only=True,
                         attn="triton")
    assert sdpa[-1] < sdpa[0]
    # fp32: both compute softmax(q k^T) v in fp32 in other orders (~1e-7 relative per op). bf16: the kernels round
    # the probabilities to bf16 before P V, as FlashAttention and cuDNN do, and torch's CPU SDPA does not
    rtol = 2e-3 if autocast else 1e-5
    for step, (want, got) in enumerate(zip(sdpa, triton_attn)):
        assert abs(got - want) <= rtol * abs(want), f"step {step}: triton attention {got} vs sdpa {want}"


def test_decoder_attn_backend_runs_the_kernel_eagerly_and_compiled():
    """decoder_attn_backend="triton" alone: each decoder block's attention is fastmae_kernels' kernel (forward and
    backward), eager and as a node of the compiled graph; the encoder's stays SDPA."""
    from fastmae.profiling import WrittenBytes

    torch.manual_seed(0)
    model = create_model(TINY, backend="torch", decoder_attn_backend="triton").to(DEVICE)
    assert [b.attn.backend for b in model.blocks] == ["sdpa"] * len(model.blocks)
    assert [b.attn.backend for b in model.decoder_blocks] == ["triton"] * len(model.decoder_blocks)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 64, device=DEVICE)
    with WrittenBytes() as counted:
        model(imgs, 0.75, noise)[0].backward()
    decoder = len(model.decoder_blocks)
    assert counted.calls["attention"] == counted.calls["attention_backward"] == decoder
    sdpa_calls = sum(n for op, n in counted.calls.items() if "scaled_dot_product" in op and "backward" not in op)
    assert sdpa_calls == len(model.blocks)
    traced = _graph_ops(model, imgs, 0.75, noise)
    assert sum("fastmae_triton.attention" in op for op in traced) == decoder


def test_attn_backend_is_checked():
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        create_model(TINY, attn_backend="flash")
    with pytest.raises(ValueError, match="decoder_attn_backend must be one of"):
        create_model(TINY, decoder_attn_backend="cudnn")


def _graph_ops(model, *args) -> list[str]:
    """The op targets of the graph torch.compile traces for model(*args) (one graph: fullgraph)."""
    seen: list[str] = []

    def record(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True)(*args)
    return seen


def test_norm_backend_auto_is_torch_and_triton_runs_the_kernel_eagerly_and_compiled():
    """"auto" (on any MAE kernels backend): every LayerNorm of both stacks (2 per block + the 2 final ones) is
    torch's layer_norm, eager and inside torch.compile (for Inductor to fuse). "triton": one add_layer_norm kernel
    each, eager and inside the compiled graph."""
    from fastmae.profiling import WrittenBytes

    torch.manual_seed(0)
    model = create_model(TINY, backend="triton").to(DEVICE)
    norms = 2 * (len(model.blocks) + len(model.decoder_blocks)) + 2
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 64, device=DEVICE)
    with WrittenBytes() as counted:
        model(imgs, 0.75, noise)
    assert counted.calls["add_layer_norm"] == 0 and counted.calls["native_layer_norm"] == norms
    traced = _graph_ops(model, imgs, 0.75, noise)
    assert not any("add_layer_norm" in op for op in traced)
    assert sum("layer_norm" in op for op in traced) == norms

    model.norm_backend = "triton"
    with WrittenBytes() as counted:
        model(imgs, 0.75, noise)
    assert counted.calls["add_layer_norm"] == norms and counted.calls["native_layer_norm"] == 0
    traced = _graph_ops(model, imgs, 0.75, noise)
    assert sum("fastmae_triton.add_layer_norm" in op for op in traced) == norms


def test_gelu_backend_auto_is_torch_and_triton_runs_the_kernel_eagerly_and_compiled():
    """"auto": every MLP is nn.Linear + nn.GELU, eager and inside torch.compile. "triton": each MLP's fc1 bias +
    GELU is one bias_gelu kernel in eager mode, inside fc1's module call (its hooks fire: ZeRO-3 gathers fc1's
    bias there), and inside the compiled graph."""
    from fastmae.models.vit_block import Linear
    from fastmae.profiling import WrittenBytes

    torch.manual_seed(0)
    model = create_model(TINY, backend="triton").to(DEVICE)
    blocks = len(model.blocks) + len(model.decoder_blocks)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 64, device=DEVICE)
    assert model.gelu_backend_for(compiled=False, device=DEVICE) == "torch"
    assert model.gelu_backend_for(compiled=True, device=DEVICE) == "torch"
    with WrittenBytes() as counted:
        model(imgs, 0.75, noise)[0].backward()
    assert counted.calls["bias_gelu"] == 0 and counted.calls["gelu"] == counted.calls["gelu_backward"] == blocks
    traced = _graph_ops(model, imgs, 0.75, noise)
    assert not any("bias_gelu" in op for op in traced)
    assert sum("gelu" in op for op in traced) == blocks  # torch's gelu, one per MLP

    model.gelu_backend = "triton"
    model.zero_grad(set_to_none=True)
    assert model.gelu_backend_for(compiled=False, device=DEVICE) == "triton"
    fc1_calls = []
    for module in model.modules():
        if isinstance(module, Linear):
            module.register_forward_hook(lambda m, args, out: fc1_calls.append(out.shape))
    with WrittenBytes() as counted:
        loss = model(imgs, 0.75, noise)[0]
        loss.backward()
    assert counted.calls["bias_gelu"] == counted.calls["bias_gelu_backward"] == blocks
    assert counted.calls["gelu"] == counted.calls["gelu_backward"] == 0
    assert len(fc1_calls) == blocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "fc1.bias" in n)
    traced = _graph_ops(model, imgs, 0.75, noise)
    assert sum("fastmae_triton.bias_gelu" in op for op in traced) == blocks


def test_norm_backend_is_checked():
    with pytest.raises(ValueError, match="norm_backend must be 'auto' or one of"):
        create_model(TINY, norm_backend="apex")
    with pytest.raises(ValueError, match="gelu_backend must be 'auto' or one of"):
        create_model(TINY, gelu_backend="apex")
