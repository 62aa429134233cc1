"""fastmae's MAE against the plain official formulation, on the same weights and the same noise."""

import pytest
import torch

from fastmae.models import MaskedAutoencoderViT, create_model, model_config
from fastmae.models.pos_embed import sincos_2d

TINY = "mae_vit_tiny_patch4_dec64d2b"


def _pair(norm_pix: bool, seed: int = 0):
    torch.manual_seed(seed)
    reference = create_model(TINY, reference=True, norm_pix_loss=norm_pix).double()
    model = create_model(TINY, norm_pix_loss=norm_pix, backend="torch").double()
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


@pytest.mark.parametrize("masked_only", [False, True], ids=["full", "masked_only"])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("batch", [1, 5])
def test_forward_and_gradients_match_reference(norm_pix, batch, masked_only):
    """masked_only (the trainer's path) skips the decoder's work on visible patches: same loss, the
    reference's predictions at the masked patches, every gradient the same."""
    reference, model = _pair(norm_pix)
    imgs = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(batch, 64, dtype=torch.float64)
    loss_r, pred_r, mask_r = reference(imgs, 0.75, noise)
    loss_m, pred_m, mask_m = model(imgs, 0.75, noise, masked_only=masked_only)
    assert torch.equal(mask_r, mask_m)
    assert mask_m.sum().item() == batch * (64 - 16)
    if masked_only:  # the masked rows in raster order
        pred_r = pred_r[mask_r.bool()].view(batch, 64 - 16, pred_r.shape[-1])
    torch.testing.assert_close(pred_m, pred_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_m, loss_r, rtol=1e-10, atol=1e-10)
    loss_r.backward()
    loss_m.backward()
    for (name, p_r), (_, p_m) in zip(reference.named_parameters(), model.named_parameters()):
        if p_r.requires_grad:
            assert p_m.grad is not None, name
            assert p_r.grad.abs().sum() > 0, f"{name}: reference gradient is all zero, the test would be vacuous"
            torch.testing.assert_close(p_m.grad, p_r.grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("batch, tokens, rows", [(1, 7, 3), (3, 13, 13), (2, 29, 1)])
def test_block_rows_equal_the_full_block_at_those_rows(batch, tokens, rows):
    """A block asked for some rows: the full block's output there, and the same input gradient (keys and
    values still see every token, so the other rows' inputs get gradient too)."""
    from fastmae.models.vit_block import Block, select_rows

    torch.manual_seed(0)
    blk = Block(24, 3).double()
    x = torch.randn(batch, tokens, 24, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(tokens)[:rows] for _ in range(batch)])  # [B, M], any order
    full = select_rows(blk(x), ids)
    grad_full = torch.autograd.grad(full.square().sum(), x)[0]
    part = blk(x, ids)
    grad_part = torch.autograd.grad(part.square().sum(), x)[0]
    torch.testing.assert_close(part, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_part, grad_full, rtol=1e-12, atol=1e-12)
    if rows < tokens:  # the unselected rows reach the output through attention only, but they do
        unselected = torch.ones(batch, tokens, dtype=torch.bool).scatter(1, ids, False)
        assert grad_part[unselected].abs().sum() > 0


@pytest.mark.parametrize("rows", [None, 4])
@pytest.mark.parametrize("first", [True, False])  # a stack's first block (nothing pending) or a later one
@pytest.mark.parametrize("norm_layer", ["fastmae", "torch"])  # torch's nn.LayerNorm: the add, then the norm
@pytest.mark.parametrize("gelu", [None, "torch"])  # the MLP's fc1 bias + GELU as nn modules or as bias_gelu
def test_fused_norm_block_call_equals_the_plain_block(rows, first, norm_layer, gelu):
    """Block(x, rows, pending, norm_backend=..., gelu_backend=...) -> (stream, MLP output) sums to the plain
    block on x + pending, with the same gradients for x, pending and fc1's weight and bias (fp64, torch backend)."""
    from fastmae.models.vit_block import Block, LayerNorm

    torch.manual_seed(0)
    blk = Block(24, 3, norm_layer=LayerNorm if norm_layer == "fastmae" else torch.nn.LayerNorm).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    pending = None if first else torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    ids = None if rows is None else torch.stack([torch.randperm(9)[:rows] for _ in range(2)])  # [B, M]
    block_in = x if first else x + pending
    plain = blk(block_in, ids)
    stream, mlp_out = blk(x, ids, pending, norm_backend="torch", gelu_backend=gelu)
    torch.testing.assert_close(stream + mlp_out, plain, rtol=1e-12, atol=1e-12)
    leaves = ([x] if first else [x, pending]) + [blk.mlp.fc1.weight, blk.mlp.fc1.bias]
    g = torch.randn_like(plain)
    want = torch.autograd.grad((plain * g).sum(), leaves)
    got = torch.autograd.grad(((stream + mlp_out) * g).sum(), leaves)
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`pending` is for the fused call"):
        blk(x, ids, torch.zeros_like(x))
    if norm_layer == "fastmae":
        with pytest.raises(ValueError, match="a branch to add needs backend="):
            blk.norm1(x, x)


