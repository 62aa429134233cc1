"""attention: softmax(q k^T / sqrt(D)) v for the short sequences of MAE (50-257 tokens), forward and backward.

Why a kernel of our own: on the H200 (2026-12-04) torch's SDPA ran every ViT-B/16 attention call, the encoder's
(50 tokens, head dim 64) and the decoder's (197 tokens, head dim 32), through one cuDNN kernel tiled
64x64x64: the decoder's head dim 32 is padded to 64 in both of its matmuls, and 197 tokens to 256 rows. Its
backward took 5.6 ms and its forward 2.5 ms of a 49.5 ms compiled step, plus 1.4 ms of cuDNN's helper kernels
(dq conversion, dO.O), against a matmul floor of ~1.4 ms (benchmarks/NOTES.md §7.5). These kernels tile the
head dim at its own size (rounded up to a power of two, at least 16) and the sequence in blocks of 32-128
chosen per shape by Triton's autotuner on the card.

The math is FlashAttention-2's (Dao, 2023): the forward keeps a running max and sum per query row (online
softmax, exp2 on scores pre-scaled by log2 e) and stores the row's log-sum-exp; the backward recomputes the
probabilities from it. Two backwards, picked by `backward_kind` (FASTMAE_ATTENTION_BACKWARD):
- "split", three kernels: delta = rowsum(dO * O); dK, dV with one program per key block walking every query
  block; dQ with one program per query block walking every key block (7 products per tile pair);
- "head", one kernel with one program per head: delta, then dK, dV per key block with each tile's dQ part added
  into an fp32 scratch that the program owns (5 products per tile pair; B * H programs).
Every gradient is written by one program: no atomics, deterministic. As in FlashAttention, the probabilities
(forward) and dS (backward) are rounded to the inputs' dtype before their second matmul; everything else
accumulates in fp32.

Layouts: q [B, H, M, D], k and v [B, H, N, D] with any strides whose last is 1 (the ViT's q, k, v are views of
the qkv GEMM's output: no copy). The output and the gradients come back as [B, H, *, D] views of
[B, *, H, D] buffers, so the block's `transpose(1, 2).reshape(B, M, H * D)` is free, as after torch's SDPA.

kernels -> launchers -> two custom ops (`fastmae_triton::attention` and its backward) -> autograd; in eager
mode an autograd.Function calls the same launchers without the custom ops' dispatch.
"""

import math
import os

import torch
import triton
import triton.language as tl

from fastmae_kernels.checks import KERNEL_DTYPES
from fastmae_kernels.triton_ops._cast import round_to
from fastmae_kernels.triton_ops._common import INTERPRETED, skip_custom_op

LOG2E = 1.4426950408889634


@triton.jit
def _cast(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> DTYPE to nearest even; the interpreter truncates to bf16, so there it rounds on the bits."""
    if INTERP:
        return round_to(x, DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 inputs in full fp32 (Triton's default for them is TF32). The
    interpreter's dot gives garbage for bf16 operands (Triton 3.8): there they go in as fp32, which holds
    them exactly, so the products and the fp32 sums are the tensor cores' (up to summation order)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _program(rows, BLOCK: tl.constexpr):
    """(batch * head index, row block) of this program in a 1-D grid of B * H * cdiv(rows, BLOCK) programs: the row
    blocks of one head run next to each other (its K and V stay in L2), and B * H may exceed a CUDA grid's 65,535
    limit on its second and third dimensions."""
    blocks = tl.cdiv(rows, BLOCK)
    pid = tl.program_id(0)
    return pid // blocks, pid % blocks


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn,
    heads, q_len, kv_len, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Program (bh, i) (`_program`): query rows [i * BLOCK_M, (i + 1) * BLOCK_M) of batch bh // heads, head
    bh % heads. Writes their output rows and lse_ptr[bh, row] = the log2-sum-exp2 of their scaled scores."""
    bh, i = _program(q_len, BLOCK_M)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row_ok = rows < q_len
    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_sn + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scaled scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, kv_len, BLOCK_N):  # every block holds at least one real key: m_i turns finite at once
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        col_ok = cols < kv_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * k_sn + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = _dot(q, tl.trans(k), IEEE, INTERP) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * v_sn + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERP), v, IEEE, INTERP)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * o_sb + h * o_sh + rows[:, None] * o_sn + d[None, :],
             _cast(out, o_ptr.dtype.element_ty, INTERP), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * q_len + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _store_delta(o_base, do_base, delta_at, rows, o_sn, do_sn, q_len, d, d_ok):
    """delta[row] = sum_d O[row, d] * dO[row, d] in fp32 for `rows` of one head, stored at delta_at + row."""
    ok = (rows < q_len)[:, None] & d_ok[None, :]
    o = tl.load(o_base + rows[:, None] * o_sn + d[None, :], mask=ok, other=0.0)
    do = tl.load(do_base + rows[:, None] * do_sn + d[None, :], mask=ok, other=0.0)
    tl.store(delta_at + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=rows < q_len)


