"""Compiles every Triton kernel variant the launchers use for an NVIDIA target, without a GPU.

The interpreter (the CPU tests) does not type-check like the compiler does; this catches kernels that
would fail to compile on the card. Run in a process WITHOUT TRITON_INTERPRET (the kernels must be JIT
functions): `python tests/triton_aot_compile.py [sm]`. Prints one line per variant: registers, spills.
`python tests/triton_aot_compile.py widths [sm]`: the global access widths of the row-select and bias_gelu
kernels as the launchers specialise them at ViT-B shapes (16-byte accesses are what a memory-bound pass needs),
and the attention kernels' registers, cp.async pipelining and load widths at ViT-B's decoder shape.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")

from fastmae_kernels.triton_ops._rows import _select_rows_kernel  # noqa: E402
from fastmae_kernels.triton_ops.attention import (  # noqa: E402
    _KERNELS,
    HEAD_CLASSES,
    _attention_delta_kernel,
    _configs,
)
from fastmae_kernels.triton_ops.add_layer_norm import (  # noqa: E402
    _add_layer_norm_backward_kernel,
    _add_layer_norm_forward_kernel,
)
from fastmae_kernels.triton_ops.bias_gelu import _bias_gelu_backward_kernel, _bias_gelu_forward_kernel  # noqa: E402
from fastmae_kernels.triton_ops.gather_patches import _gather_patches_kernel, _scatter_patches_kernel  # noqa: E402
from fastmae_kernels.triton_ops.insert_mask_tokens import _insert_backward_kernel  # noqa: E402
from fastmae_kernels.triton_ops.masked_mse_loss import _mse_finish_kernel, _mse_rows_kernel  # noqa: E402
from fastmae_kernels.triton_ops.random_masking import _invert_kernel  # noqa: E402


def compile_variant(fn, pointers: dict, consts: dict, target: GPUTarget, floats=(), num_warps: int = 4,
                    attrs: dict | None = None, num_stages: int | None = None):
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        else:
            signature[name] = "fp32" if name in floats else "i32"
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=options)


def variants():
    rows = dict(idx_ptr="i64")
    for src, out, fill, pos, flags in [
        ("bf16", "fp32", "bf16", "fp32", dict(HAS_FILL=False, HAS_POS=True, POS_AT_SRC=True)),  # gather_tokens
        ("bf16", "fp32", "fp32", "fp32", dict(HAS_FILL=True, HAS_POS=True, POS_AT_SRC=False)),  # insert, autocast
        ("bf16", "bf16", "bf16", "bf16", dict(HAS_FILL=True, HAS_POS=False, POS_AT_SRC=False)),  # insert, bf16
        ("fp16", "fp16", "fp16", "fp16", dict(HAS_FILL=False, HAS_POS=False, POS_AT_SRC=False)),  # backward
        ("fp32", "bf16", "fp32", "fp32", dict(HAS_FILL=False, HAS_POS=False, POS_AT_SRC=False)),  # backward, cast
    ]:
        ptrs = dict(rows, src_ptr=src, out_ptr=out, fill_ptr=fill, pos_ptr=pos)
        yield f"select_rows {src}->{out} {flags}", _select_rows_kernel, ptrs, dict(flags, BLOCK_R=16, BLOCK_D=256), ()
    for grad, gx, mid in [("fp32", "bf16", tl.float32), ("fp32", "bf16", tl.bfloat16), ("fp16", "fp16", tl.float16)]:
        ptrs = dict(grad_ptr=grad, ids_ptr="i64", gx_ptr=gx, partial_ptr="fp32")
        consts = dict(MID_DTYPE=mid, BLOCK_R=32, BLOCK_D=128)
        yield f"insert_backward {grad}->{gx} mid {mid}", _insert_backward_kernel, ptrs, consts, ()
    for dtype in ("fp32", "bf16"):
        ptrs = dict(img_ptr=dtype, idx_ptr="i64", out_ptr=dtype)
        yield f"gather_patches {dtype}", _gather_patches_kernel, ptrs, dict(BLOCK_R=4, BLOCK_E=1024), ()
        ptrs = dict(grad_ptr=dtype, inv_ptr="i64", out_ptr=dtype)
        yield f"scatter_patches {dtype}", _scatter_patches_kernel, ptrs, dict(BLOCK_R=4, BLOCK_E=1024), ()
    for pred, backward, norm in [("bf16", False, True), ("bf16", True, True), ("fp32", False, False), ("fp16", True, False)]:
        out = pred if backward else "fp32"
        ptrs = dict(pred_ptr=pred, img_ptr="fp32", mask_ptr="fp32", out_ptr=out)
        ptrs.update(mask_sum_ptr="fp32", grad_ptr="fp32")
        consts = dict(NORM_PIX=norm, BACKWARD=backward, BLOCK_R=4, BLOCK_E=1024)
        yield f"mse_rows pred {pred} backward={backward} norm={norm}", _mse_rows_kernel, ptrs, consts, ("eps",)
    ptrs = dict(partial_ptr="fp32", loss_ptr="fp32", mask_sum_ptr="fp32")
    yield "mse finish", _mse_finish_kernel, ptrs, dict(BLOCK=1024), ()
    # add_layer_norm at the launcher's tiles: ViT-B/L (D 768/1024 -> BLOCK_D 1024, 4 rows), ViT-H (1280 -> 2048, 2 rows)
    for x, branch, y, has_branch, block_r, block_d in [
        ("fp32", "bf16", "bf16", True, 4, 1024),  # autocast: fp32 residual stream, bf16 branch and output
        ("fp32", "fp32", "bf16", False, 4, 1024),  # a stack's first norm (no branch)
        ("bf16", "bf16", "bf16", True, 2, 2048),  # bf16-pure, ViT-H width
    ]:
        ptrs = dict(x_ptr=x, branch_ptr=branch, weight_ptr="fp32", bias_ptr="fp32", h_ptr=x, y_ptr=y,
                    mean_ptr="fp32", rstd_ptr="fp32")
        consts = dict(HAS_BRANCH=has_branch, BLOCK_R=block_r, BLOCK_D=block_d)
        yield f"add_layer_norm {x}+{branch}->{y} branch={has_branch} D{block_d}", _add_layer_norm_forward_kernel, \
            ptrs, consts, ("eps",), 4 if block_d <= 1024 else 8
    for dy, h, dx, dbranch, has_dh, has_branch, block_r, block_d in [
        ("bf16", "fp32", "fp32", "bf16", True, True, 2, 1024),
        ("bf16", "fp32", "fp32", "fp32", False, False, 2, 1024),
        ("bf16", "bf16", "bf16", "bf16", True, True, 1, 2048),
    ]:
        ptrs = dict(dy_ptr=dy, dh_ptr=h, h_ptr=h, weight_ptr="fp32", mean_ptr="fp32", rstd_ptr="fp32", dx_ptr=dx,
                    dbranch_ptr=dbranch, dw_ptr="fp32", db_ptr="fp32")
        consts = dict(HAS_DH=has_dh, HAS_BRANCH=has_branch, BLOCK_R=block_r, BLOCK_D=block_d)
        yield f"add_layer_norm_backward dy {dy} h {h} dh={has_dh} branch={has_branch} D{block_d}", \
            _add_layer_norm_backward_kernel, ptrs, consts, (), 8
    # bias_gelu at the launcher's tiles (8 warps; 16 rows x 256 columns forward, 8 x 256 backward)
    for x, bias in [("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")]:  # autocast, fp32, half weights
        ptrs = dict(x_ptr=x, bias_ptr=bias, y_ptr=x)
        yield f"bias_gelu {x}+{bias}", _bias_gelu_forward_kernel, ptrs, dict(BLOCK_R=16, BLOCK_F=256), (), 8
        ptrs = dict(dy_ptr=x, x_ptr=x, bias_ptr=bias, dx_ptr=x, db_ptr="fp32")
        yield f"bias_gelu_backward {x}+{bias}", _bias_gelu_backward_kernel, ptrs, dict(BLOCK_R=8, BLOCK_F=256), (), 8
    yield from attention_variants()
    for mask in ("fp32", "bf16", "fp64"):
        ptrs = dict(shuffle_ptr="i64", keep_ptr="i64", restore_ptr="i64", mask_ptr=mask)
        yield f"invert mask {mask}", _invert_kernel, ptrs, dict(BLOCK_N=4, BLOCK_L=256), ()


FP32_POINTERS = ("lse_ptr", "delta_ptr", "dq_acc_ptr")  # the attention kernels' fp32 statistics and scratch


def attention_variants():
    """Every tile the attention autotuner may pick, bf16 (autocast, bf16 weights) at the head dims of ViT-B/L
    and the decoders (32, 64) and ViT-H (80 -> 128); fp32 and fp16 at the first tile of each set."""
    floats = ("qk_scale", "sm_scale")
    for head_class, block_d in enumerate(HEAD_CLASSES):
        for fn, _, tiles in _KERNELS.values():  # each launched kernel with its set of tiles
            for i, config in enumerate(_configs(head_class, tiles)):
                for dtype in ("bf16",) if i else ("bf16", "fp32", "fp16"):
                    ptrs = {name: ("fp32" if name in FP32_POINTERS else dtype)
                            for name in fn.arg_names if name.endswith("_ptr")}
                    consts = dict(config.kwargs, BLOCK_D=block_d, IEEE=dtype == "fp32", INTERP=False)
                    tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
                    yield (f"{fn.__name__.strip('_')} {dtype} D{block_d} {tile} w{config.num_warps}", fn, ptrs,
                           consts, floats, (config.num_warps, config.num_stages))
    ptrs = dict(o_ptr="bf16", do_ptr="bf16", delta_ptr="fp32")
    yield "attention_delta bf16 D32", _attention_delta_kernel, ptrs, dict(BLOCK_M=128, BLOCK_D=32), ()


def ptxas_usage(ptx: str, arch: int) -> str:
    """Registers and spill bytes as ptxas reports them (Triton's bundled ptxas; no GPU needed)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        cmd = [str(ptxas), f"-arch={arch_name}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")]
        info = subprocess.run(cmd, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} bytes spilled"


def compile_as_launched(fn, pointers: dict, consts: dict, values: dict, target: GPUTarget, num_warps: int = 4,
                        floats=(), num_stages: int | None = None):
    """Compiled as the launcher's JIT call specialises it for these integer argument `values`: an integer
    equal to 1 becomes a constant, and pointers and integers divisible by 16 carry Triton's divisibility hint,
    which is what lets the compiler emit 16-byte accesses (and, for loads in a loop, cp.async pipelining)."""
    consts = {**consts, **{name: 1 for name, v in values.items() if v == 1}}
    hinted = [i for i, n in enumerate(fn.arg_names)
              if n in pointers or (n in values and n not in consts and values[n] % 16 == 0)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    return compile_variant(fn, pointers, consts, target, floats, num_warps=num_warps, attrs=attrs,
                           num_stages=num_stages)


def access_widths(ptx: str) -> str:
    """The global loads and stores of a kernel's PTX by width, e.g. 'ld.global.v4.b32 x12'."""
    found = re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx)
    return ", ".join(f"{op} x{found.count(op)}" for op in sorted(set(found)))


def widths(arch: int = 90) -> None:
    """gather_tokens' row-select kernel at ViT-B/16 batch 256 (x [256, 196, 768] bf16 -> [256, 49, 768] fp32,
    + fp32 positions), specialised as at run time."""
    n, length, keep, dim = 256, 196, 49, 768
    values = dict(rows=n * keep, out_len=keep, src_len=length, dim=dim, s_src_n=length * dim, s_src_l=dim,
                  s_src_d=1, s_idx_n=keep, s_idx_l=1, s_fill_d=1, s_pos_l=dim, s_pos_d=1)
    ptrs = dict(src_ptr="bf16", idx_ptr="i64", fill_ptr="bf16", pos_ptr="fp32", out_ptr="fp32")
    consts = dict(HAS_FILL=False, HAS_POS=True, POS_AT_SRC=True, BLOCK_R=16, BLOCK_D=256)
    kernel = compile_as_launched(_select_rows_kernel, ptrs, consts, values, GPUTarget("cuda", arch, 32))
    print(f"sm_{arch} widths select_rows (gather_tokens, ViT-B): {access_widths(kernel.asm['ptx'])}")
    # bias_gelu at ViT-B's MLP width (x [256 * 50, 3072] bf16 + fp32 bias), forward and backward
    values = dict(rows=256 * 50, features=3072, tiles_per_program=2)
    for name, fn, ptrs, block_r in [
        ("bias_gelu", _bias_gelu_forward_kernel, dict(x_ptr="bf16", bias_ptr="fp32", y_ptr="bf16"), 16),
        ("bias_gelu_backward", _bias_gelu_backward_kernel,
         dict(dy_ptr="bf16", x_ptr="bf16", bias_ptr="fp32", dx_ptr="bf16", db_ptr="fp32"), 8),
    ]:
        used = {k: v for k, v in values.items() if k in fn.arg_names}
        consts = dict(BLOCK_R=block_r, BLOCK_F=256)
        kernel = compile_as_launched(fn, ptrs, consts, used, GPUTarget("cuda", arch, 32), num_warps=8)
        print(f"sm_{arch} widths {name} (ViT-B MLP, bf16): {access_widths(kernel.asm['ptx'])}")


def attention_as_launched(arch: int = 90) -> None:
    """The attention kernels specialised as at run time for ViT-B's decoder (q, k, v views of the qkv GEMM's
    [256, 197, 3, 16, 32] bf16 output; output and gradients [256, 197, 16, 32]) at each one's first tile:
    registers, the loop's cp.async copies (software pipelining) and the global load widths. Without the run-time
    divisibility hints (`main`) Triton cannot prove the bf16 rows 16-byte aligned and pipelines no bf16 load."""
    qkv = dict(sb=197 * 1536, sh=32, sn=1536)
    out = dict(sb=197 * 512, sh=32, sn=512)
    values = dict(heads=16, q_len=197, kv_len=197, head_dim=32)
    for prefix, strides in (("q", qkv), ("k", qkv), ("v", qkv), ("o", out), ("do", out), ("g", out), ("gq", out)):
        values.update({f"{prefix}_{k}": v for k, v in strides.items()})
    for fn, _, tiles in _KERNELS.values():
        ptrs = {n: ("fp32" if n in FP32_POINTERS else "bf16") for n in fn.arg_names if n.endswith("_ptr")}
        used = {k: v for k, v in values.items() if k in fn.arg_names}
        config = _configs(0, tiles)[0]  # what FASTMAE_ATTENTION_AUTOTUNE=0 launches
        consts = dict(config.kwargs, BLOCK_D=32, IEEE=False, INTERP=False)
        kernel = compile_as_launched(fn, ptrs, consts, used, GPUTarget("cuda", arch, 32), num_warps=config.num_warps,
                                     floats=("qk_scale", "sm_scale"), num_stages=config.num_stages)
        ptx = kernel.asm["ptx"]
        tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}, {config.num_warps} warps"
        print(f"sm_{arch} as launched {fn.__name__.strip('_')} (ViT-B decoder, bf16, {tile}): "
              f"{ptxas_usage(ptx, arch)}, {len(re.findall('cp.async.cg', ptx) + re.findall('cp.async.ca', ptx))} "
              f"cp.async, loads {access_widths(ptx)}")


def main(arch: int = 90) -> None:
    target = GPUTarget("cuda", arch, 32)
    for name, fn, ptrs, consts, floats, *launch in variants():
        warps, stages = (launch[0] if isinstance(launch[0], tuple) else (launch[0], None)) if launch else (4, None)
        kernel = compile_variant(fn, ptrs, consts, target, floats, num_warps=warps, num_stages=stages)
        assert kernel.asm.get("cubin"), name
        print(f"sm_{arch} ok  {name}: {ptxas_usage(kernel.asm['ptx'], arch)}, {kernel.metadata.shared} bytes shared")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "widths":
        widths(int(sys.argv[2]) if len(sys.argv) > 2 else 90)
        attention_as_launched(int(sys.argv[2]) if len(sys.argv) > 2 else 90)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
