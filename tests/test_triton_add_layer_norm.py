"""Triton add_layer_norm (residual add + LayerNorm, output in the next Linear's dtype) against the references.

h is data movement plus one add: it must equal the torch reference bit for bit. y and every gradient are
arithmetic: the kernel's error against fp64 may be at most twice the torch reference's error in the same
dtypes (flash-attention's rule, as test_triton_loss), plus a few fp32 ulps of the largest value.
"""

import pytest
import torch
from _triton_helpers import assert_close_to_fp64, randn, requires_triton

import fastmae_kernels as fk
from fastmae_kernels import reference

pytestmark = requires_triton
FP32_EPS = torch.finfo(torch.float32).eps
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (x dtype, branch dtype or None, output dtype): where the model calls it
DTYPE_CASES = [
    (F32, BF16, BF16),  # bf16 autocast: fp32 residual stream, bf16 Linear output, bf16 input to the next Linear
    (F32, None, BF16),  # a stack's first norm under autocast (no residual add before it)
    (F32, F32, F32),  # fp32 training
    (F32, None, F32),
    (BF16, BF16, BF16),  # bf16 weights (--precision bf16-pure)
    (F16, F16, F16),
]
SHAPES = [(3, 37, 65), (2, 50, 768), (1, 9, 1280), (5, 3)]  # odd rows and widths, ViT-B/H widths, 2-D input


def _inputs(shape, x_dtype, branch_dtype, seed):
    dim = shape[-1]
    x = randn(*shape, dtype=x_dtype, seed=seed, scale=1.5, shift=0.3)  # a mean and spread per row to remove
    branch = None if branch_dtype is None else randn(*shape, dtype=branch_dtype, seed=seed + 1)
    weight = randn(dim, seed=seed + 2, scale=0.5, shift=1.0)
    bias = randn(dim, seed=seed + 3, scale=0.2)
    return x, branch, weight, bias


def _run(fn, x, branch, weight, bias, out_dtype, grad_h, grad_y, cast=None):
    """-> (h, y, grads of x, branch, weight, bias); the inputs are cast to `cast` first (the fp64 reference)."""
    leaves = [None if t is None else (t if cast is None else t.to(cast)).detach().requires_grad_() for t in
              (x, branch, weight, bias)]
    h, y = fn(*leaves, 1e-6, out_dtype if cast is None else cast)
    total = (y.double() * grad_y).sum()
    if grad_h is not None:
        total = total + (h.double() * grad_h).sum()
    total.backward()
    return h.detach(), y.detach(), [None if t is None else t.grad for t in leaves]


def _triton(*args):
    return fk.add_layer_norm(*args, backend="triton")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_dtype, branch_dtype, out_dtype", DTYPE_CASES)
@pytest.mark.parametrize("h_used", [True, False])  # h feeds the next residual add, or (a stack's last norm) not
def test_add_layer_norm_matches_references(shape, x_dtype, branch_dtype, out_dtype, h_used):
    x, branch, weight, bias = _inputs(shape, x_dtype, branch_dtype, seed=len(shape) + shape[-1])
    grad_y = randn(*shape, dtype=torch.float64, seed=7).to(out_dtype).double()  # representable in y's dtype
    h_dtype = x_dtype if branch is None else torch.promote_types(x_dtype, branch_dtype)
    grad_h = randn(*shape, dtype=torch.float64, seed=8).to(h_dtype).double() if h_used else None

    got = _run(_triton, x, branch, weight, bias, out_dtype, grad_h, grad_y)
    same = _run(reference.add_layer_norm, x, branch, weight, bias, out_dtype, grad_h, grad_y)
    exact = _run(reference.add_layer_norm, x, branch, weight, bias, out_dtype, grad_h, grad_y, cast=torch.float64)

    assert torch.equal(got[0], same[0]) and got[0].dtype == h_dtype  # h: the add, bit for bit
    assert_close_to_fp64(got[1], same[1], exact[1], out_dtype, "y")
    for name, g, s, e, leaf in zip(("x", "branch", "weight", "bias"), got[2], same[2], exact[2],
                                   (x, branch, weight, bias)):
        if leaf is None:
            assert g is None
            continue
        assert g is not None and g.abs().sum() > 0, name
        assert_close_to_fp64(g, s, e, leaf.dtype, f"d{name}")


def test_add_layer_norm_output_only_on_the_residual():
    """y unused (only h feeds on): the gradient reaching x and the branch is h's own, cast to their dtypes."""
    x, branch, weight, bias = _inputs((4, 33), F32, BF16, seed=3)
    x.requires_grad_(), branch.requires_grad_()
    h, _ = fk.add_layer_norm(x, branch, weight, bias, out_dtype=BF16, backend="triton")
    g = randn(4, 33, seed=4)
    h.backward(g)
    assert torch.equal(x.grad, g) and torch.equal(branch.grad, g.to(BF16))


def test_add_layer_norm_strided_inputs_and_no_rows():
    """A strided x (the decoder's tokens without the cls row) works; zero rows give empty outputs."""
    full = randn(3, 10, 48, seed=5)
    x, branch = full[:, 1:], randn(3, 9, 48, seed=6)
    weight, bias = randn(48, seed=7), randn(48, seed=8)
    h, y = fk.add_layer_norm(x, branch, weight, bias, backend="triton")
    want_h, want_y = reference.add_layer_norm(x, branch, weight, bias, 1e-6, F32)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(y, want_y, rtol=0, atol=16 * FP32_EPS * want_y.abs().max().item())
    empty = randn(0, 48, seed=9).requires_grad_()
    h, y = fk.add_layer_norm(empty, empty.detach().clone(), weight, bias, backend="triton")
    assert h.shape == y.shape == (0, 48)