@triton.jit
def _attention_delta_kernel(
    o_ptr, do_ptr, delta_ptr, o_sb, o_sh, o_sn, do_sb, do_sh, do_sn, heads, q_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[bh, row] = sum_d O[row, d] * dO[row, d] in fp32: the softmax backward's row term."""
    bh, i = _program(q_len, BLOCK_M)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    _store_delta(o_ptr + b * o_sb + h * o_sh, do_ptr + b * do_sb + h * do_sh, delta_ptr + bh.to(tl.int64) * q_len,
                 i * BLOCK_M + tl.arange(0, BLOCK_M), o_sn, do_sn, q_len, d, d < head_dim)


@triton.jit
def _dkdv_tile(q_base, do_base, stats_at, lse_ptr, delta_ptr, rows, q_sn, do_sn, q_len, k, v, d, d_ok, col_ok, dk, dv,
               qk_scale, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """One query block `rows` against one key block (k, v [BLOCK_N, BLOCK_D]): P recomputed from the row lse,
    dV += P^T dO, dS = P * (dO V^T - delta) rounded to the inputs' dtype, dK += dS^T Q (unscaled).
    -> (dk, dv, ds [BLOCK_M, BLOCK_N]); the one-program-per-head backward also takes dS K from ds."""
    row_ok = rows < q_len
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + rows[:, None] * q_sn + d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(do_base + rows[:, None] * do_sn + d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + stats_at + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + stats_at + rows, mask=row_ok, other=0.0)
    s = _dot(q, tl.trans(k), IEEE, INTERP) * qk_scale  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s - lse[:, None])
    p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
    dv += _dot(tl.trans(_cast(p, do.dtype, INTERP)), do, IEEE, INTERP)  # [BLOCK_N, BLOCK_D]
    dp = _dot(do, tl.trans(v), IEEE, INTERP)  # [BLOCK_M, BLOCK_N]
    ds = _cast(p * (dp - delta[:, None]), q.dtype, INTERP)
    dk += _dot(tl.trans(ds), q, IEEE, INTERP)
    return dk, dv, ds


@triton.jit
def _attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn, g_sb, g_sh, g_sn,
    heads, q_len, kv_len, head_dim, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Program (bh, j): dK and dV of key rows [j * BLOCK_N, (j + 1) * BLOCK_N), from every query block.
    dV = P^T dO; dK = dS^T Q * scale with dS = P * (dO V^T - delta). dk and dv share strides (g_*)."""
    bh, j = _program(kv_len, BLOCK_N)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    col_ok = cols < kv_len
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * k_sb + h * k_sh + cols[:, None] * k_sn + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * v_sb + h * v_sh + cols[:, None] * v_sn + d[None, :], mask=kv_mask, other=0.0)
    q_base = q_ptr + b * q_sb + h * q_sh
    do_base = do_ptr + b * do_sb + h * do_sh
    row_stats = bh.to(tl.int64) * q_len
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, q_len, BLOCK_M):
        dk, dv, _ = _dkdv_tile(q_base, do_base, row_stats, lse_ptr, delta_ptr, start + tl.arange(0, BLOCK_M), q_sn,
                               do_sn, q_len, k, v, d, d_ok, col_ok, dk, dv, qk_scale, IEEE, INTERP)
    g_at = b * g_sb + h * g_sh + cols[:, None] * g_sn + d[None, :]
    tl.store(dk_ptr + g_at, _cast(dk * sm_scale, dk_ptr.dtype.element_ty, INTERP), mask=kv_mask)
    tl.store(dv_ptr + g_at, _cast(dv, dv_ptr.dtype.element_ty, INTERP), mask=kv_mask)


@triton.jit
def _attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn, g_sb, g_sh, g_sn,
    heads, q_len, kv_len, head_dim, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Program (bh, i): dQ of query rows [i * BLOCK_M, (i + 1) * BLOCK_M) = dS K * scale, over every key block."""
    bh, i = _program(q_len, BLOCK_M)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row_ok = rows < q_len
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_sn + d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * do_sb + h * do_sh + rows[:, None] * do_sn + d[None, :], mask=q_mask, other=0.0)
    row_stats = bh.to(tl.int64) * q_len
    lse = tl.load(lse_ptr + row_stats + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + row_stats + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < kv_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * k_sn + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_base + cols[:, None] * v_sn + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE, INTERP) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE, INTERP)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, INTERP), k, IEEE, INTERP)  # [BLOCK_M, BLOCK_D]
    tl.store(dq_ptr + b * g_sb + h * g_sh + rows[:, None] * g_sn + d[None, :],
             _cast(dq * sm_scale, dq_ptr.dtype.element_ty, INTERP), mask=q_mask)


