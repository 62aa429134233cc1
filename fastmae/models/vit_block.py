"""Plain pre-norm ViT block with the timm / official MAE parameter names (norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2), attention through torch's scaled_dot_product_attention.

`rows` (optional) asks for the block's output at some tokens only: keys and values still come from every
token, queries and everything after attention (projection, residuals, MLP) run on those rows alone. The MAE
decoder's last block uses it, since the loss reads the masked patches only.

`Block(x, rows, pending, norm_backend=...)` is the same block for a stack that fuses each LayerNorm with the
residual add before it (`LayerNorm`, through `fastmae_kernels.add_layer_norm`): it takes the residual stream and
the previous block's MLP output not yet added, and returns its own, so the add lands in the next block's first
norm (or the stack's final norm). It is still a call of the module, so hooks on blocks (FLOP counters,
wrappers) see every block. `gelu_backend=` likewise runs the MLP's fc1 bias and GELU as one op
(`Linear(x, gelu_backend=)`, through `fastmae_kernels.bias_gelu`).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmae_kernels as fk


def select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], rows [B, M] -> [B, M, C]."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same state_dict keys) that can also run the residual add before it.

    `norm(x)` is nn.LayerNorm's. `norm(x, branch, backend=b)` -> (h = x + branch, y = norm(h)) through
    `fastmae_kernels.add_layer_norm` (one kernel on the triton/cuda backends), y in the dtype the next Linear
    computes in (autocast's while autocast is on: the cast that Linear would make, done in the same pass) or, with
    `for_linear=False`, as nn.LayerNorm returns it. Both go through the module call, so hooks on the norm see
    them (wrappers that manage parameters by module hooks, FLOP counters); ZeRO-3 with every parameter
    partitioned is tested in the trainer."""

    @property
    def fusable(self) -> bool:
        """Affine over the last dimension: what add_layer_norm computes."""
        return self.weight is not None and self.bias is not None and len(self.normalized_shape) == 1

    def forward(self, x: torch.Tensor, branch: torch.Tensor | None = None, backend: str | None = None,
                for_linear: bool = True):
        if backend is None:
            if branch is not None:
                raise ValueError("LayerNorm: a branch to add needs backend= (the fused call returns (h, y))")
            return super().forward(x)
        if not self.fusable:
            raise ValueError("LayerNorm: the fused call needs an affine norm over the last dimension")
        device = x.device.type
        out_dtype = None  # h's dtype: nn.LayerNorm's output without autocast
        if torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device) if for_linear else torch.float32  # autocast's layer_norm
        return fk.add_layer_norm(x, branch, self.weight, self.bias, self.eps, out_dtype, backend=backend)


def add_norm(norm: nn.Module, x: torch.Tensor, branch: torch.Tensor | None, backend: str,
             for_linear: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = x + branch, y = norm(h)): fused when `norm` is fastmae's affine LayerNorm over the last dimension,
    else the add then the norm."""
    if isinstance(norm, LayerNorm) and norm.fusable:
        return norm(x, branch, backend=backend, for_linear=for_linear)
    h = x if branch is None else x + branch
    return h, norm(h)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) that can also apply the exact GELU after it.

    `fc(x)` is nn.Linear's. `fc(x, gelu_backend=b)` -> GELU(x W^T + bias): the GEMM without its bias, then
    `fastmae_kernels.bias_gelu` adds the bias and applies GELU in one pass (one kernel on the triton/cuda
    backends, whose backward also gives the bias gradient: no separate column sum). Inside the module call, so
    hooks on fc1 (ZeRO-3 gathering its weight and bias, FLOP counters) see it."""

    def forward(self, x: torch.Tensor, gelu_backend: str | None = None) -> torch.Tensor:
        if gelu_backend is None:
            return super().forward(x)
        if self.bias is None:
            raise ValueError("Linear: the fused GELU call needs a bias")
        return fk.bias_gelu(F.linear(x, self.weight), self.bias, backend=gelu_backend)


