"""What the kernel benchmark measures: shapes, inputs, the implementations of each op, and the bytes
each op must move at minimum (for GB/s). Baselines come from fastmae_kernels.reference, never copied."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastmae_kernels as fk
from fastmae_kernels import reference

MASK_RATIO = 0.75


@dataclass(frozen=True, kw_only=True)
class Shape:
    name: str
    batch: int
    img_size: int
    patch: int
    enc_dim: int
    dec_dim: int = 512
    channels: int = 3

    @property
    def length(self) -> int:
        return (self.img_size // self.patch) ** 2

    @property
    def keep(self) -> int:
        return reference.num_kept(self.length, MASK_RATIO)

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


# The shapes: ViT-B/L/H at batch 256/128/64, decoder dim 512, 224 px.
GPU_SHAPES = [
    Shape(name="ViT-B/16", batch=256, img_size=224, patch=16, enc_dim=768),
    Shape(name="ViT-L/16", batch=128, img_size=224, patch=16, enc_dim=1024),
    Shape(name="ViT-H/14", batch=64, img_size=224, patch=14, enc_dim=1280),
]
# CPU smoke: checks the script runs end to end (Triton in its interpreter). Not a speed measurement.
SMOKE_SHAPES = [Shape(name="smoke-32px/4", batch=2, img_size=32, patch=4, enc_dim=96, dec_dim=64)]

# Mixed precision as the model runs under bf16 autocast: fp32 images, position tables and mask token,
# bf16 activations and prediction (so insertion outputs fp32, as the official decoder sees it).
ACT = torch.bfloat16
PARAM = torch.float32
IMG = torch.float32


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Case:
    """One op (or the three together) on one shape: inputs, grad targets, and the call per implementation."""

    op: str
    inputs: dict
    grad_names: list[str]  # inputs that get a gradient in the backward measurement
    call: Callable[[dict, Callable], tuple]  # (inputs, ops-namespace) -> outputs (tensors)
    bytes_fwd: int
    bytes_bwd: int  # 0: not differentiable


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, length, keep = shape.batch, shape.length, shape.keep

    def rand(*size, dtype, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device, dtype)

    noise = torch.rand(n, length, generator=g).to(device)
    ids_keep, ids_restore, mask = reference.random_masking(noise, MASK_RATIO)
    return dict(
        noise=noise, ids_keep=ids_keep, ids_restore=ids_restore, mask=mask,
        imgs=rand(n, shape.channels, shape.img_size, shape.img_size, dtype=IMG),
        x_enc=rand(n, length, shape.enc_dim, dtype=ACT),
        pos_enc=rand(1, length, shape.enc_dim, dtype=PARAM, scale=0.1),
        x_vis=rand(n, keep, shape.dec_dim, dtype=ACT),
        mask_token=rand(1, 1, shape.dec_dim, dtype=PARAM, scale=0.02),
        pos_dec=rand(1, length, shape.dec_dim, dtype=PARAM, scale=0.1),
        pred=rand(n, length, shape.patch_dim, dtype=ACT),
        # a decoder block's residual add + LayerNorm (the decoder holds most of the step's norm traffic):
        # fp32 stream, bf16 branch (a Linear's output), fp32 LayerNorm parameters
        stream=rand(n, length + 1, shape.dec_dim, dtype=PARAM),
        branch=rand(n, length + 1, shape.dec_dim, dtype=ACT),
        ln_weight=rand(shape.dec_dim, dtype=PARAM, scale=0.1) + 1.0,
        ln_bias=rand(shape.dec_dim, dtype=PARAM, scale=0.1),
        # a decoder MLP's fc1 output without its bias (bf16 under autocast) and the fp32 bias
        fc1_out=rand(n, length + 1, 4 * shape.dec_dim, dtype=ACT),
        fc1_bias=rand(4 * shape.dec_dim, dtype=PARAM, scale=0.1),
    )


def make_cases(shape: Shape, t: dict) -> list[Case]:
    n, length, keep, p = shape.batch, shape.length, shape.keep, shape.patch
    ids = 8  # int64
    masked = 1 - keep / length  # the loss reads only masked rows
    img_bytes = t["imgs"].numel() * _size(IMG)
    patch_bytes = n * keep * shape.patch_dim * _size(IMG)
    enc_in, enc_out = n * keep * shape.enc_dim * _size(ACT), n * keep * shape.enc_dim * _size(PARAM)
    dec_vis, dec_out = n * keep * shape.dec_dim * _size(ACT), n * length * shape.dec_dim * _size(PARAM)
    pred_bytes = t["pred"].numel() * _size(ACT)
    norm_elems, norm_rows = t["stream"].numel(), t["stream"].numel() // shape.dec_dim
    mlp_elems = t["fc1_out"].numel()
    loss_read = int(masked * (pred_bytes + img_bytes)) + n * length * _size(PARAM)

    def three(x, ops):
        patches = ops.gather_patches(x["imgs"], x["ids_keep"], p)  # [N, K, p*p*C], imgs need no grad
        full = ops.insert_mask_tokens(x["x_vis"], x["mask_token"], x["ids_restore"], x["pos_dec"])  # [N, L, Dd]
        loss = ops.masked_mse_loss(x["pred"], x["imgs"], x["mask"], p)
        return patches, full, loss

    return [
        Case("random_masking", t, [], lambda x, ops: ops.random_masking(x["noise"], MASK_RATIO),
             bytes_fwd=n * length * (4 + ids + 4) + n * keep * ids, bytes_bwd=0),
        Case("gather_patches", t, ["imgs"], lambda x, ops: (ops.gather_patches(x["imgs"], x["ids_keep"], p),),
             bytes_fwd=2 * patch_bytes + n * keep * ids, bytes_bwd=patch_bytes + img_bytes + n * keep * ids),
        Case("gather_tokens", t, ["x_enc"],
             lambda x, ops: (ops.gather_tokens(x["x_enc"], x["ids_keep"], x["pos_enc"]),),
             bytes_fwd=enc_in + enc_out + t["pos_enc"].numel() * 4 + n * keep * ids,
             bytes_bwd=enc_out + n * length * shape.enc_dim * _size(ACT) + n * keep * ids),
        Case("insert_mask_tokens", t, ["x_vis", "mask_token"],
             lambda x, ops: (ops.insert_mask_tokens(x["x_vis"], x["mask_token"], x["ids_restore"], x["pos_dec"]),),
             bytes_fwd=dec_vis + dec_out + t["pos_dec"].numel() * 4 + n * length * ids,
             bytes_bwd=dec_out + dec_vis + n * length * ids),
        Case("masked_mse_loss", t, ["pred"],
             lambda x, ops: (ops.masked_mse_loss(x["pred"], x["imgs"], x["mask"], p),),
             bytes_fwd=loss_read, bytes_bwd=loss_read + pred_bytes),
        # forward: read stream (fp32) + branch, write h (fp32) + y (bf16), a mean and 1/std per row; backward: read
        # dy, dh, h, write d stream (fp32) + d branch (bf16) (the weight/bias partials are per program: small)
        Case("add_layer_norm", t, ["stream", "branch", "ln_weight", "ln_bias"],
             lambda x, ops: ops.add_layer_norm(x["stream"], x["branch"], x["ln_weight"], x["ln_bias"], 1e-6, ACT),
             bytes_fwd=norm_elems * (4 + 2 + 4 + 2) + norm_rows * 8,
             bytes_bwd=norm_elems * (2 + 4 + 4 + 4 + 2) + norm_rows * 8),
        # forward: read x, write y (bf16); backward: read dy and x, write dx (the bias partials are per program).
        # The torch baselines run the op's reference (x + bias and GELU in fp32, one rounding): the model's own
        # torch path adds the bias in addmm's epilogue instead; e2e's fast-eager times that one (and
        # fast-eager-fusedgelu the kernel).
        Case("bias_gelu", t, ["fc1_out", "fc1_bias"],
             lambda x, ops: (ops.bias_gelu(x["fc1_out"], x["fc1_bias"]),),
             bytes_fwd=mlp_elems * (2 + 2), bytes_bwd=mlp_elems * (2 + 2 + 2)),
        Case("three_ops", t, ["x_vis", "mask_token", "pred"], three,
             bytes_fwd=2 * patch_bytes + n * keep * ids + dec_vis + dec_out + n * length * ids + loss_read,
             bytes_bwd=dec_out + dec_vis + n * length * ids + loss_read + pred_bytes),
    ]


class Impl:
    """An implementation as an ops namespace: the seven functions with the public signatures.
    `compiled`: the whole case is wrapped in one torch.compile region (the reference's best case)."""

    def __init__(self, name: str, functions: dict[str, Callable], compiled: bool = False):
        self.name = name
        self.compiled = compiled
        for key, fn in functions.items():
            setattr(self, key, fn)


OPS = ("random_masking", "gather_patches", "gather_tokens", "insert_mask_tokens", "masked_mse_loss", "add_layer_norm",
       "bias_gelu")
EAGER = Impl("torch eager", {op: getattr(reference, op) for op in OPS})


def implementations(device: torch.device, compile_reference: bool) -> list[Impl]:
    impls = [EAGER]
    if compile_reference:
        impls.append(Impl("torch.compile", {op: getattr(reference, op) for op in OPS}, compiled=True))
    for backend in ("triton", "cuda"):
        if fk.dispatch.unavailable_reason(backend, device) is None:
            impls.append(Impl(backend, {op: _bound(op, backend) for op in OPS}))
    return impls


def _bound(op: str, backend: str) -> Callable:
    fn = getattr(fk, op)
    return lambda *args: fn(*args, backend=backend)
