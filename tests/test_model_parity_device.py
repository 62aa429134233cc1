"""fastmae against the reference MAE on the test device, every kernel backend, fp32 and bf16 autocast.

The truth is the reference in fp64 (same weights, same images, same masking noise). fp32 fastmae must land
within fp32 rounding of it; under bf16 autocast fastmae's error must be no worse than the reference's own
bf16 error (the same model run in bf16) plus a little. On a GPU this is ViT-B/16 at a real patch grid with
the Triton and CUDA kernels compiled; on a CPU the tiny model with Triton in its interpreter.
"""

import pytest
import torch
from _triton_helpers import DEVICE

import fastmae_kernels as fk
from fastmae.models import create_model, model_config

GPU = DEVICE.type == "cuda"
MODEL = "mae_vit_base_patch16_dec512d8b" if GPU else "mae_vit_tiny_patch4_dec64d2b"
BATCH = 4
BACKENDS = [b for b in fk.BACKENDS if fk.dispatch.unavailable_reason(b, DEVICE) is None]


def _rel(x: torch.Tensor, truth: torch.Tensor) -> float:
    return ((x.double() - truth).norm() / truth.norm()).item()


def _run(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor, bf16: bool,
         **kwargs) -> dict[str, torch.Tensor]:
    """loss, pred (at the masked patches: what every forward predicts) and every parameter gradient of one
    forward+backward, as fp64 tensors."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        loss, pred, mask = model(imgs, 0.75, noise, **kwargs)
    loss.backward()
    if pred.shape[1] == mask.shape[1]:  # a full prediction: keep its masked rows, in raster order
        pred = pred[mask.bool()].view(pred.shape[0], -1, pred.shape[-1])
    out = {"loss": loss.detach().double(), "pred": pred.detach().double()}
    out.update({f"grad:{n}": p.grad.double() for n, p in model.named_parameters() if p.grad is not None})
    return out


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    reference = create_model(MODEL, reference=True)
    state = reference.state_dict()
    size = model_config(MODEL).get("img_size", 224)
    length = (size // model_config(MODEL)["patch_size"]) ** 2
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(BATCH, 3, size, size, generator=g)  # never zeros: unwritten outputs would hide
    noise = torch.rand(BATCH, length, generator=g)
    truth = _run(reference.double().to(DEVICE), imgs.double().to(DEVICE), noise.to(DEVICE), bf16=False)
    reference_bf16 = _run(reference.float(), imgs.to(DEVICE), noise.to(DEVICE), bf16=True)
    return state, imgs.to(DEVICE), noise.to(DEVICE), truth, reference_bf16


@pytest.mark.parametrize("masked_only", [False, True], ids=["full", "masked_only"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fastmae_matches_fp64_reference(setup, backend, bf16, masked_only):
    state, imgs, noise, truth, reference_bf16 = setup
    model = create_model(MODEL, backend=backend)
    model.load_state_dict(state, strict=True)
    got = _run(model.to(DEVICE), imgs, noise, bf16, masked_only=masked_only)
    assert got.keys() == truth.keys()
    all_grads = [k for k in truth if k.startswith("grad:")]
    for key in ["loss", "pred", *all_grads]:
        err = _rel(got[key], truth[key])
        if bf16:  # the reference's own bf16 error on this tensor sets the scale
            allowed = 2.0 * _rel(reference_bf16[key], truth[key]) + 2e-3
        else:  # fp32 rounding through a few dozen layers (no TF32: torch's default for fp32 matmul)
            allowed = 1e-4 if key in ("loss", "pred") else 1e-3
        assert err <= allowed, f"{backend} {'bf16' if bf16 else 'fp32'} {key}: rel err {err:.2e} > {allowed:.2e}"
