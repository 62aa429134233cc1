"""fastmae's MAE: the official math, with the MAE-specific data movement done by fastmae_kernels.

Differences from the reference are in how, not what: the patch embedding runs as a Linear on the
visible patches only (4x less work at mask ratio 0.75) and the gathers, the mask-token insertion and
the norm-pix loss are single fused ops. With `masked_only=True` (what the trainer uses) the last decoder
block, the decoder norm and the prediction head run on the masked patches only: the loss gives the other
rows zero weight, so their outputs never reach it and skipping them leaves the loss and every gradient as
they were (the last block still attends over all tokens).

The block stacks run each LayerNorm together with the residual add before it (`Block(..., norm_backend=)`,
`fastmae_kernels.add_layer_norm`), and each MLP's fc1 bias with its GELU (`gelu_backend`,
`fastmae_kernels.bias_gelu`). By default ("auto") both are torch's own ops, as in the reference: Inductor fuses
them itself under torch.compile, and in eager mode the fused Triton kernels (one each way instead of the add,
the norm and autocast's cast, or the GELU and the bias sum) save GPU time but cost more host time than they
save (H200, 2026-12-04: eager ViT-H/14 b64 0.61x and ViT-B/16 b256 0.84x the reference with them, 1.04x and
1.20x without; benchmarks/NOTES.md §7.3). `norm_backend="triton"` / `gelu_backend="triton"` ask for them.
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fastmae_kernels as fk
from fastmae.models.mae_base import MAEParameters
from fastmae.models.vit_block import add_norm, select_rows


class MaskedAutoencoderViT(MAEParameters):
    def __init__(self, *args, backend: str = "auto", norm_backend: str = "auto", gelu_backend: str = "auto",
                 attn_backend: str = "sdpa", decoder_attn_backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value in (("backend", backend), ("norm_backend", norm_backend), ("gelu_backend", gelu_backend)):
            if value not in ("auto", *fk.BACKENDS):
                raise ValueError(f"{name} must be 'auto' or one of {fk.BACKENDS}, got {value!r}")
        self.backend = backend
        # the fastmae_kernels backends of the fused residual add + LayerNorm and of each MLP's fc1 bias + GELU
        # ("auto": torch, `_block_ops_for`); for the GELU "torch" means nn.Linear and nn.GELU's own ops, the
        # reference's bit for bit (the op's torch reference adds the bias in fp32 instead)
        self.norm_backend = norm_backend
        self.gelu_backend = gelu_backend
        # attention: torch's SDPA or fastmae_kernels' Triton kernels for short sequences, per stack (the decoder's
        # head dim 32 is where cuDNN pads most, benchmarks/NOTES.md §7.5); the decoder follows the encoder unless set
        self.attn_backend = attn_backend
        self.decoder_attn_backend = attn_backend if decoder_attn_backend is None else decoder_attn_backend
        for name, value, blocks in (("attn_backend", self.attn_backend, self.blocks),
                                    ("decoder_attn_backend", self.decoder_attn_backend, self.decoder_blocks)):
            if value not in fk.ATTENTION_BACKENDS:
                raise ValueError(f"{name} must be one of {fk.ATTENTION_BACKENDS}, got {value!r}")
            for blk in blocks:
                blk.attn.backend = value
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder and decoder block in backward instead of keeping its activations:
        activation memory drops to one block's plus the residual stream, for ~1/3 more forward compute."""
        self.grad_checkpointing = bool(enable)

    def _block_ops_for(self, setting: str, compiled: bool, device: torch.device | str) -> str:
        """The concrete backend a fused block op (the norms' add + LayerNorm, the MLPs' bias + GELU) runs on, in
        eager mode or inside torch.compile (`compiled`): an explicit setting as given, in both; "auto" torch's
        ops in both. Inside torch.compile Inductor fuses those ops into its own kernels (whether a hand kernel
        beats Inductor's is a measurement: benchmarks/NOTES.md §6.10, §6.6). In eager mode the fused kernels'
        Python autograd nodes cost more host time than their kernels save on the H200's host (NOTES §7.3), so
        they are opt-in. "torch" also where the kernels backend's Triton kernels cannot run
        (fastmae_kernels.dispatch.block_ops_backend), so nothing claims a fusion that does not run."""
        del compiled  # one rule for both since 2026-12-04 (NOTES §7.3); callers still say which they ask about
        return fk.dispatch.block_ops_backend("torch" if setting == "auto" else setting, device)

    def norm_backend_for(self, compiled: bool, device: torch.device | str) -> str:
        """The backend each residual add + LayerNorm runs on, eager or inside torch.compile (`_block_ops_for`)."""
        return self._block_ops_for(self.norm_backend, compiled, device)

    def gelu_backend_for(self, compiled: bool, device: torch.device | str) -> str:
        """The backend each MLP's fc1 bias + GELU runs on (`_block_ops_for`); "torch" means nn.Linear + nn.GELU."""
        return self._block_ops_for(self.gelu_backend, compiled, device)

    def _resolved_gelu_backend(self, device: torch.device) -> str | None:
        """What `Block(..., gelu_backend=)` takes: None for the plain modules."""
        backend = self.gelu_backend_for(torch.compiler.is_compiling(), device)
        return None if backend == "torch" else backend

    def _run_stack(self, blocks: nn.ModuleList, x: torch.Tensor, last_rows: torch.Tensor | None = None):
        """x [N, S, D] through `blocks` -> (stream, pending): the stack's output is stream + pending (pending is
        None without blocks), [N, S, D] each, or [N, M, D] at `last_rows` [N, M] (the last block's rows)."""
        backend = self.norm_backend_for(torch.compiler.is_compiling(), x.device)
        gelu = self._resolved_gelu_backend(x.device)
        pending = None
        for i, blk in enumerate(blocks):
            rows = last_rows if i == len(blocks) - 1 else None
            if self.grad_checkpointing and torch.is_grad_enabled():  # non-reentrant: works with compile and ZeRO
                x, pending = checkpoint(blk, x, rows, pending, backend, gelu, use_reentrant=False)
            else:
                x, pending = blk(x, rows, pending, norm_backend=backend, gelu_backend=gelu)
        return x, pending

    def _final_norm(self, norm: nn.Module, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """norm(x + pending), in the dtype norm() returns (fp32 under autocast), as the official model's."""
        backend = self.norm_backend_for(torch.compiler.is_compiling(), x.device)
        return add_norm(norm, x, pending, backend, for_linear=False)[1]

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        ids_keep, ids_restore, mask = fk.random_masking(noise, mask_ratio, backend=self.backend)
        patches = fk.gather_patches(imgs, ids_keep, self.patch_size, backend=self.backend)  # [N, K, p*p*C]
        x = self.patch_embed.embed_patches(patches)  # [N, K, D]
        x = x + self.pos_embed[0, 1:][ids_keep]  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)  # [N, 1+K, D]
        x, pending = self._run_stack(self.blocks, x)
        return self._final_norm(self.norm, x, pending), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions [N, L, p*p*C], or [N, M, p*p*C] at the patches `rows` [N, M] only."""
        x = self.decoder_embed(x)  # [N, 1+K, Dd]
        patches = fk.insert_mask_tokens(
            x[:, 1:], self.mask_token, ids_restore, self.decoder_pos_embed[:, 1:], backend=self.backend
        )  # [N, L, Dd]
        cls = x[:, :1] + self.decoder_pos_embed[:, :1]
        x = torch.cat([cls.to(patches.dtype), patches], dim=1)  # [N, 1+L, Dd]
        out_rows = None if rows is None else rows + 1  # [N, M] in the sequence: the cls token leads it
        x, pending = self._run_stack(self.decoder_blocks, x, out_rows)  # with rows: [N, M, Dd] each
        if rows is None:
            x, pending = x[:, 1:], None if pending is None else pending[:, 1:]  # [N, L, Dd] without the cls token
        elif pending is None:  # no decoder blocks: the rows straight from the embedding
            x = select_rows(x, out_rows)
        return self.decoder_pred(self._final_norm(self.decoder_norm, x, pending))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return fk.masked_mse_loss(pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss, backend=self.backend)

    def forward_loss_rows(self, imgs: torch.Tensor, pred: torch.Tensor, rows: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """The official loss from the masked rows' predictions pred [N, M, p*p*C] at patches `rows` [N, M]:
        they go back to their places in a zero [N, L, p*p*C] and the fused loss reads those rows only (the
        mask weighs the others 0). One scatter (~77 MB of bf16 at ViT-B b256) keeps the loss one kernel each
        way; targets gathered for the rows plus the norm-pix MSE in torch ops would be ~16 kernels in eager."""
        full = pred.new_zeros(pred.shape[0], mask.shape[1], pred.shape[2])  # [N, L, p*p*C]
        full = full.scatter(1, rows.unsqueeze(-1).expand(-1, -1, pred.shape[2]), pred)
        return self.forward_loss(imgs, full, mask)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                masked_only: bool = False):
        """imgs [N, C, H, W] -> (loss, pred [N, L, p*p*C], mask [N, L]), as the official forward.

        masked_only: pred holds the masked patches only, [N, L-K, p*p*C] in raster order
        (== full_pred[mask.bool()].view(N, -1, p*p*C)); same loss and gradients, less decoder work."""
        self.check_images(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, self.make_noise(imgs, noise))
        if not masked_only:
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask
        keep = latent.shape[1] - 1
        rows = torch.argsort(mask, dim=1, stable=True)[:, keep:]  # [N, L-K] masked patches, ascending
        pred = self.forward_decoder(latent, ids_restore, rows)
        return self.forward_loss_rows(imgs, pred, rows, mask), pred, mask
