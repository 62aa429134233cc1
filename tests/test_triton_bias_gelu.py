"""Triton bias_gelu (the MLP's fc1 bias + exact GELU, bias gradient in the same backward pass) against the
references.

Every output is arithmetic: the kernel's error against fp64 may be at most twice the torch reference's error
in the same dtypes (flash-attention's rule, as test_triton_loss), plus a few fp32 ulps of the largest value.
"""

import pytest
import torch
from _triton_helpers import assert_close_to_fp64, randn, requires_triton

import fastmae_kernels as fk
from fastmae_kernels import reference

pytestmark = requires_triton
FP32_EPS = torch.finfo(torch.float32).eps
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (x dtype, bias dtype): where the model calls it
DTYPE_CASES = [
    (BF16, F32),  # bf16 autocast: the bf16 GEMM output, the fp32 bias parameter
    (F32, F32),  # fp32 training
    (BF16, BF16),  # bf16 weights (--precision bf16-pure)
    (F16, F16),
    (F16, F32),
]
# odd rows and widths; 300 = one full 256-column block plus a partial one; 485 rows = several row tiles per
# backward program; ViT-B's MLP width; a 1-D input
SHAPES = [(3, 37, 65), (5, 97, 300), (2, 50, 3072), (7,)]


def _inputs(shape, x_dtype, bias_dtype, seed):
    x = randn(*shape, dtype=x_dtype, seed=seed, scale=2.0, shift=-0.3)  # both tails of GELU and its knee
    bias = randn(shape[-1], dtype=bias_dtype, seed=seed + 1, scale=0.5)
    return x, bias


def _run(fn, x, bias, grad_y, cast=None):
    """-> (y, dx, d bias); the inputs are cast to `cast` first (the fp64 reference)."""
    leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in (x, bias)]
    y = fn(*leaves)
    (y.double() * grad_y).sum().backward()
    return y.detach(), leaves[0].grad, leaves[1].grad


def _triton(x, bias):
    return fk.bias_gelu(x, bias, backend="triton")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_dtype, bias_dtype", DTYPE_CASES)
def test_bias_gelu_matches_references(shape, x_dtype, bias_dtype):
    x, bias = _inputs(shape, x_dtype, bias_dtype, seed=len(shape) + shape[-1])
    grad_y = randn(*shape, dtype=torch.float64, seed=7).to(x_dtype).double()  # representable in y's dtype

    got = _run(_triton, x, bias, grad_y)
    same = _run(reference.bias_gelu, x, bias, grad_y)
    exact = _run(reference.bias_gelu, x, bias, grad_y, cast=torch.float64)

    for name, g, s, e, dtype in zip(("y", "dx", "dbias"), got, same, exact, (x_dtype, x_dtype, bias_dtype)):
        assert g.abs().sum() > 0, name
        assert_close_to_fp64(g, s, e, dtype, name)


def test_bias_gelu_is_the_mlp_activation():
    """In fp64 (the torch backend) the op is nn.Linear + nn.GELU, value and gradients: the same function the
    model computes on the reference path."""
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(24, 40).double()
    inp = torch.randn(3, 5, 24, dtype=torch.float64)
    fused = fk.bias_gelu(torch.nn.functional.linear(inp, fc1.weight), fc1.bias, backend="torch")
    fused_grads = torch.autograd.grad(fused.pow(2).sum(), (fc1.weight, fc1.bias))
    plain = torch.nn.GELU()(fc1(inp))
    plain_grads = torch.autograd.grad(plain.pow(2).sum(), (fc1.weight, fc1.bias))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bias_gelu_strided_input_and_no_rows():
    """A strided x works; zero rows give an empty output and a zero bias gradient."""
    full = randn(40, 6, seed=5)
    x, bias = full.t(), randn(40, seed=6)  # [6, 40], not contiguous
    torch.testing.assert_close(fk.bias_gelu(x, bias, backend="triton"), reference.bias_gelu(x, bias),
                               rtol=0, atol=16 * FP32_EPS * 4)
    empty = randn(0, 40, seed=7).requires_grad_()
    b = bias.clone().requires_grad_()
    y = fk.bias_gelu(empty, b, backend="triton")
    assert y.shape == (0, 40)
    y.sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b)) and empty.grad.shape == (0, 40)


def test_bias_gelu_bias_gradient_is_deterministic():
    """The bias gradient is per-program partials summed in a fixed order: the same bits every run."""
    x, bias = _inputs((6, 97, 300), BF16, F32, seed=11)
    grads = []
    for _ in range(2):
        b = bias.clone().requires_grad_()
        fk.bias_gelu(x, b, backend="triton").float().pow(2).sum().backward()
        grads.append(b.grad)
    assert torch.equal(grads[0], grads[1])


def test_bias_gelu_traces_as_one_op_with_its_backward():
    """torch.compile sees the op and its backward as nodes (fakes and autograd registered, no graph break)."""
    x, bias = _inputs((2, 17, 64), BF16, F32, seed=12)

    def step(x, bias):
        return fk.bias_gelu(x, bias, backend="triton").float().pow(2).sum()

    leaves = [t.clone().requires_grad_() for t in (x, bias)]
    eager = [t.clone().requires_grad_() for t in (x, bias)]
    torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves).backward()
    step(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.equal(a.grad, b.grad)


def test_bias_gelu_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom op (torch.library.opcheck)."""
    from fastmae_kernels.triton_ops.bias_gelu import bias_gelu_op

    x, bias = _inputs((3, 5, 40), BF16, F32, seed=13)
    torch.library.opcheck(bias_gelu_op, (x.requires_grad_(), bias.requires_grad_()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_gelu_rejects_bad_input(backend):
    x, bias = _inputs((2, 5, 8), F32, F32, seed=14)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        fk.bias_gelu(x, bias[:7], backend=backend)
    with pytest.raises(ValueError, match="x must be float32"):
        fk.bias_gelu(x.to(torch.int32), bias, backend=backend)
    with pytest.raises(ValueError, match="at least one dimension"):
        fk.bias_gelu(x[0, 0, 0], bias, backend=backend)


def test_bias_gelu_fp64_stays_on_the_torch_backend():
    x, bias = (t.double() for t in _inputs((2, 8), F32, F32, seed=15))
    with pytest.raises(ValueError, match="use backend='torch'"):
        fk.bias_gelu(x, bias, backend="triton")
    y = fk.bias_gelu(x, bias, backend="torch")
    assert y.dtype == torch.float64 and torch.equal(y, torch.nn.functional.gelu(x + bias))


@pytest.mark.parametrize("x_dtype", [BF16, F32])
def test_eager_calls_skip_the_custom_op_with_the_same_bits(x_dtype):
    """Eager calls run the launchers through an autograd.Function (less host time per call); the custom op
    (what torch.compile traces and dispatch modes see) must give the same bits, forward and both gradients."""
    from fastmae_kernels.triton_ops.bias_gelu import bias_gelu_op

    x, bias = _inputs((4, 19, 72), x_dtype, F32, seed=21)
    grad_y = randn(4, 19, 72, dtype=torch.float64, seed=22).to(x_dtype).double()
    eager = _run(lambda x, b: fk.bias_gelu(x, b, backend="triton"), x, bias, grad_y)
    op = _run(bias_gelu_op, x, bias, grad_y)
    for a, b in zip(eager, op):  # y, dx, d bias
        assert torch.equal(a, b)
    y = fk.bias_gelu(x.detach().requires_grad_(), bias, backend="triton")
    assert type(y.grad_fn).__name__ == "_EagerBiasGeluBackward"