def test_add_layer_norm_weight_gradients_are_deterministic():
    """Weight and bias gradients are per-program partials summed in a fixed order: the same bits every run."""
    x, branch, weight, bias = _inputs((6, 41, 96), F32, BF16, seed=11)
    grads = []
    for _ in range(2):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        _, y = fk.add_layer_norm(x, branch, w, b, out_dtype=BF16, backend="triton")
        y.float().pow(2).sum().backward()
        grads.append((w.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_add_layer_norm_traces_as_one_op_with_its_backward():
    """torch.compile sees the op and its backward as nodes (fakes and autograd registered, no graph break)."""
    x, branch, weight, bias = _inputs((2, 17, 64), F32, BF16, seed=12)

    def step(x, branch, weight, bias):
        h, y = fk.add_layer_norm(x, branch, weight, bias, out_dtype=BF16, backend="triton")
        return (h * 0.5).sum() + y.float().pow(2).sum()

    leaves = [t.clone().requires_grad_() for t in (x, branch, weight, bias)]
    eager = [t.clone().requires_grad_() for t in (x, branch, weight, bias)]
    torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves).backward()
    step(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.equal(a.grad, b.grad)


def test_add_layer_norm_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom op (torch.library.opcheck)."""
    from fastmae_kernels.triton_ops.add_layer_norm import add_layer_norm_op

    x, branch, weight, bias = _inputs((3, 5, 40), F32, BF16, seed=13)
    for b in (branch, None):
        args = (x.requires_grad_(), None if b is None else b.requires_grad_(), weight.requires_grad_(),
                bias.requires_grad_(), 1e-6, BF16)
        torch.library.opcheck(add_layer_norm_op, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_layer_norm_rejects_bad_input(backend):
    x, branch, weight, bias = _inputs((2, 5, 8), F32, F32, seed=14)
    with pytest.raises(ValueError, match="branch must have x's shape"):
        fk.add_layer_norm(x, branch[:, :4], weight, bias, backend=backend)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        fk.add_layer_norm(x, branch, weight[:7], bias, backend=backend)
    with pytest.raises(ValueError, match="eps must be > 0"):
        fk.add_layer_norm(x, branch, weight, bias, eps=0.0, backend=backend)
    with pytest.raises(ValueError, match="x must be float32"):
        fk.add_layer_norm(x.to(torch.int32), None, weight, bias, backend=backend)


def test_add_layer_norm_fp64_stays_on_the_torch_backend():
    x, branch, weight, bias = (t.double() for t in _inputs((2, 8), F32, F32, seed=15))
    with pytest.raises(ValueError, match="use backend='torch'"):
        fk.add_layer_norm(x, branch, weight, bias, backend="triton")
    h, y = fk.add_layer_norm(x, branch, weight, bias, backend="torch")
    assert h.dtype == y.dtype == torch.float64 and torch.equal(h, x + branch)


@pytest.mark.parametrize("half", [BF16, F16])
def test_reference_norms_half_inputs_with_fp32_weights_in_fp32(half):
    """bf16/fp16 h with fp32 weights, outside autocast: CUDA's layer_norm refuses the mix (the CPU's accepts it),
    so the reference normalises in fp32 and rounds y once, to out_dtype, on every device (found on an H200)."""
    x, branch = randn(4, 7, 96, dtype=half, seed=1), randn(4, 7, 96, dtype=half, seed=2)
    weight, bias = 1 + 0.1 * randn(96, seed=3), 0.1 * randn(96, seed=4)
    h, y = reference.add_layer_norm(x, branch, weight, bias, 1e-6, F32)
    want = torch.nn.functional.layer_norm((x + branch).float(), (96,), weight, bias, 1e-6)
    assert h.dtype == half and torch.equal(h, x + branch)
    assert y.dtype == F32 and torch.equal(y, want)  # not rounded through the half dtype on the way


@pytest.mark.parametrize("branch_dtype", [BF16, None])
@pytest.mark.parametrize("h_used", [True, False])
def test_eager_calls_skip_the_custom_op_with_the_same_bits(branch_dtype, h_used):
    """Eager calls run the launchers through an autograd.Function (less host time per call); the custom op
    (what torch.compile traces and dispatch modes see) must give the same bits, forward and every gradient."""
    from fastmae_kernels.triton_ops.add_layer_norm import add_layer_norm_op

    def through_custom_op(x, branch, weight, bias, eps, out_dtype):
        h, y, _, _ = add_layer_norm_op(x, branch, weight, bias, eps, out_dtype)
        return (x if branch is None else h), y

    x, branch, weight, bias = _inputs((3, 21, 48), F32, branch_dtype, seed=15)
    grad_y = randn(3, 21, 48, dtype=torch.float64, seed=16).to(BF16).double()
    grad_h = randn(3, 21, 48, dtype=torch.float64, seed=17).to(F32).double() if h_used else None
    eager = _run(_triton, x, branch, weight, bias, BF16, grad_h, grad_y)
    op = _run(through_custom_op, x, branch, weight, bias, BF16, grad_h, grad_y)
    for a, b in zip([*eager[:2], *eager[2]], [*op[:2], *op[2]]):  # h, y, then the grads of x, branch, w, b
        assert (a is None and b is None) or torch.equal(a, b)
    y = _triton(*(t.detach().requires_grad_() if t is not None else None for t in (x, branch, weight, bias)),
                1e-6, BF16)[1]
    assert type(y.grad_fn).__name__ == "_EagerAddLayerNormBackward"
