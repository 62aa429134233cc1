"""The pretraining loop: data -> DeepSpeed engine, with the schedule, logging, checkpoints, preemption
and the NaN guard. `run(cfg, dist)` returns the process exit code."""

import os
import time
from dataclasses import dataclass

import torch

import fastmae_kernels as fk
from fastmae.data.loader import DataConfig, build_pretrain_loader
from fastmae.train import checkpoint as ckpt
from fastmae.train import distributed as D
from fastmae.train import rng
from fastmae.train.config import PRECISIONS, TrainConfig
from fastmae.train.engine import WEIGHT_DTYPES, build_engine, check_precision, input_dtype, setup_warnings
from fastmae.train.logging import StepTimer, TrainLogger
from fastmae.train.nan_guard import NanGuard
from fastmae.train.schedule import lr_at, set_lr
from fastmae.train.signals import PreemptionFlag
from fastmae.train.step_flags import LaggedFlags
from fastmae.train.step_profiler import StepProfiler

EXIT_OK, EXIT_TOO_MANY_BAD_STEPS, EXIT_CHECKPOINT_FAILED = 0, 3, 4


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (skipped NaN steps included: they consumed their data)
    last_saved: str | None = None
    last_saved_step: int = -1


def _trainer_state(progress: Progress, loader, guard: NanGuard, world_size: int) -> dict:
    return {
        "step": progress.step, "loader": loader.state_dict(), "rng": rng.capture(),
        "skipped_steps": guard.skipped_steps, "world_size": world_size,
    }


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: D.DistInfo, preempt: PreemptionFlag):
        self.cfg, self.dist, self.preempt = cfg, dist, preempt
        self.device = dist.device
        rng.seed_all(cfg.seed)  # identical initial weights on every rank (DeepSpeed also broadcasts rank 0's)
        self.loader = build_pretrain_loader(DataConfig(
            data_path=cfg.data_path, input_size=cfg.input_size, batch_size=cfg.batch_size,
            num_workers=cfg.num_workers, seed=cfg.seed, loader=cfg.loader, rank=dist.rank,
            world_size=dist.world_size, device=str(self.device), default_num_images=cfg.default_num_images,
            default_image_size=cfg.default_image_size,
        ))
        self.engine, self.optimizer, self.gate = build_engine(cfg, self.device)
        self.precision = check_precision(self.engine, cfg)  # e.g. "bf16 (float32 weights, bf16 autocast)"
        rng.seed_all(cfg.seed + dist.rank)  # per-rank streams for anything else random, as official
        self.guard = NanGuard(self.engine.module, self.device, cfg.max_bad_steps, check_grads=cfg.precision != "fp16",
                              grads_kept=self.engine.zero_optimization_stage() == 0)
        self.flags = LaggedFlags(self.device)
        self.num_patches = self.engine.module.patch_embed.num_patches
        self.dtype = input_dtype(cfg)
        self.progress = Progress()
        spe = self.loader.steps_per_epoch
        self.total_steps = cfg.epochs * spe // cfg.accum_iter
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.sample_imgs: torch.Tensor | None = None
        self._preempted = False  # some rank was signalled, as of the last step whose flags were read
        self._last_bad = False  # whether that step was skipped (the step log's bad_step)
        self._stop_step: int | None = None  # the step that made too many bad steps in a row
        self.profiler = StepProfiler(cfg.profile_steps, self.device, cfg.output_dir, enabled=dist.is_main)

    # -- start / resume -----------------------------------------------------------------------------
    def restore(self) -> int:
        """Loads the --resume checkpoint if any; returns the epoch to start in."""
        cfg, root = self.cfg, ckpt.root_dir(self.cfg.output_dir)
        if self.dist.is_main:
            ckpt.clean_partial(root)
        D.barrier()
        path = ckpt.find_resume(cfg.resume, cfg.output_dir)
        if path is None:
            return 0
        self._check_resume_precision(path)
        state = ckpt.load(self.engine, path, self.dist.rank)
        self.progress = Progress(step=state["step"], last_saved=path, last_saved_step=state["step"])
        self.loader.load_state_dict(state["loader"])
        self.guard.skipped_steps = state["skipped_steps"]
        if state["world_size"] == self.dist.world_size:
            rng.restore(state["rng"])
        if self.dist.is_main:
            print(f"fastmae: resumed from {path} at step {state['step']}", flush=True)
        return int(state["loader"]["epoch"])

    def _check_resume_precision(self, path: str) -> None:
        """fp32 and bf16 (autocast) keep fp32 weights and the same optimizer state; bf16-pure and fp16 keep
        DeepSpeed's low-precision weights with fp32 master copies, a different layout: refuse to mix them."""
        recorded = ckpt.read_meta(path).get("precision")  # None: written before fastmae recorded it
        if recorded in PRECISIONS and WEIGHT_DTYPES[recorded] != WEIGHT_DTYPES[self.cfg.precision]:
            raise ckpt.CheckpointError(
                f"--resume {path} was written with --precision {recorded} ({WEIGHT_DTYPES[recorded]} weights); "
                f"resume it with --precision {recorded}, or start a new run from its weights"
            )

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        start_epoch = self.restore()
        self.log = TrainLogger(cfg, enabled=self.dist.is_main, total_steps=self.total_steps,
                               start_step=self.progress.step)
        if self.dist.is_main:
            self.log.message(self.describe())
            for warning in setup_warnings(cfg):
                self.log.message(warning)
        try:
            code = self._epochs(start_epoch)
            if code is None:
                code = self._finish()
            return code
        finally:
            self.profiler.close()
            self.log.close()

    def describe(self) -> str:
        c, e = self.cfg, self.engine
        return (
            f"fastmae: {c.model} @ {c.input_size}px on {self.dist.world_size} x {self.device.type}, data "
            f"{self.loader.name} ({self.loader.num_images} images, {self.loader.steps_per_epoch} batches/epoch/rank), "
            f"batch {c.batch_size}/rank x accum {c.accum_iter} = {c.eff_batch_size}, lr {c.lr:.3g} (blr {c.blr:.3g}), "
            f"ZeRO {e.zero_optimization_stage()}, {self.precision}, {self._speed()}, {self.total_steps} steps, "
            f"output {c.output_dir}"
        )

    def _speed(self) -> str:
        """e.g. "eager, MAE kernels cuda, add+LayerNorm fused, bias+GELU fused" (--fused_block_ops) or "compiled
        (default) + block checkpointing, MAE kernels cuda" (torch's block ops, which Inductor fuses itself under
        --compile: the model's norm_backend and gelu_backend "auto")."""
        c = self.cfg
        mode = f"compiled ({c.compile_mode})" if c.compile else "eager"
        if c.grad_checkpointing:
            mode += " + block checkpointing"
        model = self.engine.module
        parts = [mode, f"MAE kernels {fk.resolve_backend(model.backend, self.device)}"]
        if model.norm_backend_for(compiled=c.compile, device=self.device) != "torch":
            parts.append("add+LayerNorm fused")
        if model.gelu_backend_for(compiled=c.compile, device=self.device) != "torch":
            parts.append("bias+GELU fused")
        if (c.attn_backend, c.decoder_attn_backend) != ("sdpa", "sdpa"):
            parts.append(f"attention {c.attn_backend}" if c.attn_backend == c.decoder_attn_backend
                         else f"attention encoder {c.attn_backend}, decoder {c.decoder_attn_backend}")
        return ", ".join(parts)

    def _epochs(self, start_epoch: int) -> int | None:
        cfg, spe = self.cfg, self.loader.steps_per_epoch
        timer = StepTimer()
        step_loss = torch.zeros((), device=self.device)
        interval_loss = torch.zeros((), device=self.device)
        micro = 0
        lr = 0.0
        for epoch in range(start_epoch, cfg.epochs):
            self.loader.set_epoch(epoch)
            epoch_loss, epoch_batches = torch.zeros((), device=self.device, dtype=torch.float64), 0
            it = iter(self.loader)
            while True:
                t = time.perf_counter()
                imgs = next(it, None)  # [B, 3, S, S]
                timer.data_wait += time.perf_counter() - t
                if imgs is None:
                    break
                batch_pos = self.loader.batch - 1  # the loader counts the batch in hand as consumed
                if micro == 0:
                    lr = lr_at(epoch + batch_pos / spe, lr=cfg.lr, min_lr=cfg.min_lr,
                               warmup_epochs=cfg.warmup_epochs, epochs=cfg.epochs)
                    set_lr(self.optimizer, lr)
                if self.dist.is_main and self.sample_imgs is None:
                    self.sample_imgs = imgs[:8].detach().float().cpu()
                loss = self._forward_backward(imgs, epoch, batch_pos)
                step_loss += loss.detach().float() / cfg.accum_iter
                epoch_loss += loss.detach().double()
                epoch_batches += 1
                micro += 1
                if micro < cfg.accum_iter:
                    self.engine.step()  # DeepSpeed counts micro-steps; no optimizer step here
                    continue
                micro = 0
                code = self._optimizer_step(lr, epoch, step_loss, interval_loss, timer)
                step_loss.zero_()
                if code is not None:
                    return code
                if self.progress.step >= self.total_steps:
                    self._log_epoch(epoch, epoch_loss, epoch_batches, lr)
                    return None
            self._log_epoch(epoch, epoch_loss, epoch_batches, lr)
        return None

    def _forward_backward(self, imgs: torch.Tensor, epoch: int, batch_pos: int) -> torch.Tensor:
        cfg = self.cfg
        noise = rng.masking_noise(cfg.seed, epoch, batch_pos, self.dist.rank, self.dist.world_size,
                                  imgs.shape[0], self.num_patches, self.device)  # [B, L]
        # masked_only: the decoder's last block and head skip the visible patches the loss ignores (exact)
        loss, _, _ = self.engine(imgs.to(self.dtype), mask_ratio=cfg.mask_ratio, noise=noise, masked_only=True)
        if self.progress.step + 1 in cfg.fault_nan_steps:  # reliability test: a poisoned batch
            loss = loss * float("nan")
        if self.progress.step + 1 in cfg.fault_inf_grad_steps:  # reliability test: finite loss, Inf gradients
            loss.register_hook(lambda grad: grad * float("inf"))
        self.guard.note_loss(loss)
        self.engine.backward(loss)
        return loss

    def _optimizer_step(self, lr, epoch, step_loss, interval_loss, timer) -> int | None:
        cfg, prog = self.cfg, self.progress
        step = prog.step + 1
        flags = self.flags.publish(step, self.guard.local_bad(), self.preempt.raised)  # [2] on the device
        # A bad step is skipped on the device (fused AdamW), so the host reads its flags a step later; an
        # optimizer that cannot skip on the device needs the flag now (a host wait).
        on_device = self.gate.skips_on_device
        if on_device:
            self.gate.found_inf = flags[0]
        else:
            self._read_flags(step)
            self.gate.veto = self._last_bad
        self.engine.step()
        self.gate.found_inf, self.gate.veto = None, False
        self.guard.reset()
        interval_loss += torch.where(flags[0] > 0, torch.zeros_like(step_loss), step_loss)  # a bad step counts 0
        prog.step = step
        self.profiler.step_done()
        timer.images += cfg.batch_size * cfg.accum_iter
        timer.steps += 1
        if cfg.fault_step_sleep:
            time.sleep(cfg.fault_step_sleep)
        log_now = step % cfg.log_every == 0 or step >= self.total_steps
        save_now = step % cfg.save_every_steps == 0 or step >= self.total_steps
        # a step that reads the device anyway (a log line, a checkpoint, the last step) reads its own flags now
        self._read_flags(step if log_now or save_now else step - 1)
        if self._preempted:
            self._read_flags(step)  # the checkpoint below records this step's skipped count too
        if log_now or self._preempted:
            self._log_step(lr, epoch, step_loss, interval_loss, timer, self._last_bad)
        self.log.advance()
        if self._stop_step is not None:
            where = prog.last_saved or "none (no checkpoint was written yet)"
            self._say(f"fastmae: stopping after {cfg.max_bad_steps} consecutive steps with NaN/Inf loss or "
                      f"gradients (step {self._stop_step}); last good checkpoint: {where}")
            return EXIT_TOO_MANY_BAD_STEPS
        # A skipped step left the last good state in place, so saving now is safe (and save() re-checks).
        if self._preempted or save_now:
            code = self._save()
            if code is not None:
                return code
        if self._preempted:
            self._say(f"fastmae: preempted (signal); checkpoint {prog.last_saved} written at step {prog.step}; exiting")
            return EXIT_OK
        return None

    def _read_flags(self, up_to_step: int) -> None:
        """Acts on the flags of the steps up to `up_to_step` not read yet, in order: counts the skipped steps,
        notes the step where a streak of bad steps reached --max_bad_steps, and a preemption."""
        for f in self.flags.take(up_to_step):
            self.guard.record(f.bad)
            self._last_bad = f.bad
            self._preempted = self._preempted or f.preempted
            if f.bad and self.guard.should_stop and self._stop_step is None:
                self._stop_step = f.step

    def _log_step(self, lr, epoch, step_loss, interval_loss, timer, bad) -> None:
        vals = D.all_reduce_mean(torch.stack([step_loss.float(), interval_loss.float()]))
        loss, interval = vals.tolist()
        elapsed = timer.elapsed()
        per_device = timer.images / elapsed
        record = {
            "step": self.progress.step, "epoch": epoch + self.loader.batch / self.loader.steps_per_epoch,
            "loss": loss, "loss_avg": interval / max(timer.steps, 1), "lr": lr,
            "img_per_s_per_device": per_device, "img_per_s": per_device * self.dist.world_size,
            "data_wait": timer.data_wait / elapsed, "skipped_steps": self.guard.skipped_steps, "bad_step": bad,
        }
        self.log.step(record)
        interval_loss.zero_()
        timer.reset()

    def _log_epoch(self, epoch, epoch_loss, batches, lr) -> None:
        if batches == 0:
            return
        self._read_flags(self.progress.step)  # the skipped count below includes the epoch's last step
        mean = D.all_reduce_mean(epoch_loss / batches).item()
        self.log.epoch({"train_loss": mean, "train_lr": lr, "epoch": epoch, "step": self.progress.step,
                        "skipped_steps": self.guard.skipped_steps})

    def _save(self) -> int | None:
        prog = self.progress
        if prog.last_saved_step == prog.step:
            return None
        try:
            path = ckpt.save(
                self.engine, self.cfg.output_dir, prog.step,
                _trainer_state(prog, self.loader, self.guard, self.dist.world_size), self.dist.rank,
                keep_last=self.cfg.keep_last, fault_disk_full=prog.step == self.cfg.fault_disk_full_step,
                model_meta={"name": self.cfg.model, "norm_pix_loss": self.cfg.norm_pix_loss,
                            "input_size": self.cfg.input_size}, precision=self.cfg.precision,
            )
        except ckpt.CheckpointError as e:
            keep = prog.last_saved or "none"
            self._say(f"fastmae: error: {e}; previous checkpoint intact: {keep}")
            return EXIT_CHECKPOINT_FAILED
        prog.last_saved, prog.last_saved_step = path, prog.step
        return None

    def _finish(self) -> int:
        code = self._save()
        if code is not None:
            return code
        self._reconstruction_png()
        if self.dist.is_main:
            self.log.message(f"fastmae: done at step {self.progress.step}; checkpoint {self.progress.last_saved}")
        return EXIT_OK

    def _reconstruction_png(self) -> None:
        from fastmae.reconstruction import save_reconstruction_grid

        module = self.engine.module
        gather = None
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()))
            gather.__enter__()
        try:
            if self.dist.is_main and self.sample_imgs is not None:
                path = os.path.join(self.cfg.output_dir, "reconstruction.png")
                save_reconstruction_grid(module, self.sample_imgs, path, self.cfg.mask_ratio, seed=self.cfg.seed)
                self.log.message(f"fastmae: reconstructions in {path}")
        finally:
            if gather is not None:
                gather.__exit__(None, None, None)

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            self.log.message(text)


def run(cfg: TrainConfig, dist: D.DistInfo, preempt: PreemptionFlag) -> int:
    trainer = Trainer(cfg, dist, preempt)
    return trainer.run()
