"""The "cuda" backend: the five MAE ops as CUDA C++ kernels (csrc/, built into `fastmae_kernels._C`); add_layer_norm
and bias_gelu have no C++ version and run their Triton kernels (Triton ships with CUDA torch), else the torch
references.

The C++ library registers the ops as `torch.ops.fastmae_cuda.*` (TORCH_LIBRARY); this module adds their
fake (meta) kernels and their autograd, so torch.compile traces each op as one node, forward and backward.
Inputs arrive validated by `fastmae_kernels.checks`; this backend adds its own dtype rule (fp32/bf16/fp16
for the kernels; fp64 raises, use backend="torch"). The C++ ops also accept CPU tensors, running the
kernels' functors in a host loop: that is for tests without a GPU, and `unavailable_reason` never offers
this backend for CPU tensors.
"""

import logging

import torch

from fastmae_kernels import checks, reference
from fastmae_kernels.dispatch import device_smoke_test
from fastmae_kernels.reference import num_kept

try:
    from fastmae_kernels import _C  # noqa: F401  (loading it registers torch.ops.fastmae_cuda)

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built (no CUDA torch / no nvcc at install time, or FASTMAE_BUILD_CUDA=0)
    IMPORT_ERROR = exc

try:  # imported here, not inside the op: the op may be called while torch.compile traces
    from fastmae_kernels.triton_ops import _common as _triton_common
    from fastmae_kernels.triton_ops.add_layer_norm import add_layer_norm as _triton_add_layer_norm
    from fastmae_kernels.triton_ops.bias_gelu import bias_gelu as _triton_bias_gelu
except ImportError:  # no Triton: add_layer_norm and bias_gelu run the torch references
    _triton_common = _triton_add_layer_norm = _triton_bias_gelu = None
_fallbacks_logged: set[str] = set()
log = logging.getLogger("fastmae_kernels")

_smoke: dict[int, str | None] = {}  # device index -> None when a tiny op ran correctly there


def _run_smoke_op(device: torch.device) -> bool:
    x = torch.arange(24, dtype=torch.float32, device=device).view(1, 6, 4)  # [1, 6, 4]
    ids = torch.tensor([[4, 1]], device=device)
    got = torch.ops.fastmae_cuda.gather_tokens(x, ids, None)
    return torch.equal(got.cpu(), x.cpu()[:, [4, 1]])


def _smoke_test(device: torch.device) -> str | None:
    """Runs one tiny op on `device`: catches a build without code for this card ("no kernel image")."""
    return device_smoke_test(
        _smoke, device, _run_smoke_op, wrong="a smoke test of the CUDA extension gave wrong values on this device",
        failed="the CUDA extension does not run on this device: {error}",
    )


def unavailable_reason(device: torch.device) -> str | None:
    """None when the CUDA kernels can run on tensors of `device`, else one line saying why not."""
    device = torch.device(device)
    if IMPORT_ERROR is not None:
        return f"the CUDA extension fastmae_kernels._C is not built or does not load ({IMPORT_ERROR})"
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA devices, not on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _smoke_test(device)


def _check_dtypes(op: str, **tensors: torch.Tensor | None) -> None:
    checks.check_kernel_dtypes("cuda", op, **tensors)


def _promote(*dtypes: torch.dtype | None) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        if d is not None:
            out = torch.promote_types(out, d)
    return out