@triton.jit
def _attention_backward_head_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_acc_ptr, dq_ptr, dk_ptr, dv_ptr,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn, do_sb, do_sh, do_sn,
    gq_sb, gq_sh, gq_sn, g_sb, g_sh, g_sn,
    heads, q_len, kv_len, head_dim, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """The whole backward of one head in one program (program bh): delta, then dK and dV per key block over every
    query block, as `_attention_dkdv_kernel`, with each tile's dQ part dS K added into an fp32 scratch row block
    (dq_acc [B * H, M, BLOCK_D], this head's alone). 5 products per tile pair where the split kernels do 7 (dQ's
    kernel recomputes S and dP), and one launch instead of three. The price is parallelism: B * H programs, each
    walking every tile pair of its head, which MAE's short sequences and large batches can afford. The scratch is
    written and read back by different threads of the program; the barriers order those accesses."""
    bh = tl.program_id(0)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_base = q_ptr + b * q_sb + h * q_sh
    do_base = do_ptr + b * do_sb + h * do_sh
    o_base = o_ptr + b * o_sb + h * o_sh
    row_stats = bh.to(tl.int64) * q_len
    acc_base = dq_acc_ptr + row_stats * BLOCK_D
    for start in range(0, q_len, BLOCK_M):  # delta = rowsum(dO * O), as `_attention_delta_kernel`
        _store_delta(o_base, do_base, delta_ptr + row_stats, start + tl.arange(0, BLOCK_M), o_sn, do_sn, q_len, d,
                     d_ok)
    tl.debug_barrier()
    for start_n in range(0, kv_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows
        col_ok = cols < kv_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * k_sb + h * k_sh + cols[:, None] * k_sn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + cols[:, None] * v_sn + d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start in range(0, q_len, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
            dk, dv, ds = _dkdv_tile(q_base, do_base, row_stats, lse_ptr, delta_ptr, rows, q_sn, do_sn, q_len, k, v, d,
                                    d_ok, col_ok, dk, dv, qk_scale, IEEE, INTERP)
            # dQ of these rows += dS K_j; the first key block writes the scratch instead of reading it
            row_ok = rows < q_len
            acc_at = acc_base + rows[:, None] * BLOCK_D + d[None, :]
            before = tl.load(acc_at, mask=row_ok[:, None] & (start_n > 0), other=0.0)
            tl.store(acc_at, before + _dot(ds, k, IEEE, INTERP), mask=row_ok[:, None])
        g_at = b * g_sb + h * g_sh + cols[:, None] * g_sn + d[None, :]
        tl.store(dk_ptr + g_at, _cast(dk * sm_scale, dk_ptr.dtype.element_ty, INTERP), mask=kv_mask)
        tl.store(dv_ptr + g_at, _cast(dv, dv_ptr.dtype.element_ty, INTERP), mask=kv_mask)
        tl.debug_barrier()  # this key block's scratch updates before the next block reads them
    for start in range(0, q_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_mask = (rows < q_len)[:, None] & d_ok[None, :]
        dq = tl.load(acc_base + rows[:, None] * BLOCK_D + d[None, :], mask=q_mask, other=0.0)
        tl.store(dq_ptr + b * gq_sb + h * gq_sh + rows[:, None] * gq_sn + d[None, :],
                 _cast(dq * sm_scale, dq_ptr.dtype.element_ty, INTERP), mask=q_mask)


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


HEAD_CLASSES = (32, 64, 128)  # tile sets by head block: up to 32 (every decoder), 64 (ViT-B/L), 128 (ViT-H's 80)
_TILES = {  # config set -> per head class, (BLOCK_M, BLOCK_N, warps) candidates
    "forward": ([(64, 64, 4), (128, 64, 8), (64, 128, 4)], [(64, 64, 4), (128, 64, 8), (64, 128, 4)],
                [(64, 32, 4), (64, 64, 4), (128, 32, 8)]),
    # two [BLOCK_N, D] accumulators, P recomputed: 64 x 128 at head dim 64 and 64 x 64 at 128 spilled
    "backward": ([(64, 64, 4), (32, 64, 4), (64, 64, 8)], [(64, 64, 4), (32, 64, 4), (64, 64, 8)],
                 [(64, 32, 4), (32, 64, 8), (32, 32, 4)]),
    # the split backward's dK/dV loop plus dS K and the dQ scratch update. Up to head dim 32, 64 x 128 with 8 warps
    # (244 registers; it spilled at 64) covers the decoders' 197 keys in 2 blocks: one scratch update per query
    # block and key block, so half the scratch traffic of 64-key blocks. At head dim 128 the 4-warp tiles spilled
    # (16 x 32 aside, at 254 registers), and of the 32-key tiles only 16 x 32 did not (8 warps: 188 registers),
    # the one that fits ViT-H's 65 encoder tokens in 3 key blocks instead of 2 with one key in the second.
    "backward_head": ([(64, 64, 8), (64, 128, 8), (32, 64, 4)], [(64, 64, 8), (32, 64, 4), (32, 64, 8)],
                      [(32, 64, 8), (16, 64, 8), (16, 32, 8)]),
}


def _head_class(block_d: int) -> int:
    """Index into HEAD_CLASSES (and each `_TILES` entry) for a head block of `block_d` (a power of two >= 16);
    head dims above 128 take the last class's tiles (no ViT in use has them; untested on a card)."""
    return next((i for i, top in enumerate(HEAD_CLASSES) if block_d <= top), len(HEAD_CLASSES) - 1)


def _configs(head_class: int, tiles: str) -> list[triton.Config]:
    """Candidate tiles for the autotuner (on a GPU; the interpreter takes `_INTERPRETER_BLOCKS`) from set `tiles`
    of `_TILES` for one head class. Every tile compiles for sm_90 in bf16 without spilling
    (tests/triton_aot_compile.py prints registers and spills); fp32 inputs run the same tiles without tensor cores
    and spill, a correctness path, not a fast one."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2)
            for m, n, w in _TILES[tiles][head_class]]


_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}  # small tiles: tests cover several blocks and a partial one


def _tuned(kernel, tiles: str):
    """The kernel autotuned per (q_len, kv_len, head_dim) on a GPU, one version per head class."""
    if INTERPRETED:
        return (kernel,) * len(HEAD_CLASSES)
    key = ["q_len", "kv_len", "head_dim"]
    return tuple(triton.autotune(_configs(c, tiles), key=key)(kernel) for c in range(len(HEAD_CLASSES)))


_KERNELS = {  # name -> (the kernel, its autotuned versions per head class, its set of tiles)
    "forward": (_attention_forward_kernel, _tuned(_attention_forward_kernel, "forward"), "forward"),
    "dkdv": (_attention_dkdv_kernel, _tuned(_attention_dkdv_kernel, "backward"), "backward"),
    "dq": (_attention_dq_kernel, _tuned(_attention_dq_kernel, "backward"), "backward"),
    "backward_head": (_attention_backward_head_kernel, _tuned(_attention_backward_head_kernel, "backward_head"),
                      "backward_head"),
}

BACKWARDS = ("auto", "head", "split")
# "auto" runs the one-program-per-head backward from this many heads (B * H) up: ~4 programs per SM of an
# H100/H200 (132), so the last wave's idle SMs cost little. Below it the split kernels' B * H * blocks programs
# fill the card better. A guess from the programs' work, not a measurement: benchmarks/attention.py times both.
HEAD_BACKWARD_MIN_HEADS = 512


def autotune_enabled() -> bool:
    """FASTMAE_ATTENTION_AUTOTUNE=0 launches every shape at its set's first tile instead of timing them all: one
    compile per kernel, dtype and head dim (tests on a GPU, where the autotuner would compile and time 3 tiles
    for every new shape)."""
    return os.environ.get("FASTMAE_ATTENTION_AUTOTUNE", "1") != "0"


def backward_kind(heads: int) -> str:
    """"head" or "split": FASTMAE_ATTENTION_BACKWARD (auto, head, split; default auto) for `heads` = B * H."""
    kind = os.environ.get("FASTMAE_ATTENTION_BACKWARD", "auto")
    if kind not in BACKWARDS:
        raise ValueError(f"FASTMAE_ATTENTION_BACKWARD must be one of {', '.join(BACKWARDS)}, got {kind!r}")
    if kind == "auto":
        return "head" if heads >= HEAD_BACKWARD_MIN_HEADS else "split"
    return kind


def _launch(name: str, grid_rows_arg: str | None, rows: int, bh: int, head_dim: int, *args, **consts):
    """Launches kernel `name` (its head class's tiles) on B * H * (row blocks of `grid_rows_arg`) programs
    (`_program`), or on B * H programs when `grid_rows_arg` is None."""
    kernel, tuned, tiles = _KERNELS[name]
    head_class = _head_class(_head_block(head_dim))
    if INTERPRETED:
        meta = dict(_INTERPRETER_BLOCKS)
    elif autotune_enabled():
        kernel, meta = tuned[head_class], {}
    else:
        config = _configs(head_class, tiles)[0]
        meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}

    def grid(launch_meta):
        return (bh if grid_rows_arg is None else bh * triton.cdiv(rows, launch_meta[grid_rows_arg]),)

    kernel[grid](*args, **consts, **meta)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _heads_last(like: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty [B, H, rows, D] view of a [B, rows, H, D] buffer (what the block's transpose + reshape reads)."""
    b, h, _, d = like.shape
    return torch.empty((b, rows, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, M, D], k, v [B, H, N, D] -> (out [B, H, M, D] in q's dtype, lse [B * H, M] fp32, log2 units)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, m, d = q.shape
    n = k.shape[2]
    out = _heads_last(q, m)
    lse = torch.empty((b * h, m), dtype=torch.float32, device=q.device)
    if out.numel():
        _launch("forward", "BLOCK_M", m, b * h, d, q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v),
                *_strides(out), h, m, n, d, LOG2E / math.sqrt(d),
                BLOCK_D=_head_block(d), IEEE=q.dtype == torch.float32, INTERP=INTERPRETED)
    return out, lse


attention_op = torch.library.custom_op("fastmae_triton::attention", _forward, mutates_args=())


@attention_op.register_fake
def _(q, k, v):
    b, h, m, d = q.shape
    return _heads_last(q, m), q.new_empty((b * h, m), dtype=torch.float32)


def _dq_scratch(heads: int, rows: int, block_d: int, device: torch.device) -> torch.Tensor:
    """[B * H, M, BLOCK_D] fp32 for the one-program-per-head backward's dQ sums; uninitialised: its first key
    block writes every row before any is read."""
    return torch.empty((heads, rows, block_d), dtype=torch.float32, device=device)


def _backward_launch(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each in its input's dtype, as [B, H, *, D] views of [B, *, H, D] buffers."""
    do, q, k, v = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, m, d = q.shape
    n = k.shape[2]
    dq, dk, dv = _heads_last(q, m), _heads_last(k, n), _heads_last(v, n)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _head_block(d)
    delta = torch.empty((b * h, m), dtype=torch.float32, device=q.device)
    scales = (LOG2E / math.sqrt(d), 1.0 / math.sqrt(d))
    common = dict(BLOCK_D=block_d, IEEE=q.dtype == torch.float32, INTERP=INTERPRETED)
    if backward_kind(b * h) == "head":
        dq_acc = _dq_scratch(b * h, m, block_d, q.device)
        _launch("backward_head", None, m, b * h, d, q, k, v, out, do, lse, delta, dq_acc, dq, dk, dv,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq),
                *_strides(dk), h, m, n, d, *scales, **common)
        return dq, dk, dv
    delta_rows = 64 if INTERPRETED else max(1, 4096 // block_d)
    _attention_delta_kernel[(b * h * triton.cdiv(m, delta_rows),)](
        out, do, delta, *_strides(out), *_strides(do), h, m, d, BLOCK_M=delta_rows, BLOCK_D=block_d)
    _launch("dkdv", "BLOCK_N", n, b * h, d, q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k),
            *_strides(v), *_strides(do), *_strides(dk), h, m, n, d, *scales, **common)
    _launch("dq", "BLOCK_M", m, b * h, d, q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k),
            *_strides(v), *_strides(do), *_strides(dq), h, m, n, d, *scales, **common)
    return dq, dk, dv


attention_backward_op = torch.library.custom_op("fastmae_triton::attention_backward", _backward_launch,
                                                mutates_args=())


@attention_backward_op.register_fake
def _(do, q, k, v, out, lse):
    return _heads_last(q, q.shape[2]), _heads_last(k, k.shape[2]), _heads_last(v, v.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    return _gradients(ctx, do, attention_backward_op)


def _gradients(ctx, do, backward_launch):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = backward_launch(do, q, k, v, out, lse)
    need = ctx.needs_input_grad
    return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None)


attention_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom ops' launchers called directly in eager mode (host time; as bias_gelu's `_EagerBiasGelu`)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = _forward(q, k, v)
        _setup_context(ctx, (q, k, v), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        return _gradients(ctx, do, _backward_launch)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"fastmae_kernels.attention: the triton backend supports float32, bfloat16 and float16, got "
                         f"{q.dtype} (use backend='sdpa' for float64)")
    if skip_custom_op():
        return _EagerAttention.apply(q, k, v)[0]
    return attention_op(q, k, v)[0]