def test_mlp_runs_the_plain_modules_for_another_activation():
    """gelu_backend fuses only the exact GELU: a tanh-approximate one (or any other act) keeps the modules."""
    from fastmae.models.vit_block import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 32).double()
    mlp.act = torch.nn.GELU(approximate="tanh")
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(mlp(x, gelu_backend="torch"), mlp.fc2(mlp.act(mlp.fc1(x))))
    mlp.act = torch.nn.GELU()
    torch.testing.assert_close(mlp(x, gelu_backend="torch"), mlp(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_flat_mlp_matches_the_plain_mlp_bitwise(backend):
    """fastmae's Mlp runs its GEMMs on the tokens as one [T, C] matrix (so Inductor can fuse the GELU into a GEMM
    template's epilogue), the reference's PlainMlp on [B, N, C] as timm does: the same ops on the same rows, so
    outputs and every gradient are equal bit for bit, on a non-contiguous input too."""
    from fastmae.models.vit_block import Mlp, PlainMlp

    torch.manual_seed(0)
    flat, plain = Mlp(24, 40), PlainMlp(24, 40)
    plain.load_state_dict(flat.state_dict())
    x = torch.randn(5, 24, 7).transpose(1, 2)  # [B=5, N=7, C=24], not contiguous
    outs = []
    for mlp in (flat, plain):
        xi = x.detach().clone().requires_grad_()
        out = mlp(xi, backend) if backend else mlp(xi)
        assert out.shape == (5, 7, 24) and out.abs().sum() > 0
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append([out, xi.grad] + [q.grad for q in mlp.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert Mlp.flat_tokens and not PlainMlp.flat_tokens


def test_reference_blocks_keep_timm_formulations():
    """The reference MAE's blocks run timm's attention and MLP forms; fastmae's its own."""
    from fastmae.models.vit_block import Mlp, PlainAttention, PlainMlp

    ref = create_model("mae_vit_tiny_patch4_dec64d2b", reference=True)
    fast = create_model("mae_vit_tiny_patch4_dec64d2b")
    for blk in list(ref.blocks) + list(ref.decoder_blocks):
        assert type(blk.mlp) is PlainMlp and type(blk.attn) is PlainAttention
    for blk in list(fast.blocks) + list(fast.decoder_blocks):
        assert type(blk.mlp) is Mlp and not isinstance(blk.attn, PlainAttention)


def test_fused_norm_stacks_call_every_block_and_norm_as_a_module():
    """The fused stacks still call each block and each LayerNorm as a module, once per forward, so module hooks
    see them (wrappers that manage parameters by module hooks; FLOP counters attribute by them)."""
    from fastmae.models.vit_block import Block, LayerNorm

    model = create_model("mae_vit_tiny_patch4_dec64d2b")
    calls: dict[str, int] = {}

    def counted(name):
        return lambda module, args: calls.__setitem__(name, calls.get(name, 0) + 1)

    for name, module in model.named_modules():
        if isinstance(module, (Block, LayerNorm)):
            module.register_forward_pre_hook(counted(name))
    model(torch.randn(2, 3, 32, 32), 0.75, masked_only=True)
    blocks = len(model.blocks) + len(model.decoder_blocks)
    assert len(calls) == 3 * blocks + 2 and set(calls.values()) == {1}, calls  # each block, its 2 norms, 2 final


def test_mask_follows_noise_ascending_kept():
    _, model = _pair(True)
    noise = torch.rand(2, 64, dtype=torch.float64)
    _, _, mask = model(torch.randn(2, 3, 32, 32, dtype=torch.float64), 0.75, noise)
    kept = noise.argsort(dim=1)[:, :16]
    assert torch.all(mask.gather(1, kept) == 0)
    assert mask.sum(dim=1).tolist() == [48.0, 48.0]


OFFICIAL_KEYS = [
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
    "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias",
    "decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_blocks.0.attn.qkv.weight",
    "decoder_norm.weight", "decoder_pred.weight", "decoder_pred.bias",
]


def test_state_dict_has_official_keys_and_round_trips():
    torch.manual_seed(1)
    model = create_model(TINY)
    state = model.state_dict()
    for key in OFFICIAL_KEYS:
        assert key in state, key
    other = create_model(TINY)
    assert not torch.equal(other.cls_token, model.cls_token)
    other.load_state_dict(state, strict=True)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value), key


def test_vit_base_shapes_match_official():
    # The official ViT-B MAE has 111.9M parameters (incl. the fixed position tables).
    cfg = model_config("mae_vit_base_patch16")
    model = MaskedAutoencoderViT(**cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total == 111_907_840
    assert model.decoder_pred.weight.shape == (768, 512)
    assert model.blocks[0].norm1.eps == 1e-6


def test_pos_embed_is_fixed_sincos():
    model = create_model(TINY)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    table = sincos_2d(96, 8, 8)
    assert torch.equal(model.pos_embed.data, table)
    assert torch.all(table[0, 0] == 0)
    # channel 0 is sin(w * 1): for the patch at row 0, column 1 it is sin(1)
    assert table[0, 1 + 1, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(noise=torch.rand(2, 10)), "noise must be"), (dict(imgs=torch.randn(2, 3, 30, 30)), "expects images")],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    model = create_model(TINY)
    imgs = kwargs.pop("imgs", torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=match):
        model(imgs, 0.75, **kwargs)


def test_unknown_model_and_backend():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("mae_vit_gigantic")
    with pytest.raises(ValueError, match="backend must be"):
        create_model(TINY, backend="opencl")


@pytest.mark.parametrize("decoder_depth", [0, 1])
def test_masked_only_with_shallow_decoders(decoder_depth):
    """With one decoder block it is also the last (rows only); with none the rows come from the embedding."""
    from fastmae.models.reference_mae import ReferenceMAE

    kw = {k: v for k, v in model_config(TINY).items() if k != "name"} | {"decoder_depth": decoder_depth}
    torch.manual_seed(0)
    reference = ReferenceMAE(**kw, norm_pix_loss=True).double()
    model = MaskedAutoencoderViT(**kw, norm_pix_loss=True, backend="torch").double()
    model.load_state_dict(reference.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 64, dtype=torch.float64)
    loss_r, pred_r, mask = reference(imgs, 0.75, noise)
    loss_m, pred_m, _ = model(imgs, 0.75, noise, masked_only=True)
    torch.testing.assert_close(pred_m, pred_r[mask.bool()].view(2, 48, -1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_m, loss_r, rtol=1e-10, atol=1e-10)


def test_fast_attention_layout_equals_timm_formulation_with_one_pass_less():
    """fastmae's Attention splits q, k, v by unbind(2) + transpose; the reference keeps timm's permute + unbind.
    Same values and gradients; in backward the fast one writes the qkv gradient once (a stack straight into
    the Linear's layout) where timm's stacks and then copies it."""
    from fastmae.models.vit_block import Attention, PlainAttention
    from fastmae.profiling import WrittenBytes

    torch.manual_seed(0)
    fast, plain = Attention(48, 6).double(), PlainAttention(48, 6).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 37, 48, dtype=torch.float64, requires_grad=True)
    results = []
    for attn in (fast, plain):
        with WrittenBytes() as written:
            y = attn(x)
            (gx,) = torch.autograd.grad(y.square().sum(), x)
        copies = sum(b for op, b in written.bytes.items() if any(k in op for k in ("copy", "cat", "stack", "clone")))
        results.append((y, gx, copies / 2**20))
    (y_f, g_f, mib_f), (y_p, g_p, mib_p) = results
    torch.testing.assert_close(y_f, y_p, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_f, g_p, rtol=1e-13, atol=1e-13)
    qkv_grad_mib = 3 * 37 * 3 * 48 * 8 / 2**20
    assert mib_p - mib_f == pytest.approx(qkv_grad_mib), (mib_f, mib_p)