def _register() -> None:
    """Fake kernels and autograd for the C++ ops (called once, when the extension loaded)."""
    lib = "fastmae_cuda::"
    fake = torch.library.register_fake

    @fake(lib + "random_masking")
    def _(noise, mask_ratio):
        n, length = noise.shape
        keep = num_kept(length, mask_ratio)
        return noise.new_empty((n, keep), dtype=torch.int64), noise.new_empty((n, length), dtype=torch.int64), \
            noise.new_empty((n, length))

    @fake(lib + "gather_patches")
    def _(imgs, ids_keep, patch_size):
        return imgs.new_empty((imgs.shape[0], ids_keep.shape[1], patch_size * patch_size * imgs.shape[1]))

    @fake(lib + "gather_patches_backward")
    def _(grad, ids_keep, patch_size, channels, height, width):
        return grad.new_empty((grad.shape[0], channels, height, width))

    @fake(lib + "gather_tokens")
    def _(x, ids_keep, pos_embed):
        dtype = _promote(x.dtype, None if pos_embed is None else pos_embed.dtype)
        return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]), dtype=dtype)

    @fake(lib + "gather_tokens_backward")
    def _(grad, ids_keep, length, dtype):
        return grad.new_empty((grad.shape[0], length, grad.shape[2]), dtype=dtype)

    @fake(lib + "insert_mask_tokens")
    def _(x_vis, mask_token, ids_restore, pos_embed):
        dtype = _promote(x_vis.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)
        return x_vis.new_empty((x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2]), dtype=dtype)

    @fake(lib + "insert_mask_tokens_backward")
    def _(grad, ids_restore, keep, x_dtype, mid_dtype, token_dtype):
        n, _, dim = grad.shape
        return grad.new_empty((n, keep, dim), dtype=x_dtype), grad.new_empty((1, 1, dim), dtype=token_dtype)

    @fake(lib + "masked_mse_loss")
    def _(pred, imgs, mask, patch_size, norm_pix, eps):
        return pred.new_empty((), dtype=torch.float32)

    @fake(lib + "masked_mse_loss_backward")
    def _(grad, pred, imgs, mask, patch_size, norm_pix, eps):
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    ops = torch.ops.fastmae_cuda

    # gather_patches: d imgs = each kept patch's row, zeros elsewhere.
    def patches_setup(ctx, inputs, output):
        imgs, ids_keep, patch_size = inputs
        ctx.save_for_backward(ids_keep)
        ctx.geometry = (patch_size, imgs.shape[1], imgs.shape[2], imgs.shape[3])

    def patches_backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        return ops.gather_patches_backward(grad, ids_keep, *ctx.geometry), None, None

    torch.library.register_autograd(lib + "gather_patches", patches_backward, setup_context=patches_setup)

    # gather_tokens: d x = the kept rows' gradient rounded to x's dtype (the reference's cast), zeros elsewhere.
    def tokens_setup(ctx, inputs, output):
        x, ids_keep, pos_embed = inputs
        ctx.save_for_backward(ids_keep)
        ctx.length = x.shape[1]
        ctx.dtypes = (x.dtype, None if pos_embed is None else pos_embed.dtype)

    def tokens_backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        x_dtype, pos_dtype = ctx.dtypes
        grad_x = grad_pos = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.gather_tokens_backward(grad, ids_keep, ctx.length, x_dtype)  # [N, L, D]
        if ctx.needs_input_grad[2]:
            # The table is shared by the batch: per-sample rows, then one deterministic sum over N (the
            # reference's expand-backward). Rare (MAE's tables are frozen), so left unfused.
            grad_pos = ops.gather_tokens_backward(grad, ids_keep, ctx.length, pos_dtype).sum(dim=0, keepdim=True)
        return grad_x, None, grad_pos

    torch.library.register_autograd(lib + "gather_tokens", tokens_backward, setup_context=tokens_setup)

    # insert_mask_tokens: d x_vis = the kept rows; d mask_token = the sum of the masked rows (fixed order).
    def insert_setup(ctx, inputs, output):
        x_vis, mask_token, ids_restore, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.keep = x_vis.shape[1]
        ctx.dtypes = (x_vis.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)

    def insert_backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        x_dtype, token_dtype, pos_dtype = ctx.dtypes
        grad_x = grad_token = grad_pos = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            mid = torch.promote_types(x_dtype, token_dtype)  # torch.cat's dtype
            grad_x, grad_token = ops.insert_mask_tokens_backward(grad, ids_restore, ctx.keep, x_dtype, mid, token_dtype)
            grad_x = grad_x if ctx.needs_input_grad[0] else None
            grad_token = grad_token if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[3]:
            grad_pos = grad.to(pos_dtype).sum(dim=0, keepdim=True)  # [1, L, D], the reference's expand-backward
        return grad_x, grad_token, None, grad_pos

    torch.library.register_autograd(lib + "insert_mask_tokens", insert_backward, setup_context=insert_setup)

    # masked_mse_loss: d pred recomputes the target (no fp32 [N, L, P] target kept between passes).
    def loss_setup(ctx, inputs, output):
        pred, imgs, mask, patch_size, norm_pix, eps = inputs
        ctx.save_for_backward(pred, imgs, mask)
        ctx.args = (patch_size, norm_pix, eps)

    def loss_backward(ctx, grad):
        pred, imgs, mask = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError(
                "fastmae_kernels.masked_mse_loss (cuda): not differentiable w.r.t. imgs or mask "
                "(the official MAE never needs it); detach them or use backend='torch'"
            )
        return ops.masked_mse_loss_backward(grad, pred, imgs, mask, *ctx.args), None, None, None, None, None

    torch.library.register_autograd(lib + "masked_mse_loss", loss_backward, setup_context=loss_setup)