class Attention(nn.Module):
    """`backend`: "sdpa" (torch's scaled_dot_product_attention) or "triton" (fastmae_kernels' kernels for short
    sequences, fastmae_kernels.attention); the MAE model sets it per stack (`attn_backend`)."""

    backend = "sdpa"

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C], or [B, M, C] with the queries at `rows` [B, M] only."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)  # [B, N, 3, H, hd]
        # unbind on dim 2, then transpose: in backward autograd stacks dq, dk, dv straight into qkv's layout
        # (one write); timm's permute(2, 0, 3, 1, 4).unbind(0) stacks them as [3, B, H, N, hd] and then copies
        # that into [B, N, 3C] for the Linear's backward: one more pass over the qkv gradient per block in
        # eager mode (counted with a dispatch mode on CPU: stack + clone vs stack)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, H, N, hd]
        if rows is not None:
            # one qkv GEMM for all tokens: splitting off the M query rows would save only a third of it on
            # the N - M others, for a second launch and a strided weight slice
            q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # [B, H, M, hd]
        if self.backend == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)  # [B, H, M, hd]
        else:  # a [B, H, M, hd] view of [B, M, H, hd], as SDPA's: the reshape below is free
            x = fk.attention(q, k, v, backend=self.backend)
        return self.proj(x.transpose(1, 2).reshape(b, q.shape[2], c))


class PlainAttention(Attention):
    """timm's / the official MAE's formulation, op for op (permute then unbind): the reference MAE's."""

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            raise ValueError("the plain reference attention computes every row")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, hd]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1, exact GELU, fc2 over the tokens as one [T, C] matrix (T = all leading dimensions), the same GEMMs as
    timm's Mlp on [B, N, C]. Why flat: Inductor fuses a GEMM template's pointwise consumer into its epilogue only
    when the consumer's loop has the GEMM output's [T, hidden] shape; on [B, N, hidden] views it sees no shared
    buffer access and keeps the GELU (forward) and the GELU gradient (backward) as separate kernels, each one more
    pass over the hidden activations (compile mode max-autotune; counted with benchmarks/inductor_cuda_codegen.py
    --gemm triton, NOTES §6.11)."""

    flat_tokens = True

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as timm's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, gelu_backend: str | None = None) -> torch.Tensor:
        """x [*, C] -> [*, C]; with `gelu_backend` (a fastmae_kernels backend) fc1's bias and the GELU run as one
        op when fc1 is fastmae's Linear with a bias and act the exact GELU (else the plain modules)."""
        lead = x.shape[:-1]
        if self.flat_tokens:
            x = x.reshape(-1, x.shape[-1])  # [T, C]
        fusable = isinstance(self.fc1, Linear) and self.fc1.bias is not None
        if gelu_backend is None or not fusable or not _is_exact_gelu(self.act):
            x = self.fc2(self.act(self.fc1(x)))
        else:
            x = self.fc2(self.fc1(x, gelu_backend=gelu_backend))
        return x.view(*lead, x.shape[-1])


class PlainMlp(Mlp):
    """timm's / the official MAE's MLP as it runs there, on [B, N, C]: the reference MAE's."""

    flat_tokens = False


def _is_exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"


class Block(nn.Module):
    attention_cls = Attention
    mlp_cls = Mlp

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_layer=LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = self.attention_cls(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = self.mlp_cls(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None, pending: torch.Tensor | None = None,
                norm_backend: str | None = None, gelu_backend: str | None = None):
        """x [B, N, C] -> [B, N, C], or the output rows [B, M, C] at `rows` [B, M] (module docstring).

        With `norm_backend` (a fastmae_kernels backend) each LayerNorm runs fused with the residual add before
        it: the block's input is x + pending (pending: the previous block's MLP output, None for a stack's
        first block) and it returns (stream, MLP output) whose sum is the plain call's output, [B, N or M, C]
        each; the stack's next norm does that add. With `gelu_backend` the MLP's fc1 bias + GELU is one op
        (`Mlp`); None: nn.Linear's and nn.GELU's ops."""
        if norm_backend is None:
            if pending is not None:
                raise ValueError("Block: `pending` is for the fused call (give norm_backend)")
            attn = self.attn(self.norm1(x), rows)  # [B, N or M, C]
            x = x + attn if rows is None else select_rows(x, rows) + attn
            return x + self.mlp(self.norm2(x), gelu_backend)
        x, y = add_norm(self.norm1, x, pending, norm_backend)  # x: the block's input [B, N, C]
        attn = self.attn(y, rows)  # [B, N or M, C]
        if rows is not None:
            x = select_rows(x, rows)  # [B, M, C]
        x, y = add_norm(self.norm2, x, attn, norm_backend)
        return x, self.mlp(y, gelu_backend)


class PlainBlock(Block):
    """The reference MAE's block: timm's attention and MLP formulations, same parameters and names."""

    attention_cls = PlainAttention
    mlp_cls = PlainMlp