if IMPORT_ERROR is None:
    _register()


def random_masking(noise: torch.Tensor, mask_ratio: float):
    """noise [N, L] -> (ids_keep [N, K], ids_restore [N, L], mask [N, L] in noise's dtype)."""
    return torch.ops.fastmae_cuda.random_masking(noise.detach(), float(mask_ratio))


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [N, C, H, W], ids_keep [N, K] -> [N, K, p*p*C]."""
    _check_dtypes("gather_patches", imgs=imgs)
    return torch.ops.fastmae_cuda.gather_patches(imgs, ids_keep, int(patch_size))


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, L, D], ids_keep [N, K], pos_embed [1, L, D] -> [N, K, D] in promote(x, pos_embed)."""
    _check_dtypes("gather_tokens", x=x, pos_embed=pos_embed)
    return torch.ops.fastmae_cuda.gather_tokens(x, ids_keep, pos_embed)


def insert_mask_tokens(
    x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    """x_vis [N, K, D], mask_token [1, 1, D], ids_restore [N, L], pos_embed [1, L, D] -> [N, L, D]."""
    _check_dtypes("insert_mask_tokens", x_vis=x_vis, mask_token=mask_token, pos_embed=pos_embed)
    return torch.ops.fastmae_cuda.insert_mask_tokens(x_vis, mask_token, ids_restore, pos_embed)


def masked_mse_loss(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """pred [N, L, P], imgs [N, C, H, W], mask [N, L] -> fp32 scalar (the official loss)."""
    _check_dtypes("masked_mse_loss", pred=pred, imgs=imgs)
    return torch.ops.fastmae_cuda.masked_mse_loss(pred, imgs, mask, int(patch_size), bool(norm_pix), float(eps))


def fused_kernels_reason(device: torch.device) -> str | None:
    """None when this backend's add_layer_norm and bias_gelu run their Triton kernels on `device`, else why they
    run the torch references instead (Triton missing, or unable to compile there: fastmae_kernels.triton_ops)."""
    if _triton_common is None:
        return "Triton is not installed"
    return _triton_common.unavailable_reason(torch.device(device))


def _use_triton(op: str, device: torch.device) -> bool:
    reason = fused_kernels_reason(device)
    if reason is not None and op not in _fallbacks_logged:
        _fallbacks_logged.add(op)
        log.warning("fastmae_kernels.%s (cuda backend) runs the torch reference: %s", op, reason)
    return reason is None


def add_layer_norm(
    x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, branch [*, D] -> (h, y): the Triton kernel (no C++ version of this op), or the reference where Triton
    is missing or cannot compile (logged once)."""
    if not _use_triton("add_layer_norm", x.device):
        return reference.add_layer_norm(x, branch, weight, bias, eps, out_dtype)
    return _triton_add_layer_norm(x, branch, weight, bias, eps, out_dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [*, F], bias [F] -> GELU(x + bias): the Triton kernel (no C++ version), or the reference where Triton is
    missing or cannot compile (logged once)."""
    if not _use_triton("bias_gelu", x.device):
        return reference.bias_gelu(x, bias)
    return _triton_bias_gelu(x, bias)
