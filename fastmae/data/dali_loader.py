"""NVIDIA DALI pretraining loader: decode + RandomResizedCrop (bicubic) + flip + normalise in DALI.

Decoding is on the GPU (device "mixed": nvJPEG, with the A100/H100 hardware JPEG decoder taking
`hw_decoder_load` of the work) when cfg.device is a CUDA device, else on the CPU (libjpeg-turbo,
device_id=None). The crop window is decoded alone (`decoders.image_slice`: ROI decoding skips the
rows below the crop and the IDCT of blocks outside it). On the GPU, DALI then resizes it to input_size
with a cubic antialiased filter, mirrors and normalises to CHW float in one `crop_mirror_normalize`. On
the CPU, DALI hands the decoded crops over and torch's uint8 antialiased bicubic kernel finishes them
(host_resize.py, in a background thread: background.py): ~6x faster than DALI's CPU resize, and closer
to PIL's (the torchvision loader's).

The sample order, crop windows and flips come from the host (dali_feed.py), from the same
(seed, epoch, index) arithmetic as the torchvision loader, so both loaders read the same images
with the same crops, per-rank shards are DistributedSampler's, and resume is exact. One pipeline
is built per epoch pass; its external source is told the batch number, so prefetching ahead is safe.
"""

import importlib.util
from typing import Iterator

import numpy as np
import torch

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.background import in_background
from fastmae.data.base import LoaderBase, log
from fastmae.data.config import DataConfig
from fastmae.data.dali_feed import CONVERTED, DaliFeed
from fastmae.data.host_resize import resize_flip_normalize
from fastmae.data.sources import Source


def unavailable_reason(cfg: DataConfig) -> str | None:
    """None when DALI can serve `cfg` here, else one line saying why not."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return "nvidia-dali is not installed (pip install nvidia-dali-cuda130)"
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install is "unusable", not a crash
        return f"nvidia.dali fails to import: {type(e).__name__}: {e}"
    if torch.device(cfg.device).type not in ("cpu", "cuda"):
        return f"DALI delivers to cpu or cuda, not {cfg.device}"
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        return f"device {cfg.device} requested but CUDA is not available"
    return None


def _build_pipeline(cfg: DataConfig, feed_fn, pixels: bool, device_id: int | None, dali_finishes: bool):
    """dali_finishes: DALI resizes, mirrors and normalises (on the GPU; on the CPU only in the test of that graph),
    else it returns the decoded crops for host_resize."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    S = cfg.input_size

    @pipeline_def(
        batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id,
        prefetch_queue_depth=2, seed=cfg.seed, exec_async=True, exec_pipelined=True,
    )
    def pipe():
        # the flips go to the pipeline only when it finishes the images; otherwise the host applies them
        outs = fn.external_source(source=feed_fn, num_outputs=4 if dali_finishes else 3, batch=True, batch_info=True)
        data, start, shape, flip = outs if dali_finishes else (*outs, None)
        if pixels:  # embedded default set: HWC uint8 arrays, no decoding
            images = fn.slice(data, start=start, shape=shape, axis_names="WH")
            images = images.gpu() if gpu else images
        else:
            # preallocations from DALI's ImageNet examples: avoid regrowing nvJPEG's buffers in the first epochs
            padding = dict(device_memory_padding=211025920, host_memory_padding=140544512) if gpu else {}
            images = fn.decoders.image_slice(
                data, start=start, shape=shape, axis_names="WH",
                device="mixed" if gpu else "cpu", output_type=types.RGB,
                adjust_orientation=False,  # PIL (the torchvision loader) ignores EXIF orientation too
                **padding,
            )
        if not dali_finishes:
            return images  # B crops [h_i, w_i, 3] uint8; host_resize finishes them
        images = fn.resize(images, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(
            images, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
        )

    p = pipe()
    p.build()
    return p


def _never_called(info):
    raise StopIteration


class DaliLoader(LoaderBase):
    # None: DALI finishes the images on the GPU, the host on the CPU. True on the CPU runs the GPU's graph
    # (DALI resize + crop_mirror_normalize) there, so tests cover it on a machine without a GPU.
    dali_finishes: bool | None = None

    def __init__(self, cfg: DataConfig, source: Source):
        reason = unavailable_reason(cfg)
        if reason is not None:
            raise RuntimeError(f"DALI loader unusable: {reason}")
        super().__init__(cfg, len(source))
        self.source = source
        self.num_non_image_files = source.num_ignored
        dev = torch.device(cfg.device)
        self.device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else None
        self.name = "dali-gpu" if self.device_id is not None else "dali-cpu"
        self._dali_finishes = self.device_id is not None if self.dali_finishes is None else self.dali_finishes
        if self.device_id is not None and not self._dali_finishes:
            raise ValueError("on a GPU, DALI finishes the images on the device (dali_finishes=False is CPU only)")
        self._feed = DaliFeed(source, cfg.seed)
        # Build one pipeline now so a DALI that cannot run here (no GPU access, driver mismatch) fails at
        # construction, where build_pretrain_loader's "auto" can fall back to torchvision, not mid-training.
        del_me = self._pipeline(_never_called)
        del del_me

    def _pipeline(self, feed_fn):
        return _build_pipeline(self.cfg, feed_fn, self._feed.pixels, self.device_id, self._dali_finishes)

    def _batches(self, start: int) -> Iterator[torch.Tensor]:
        if not self._dali_finishes:  # the host finishes the crops: do it beside the training step, not in it
            yield from in_background(lambda: self._decoded_batches(start))
        else:
            yield from self._decoded_batches(start)

    def _decoded_batches(self, start: int) -> Iterator[torch.Tensor]:
        b = start
        while b < self.steps_per_epoch:
            in_flight: dict[int, list] = {}
            try:
                for imgs in self._pass(b, in_flight):
                    self._count(in_flight.pop(b))
                    b += 1
                    yield imgs
            except RuntimeError as e:
                # A decode failure invalidates the pipeline. Find the culprits among the files in flight,
                # skip them from now on, and rebuild at the same batch; give up if none is found.
                used = [info[0] for infos in in_flight.values() for info in infos]
                if self._feed.pixels or self._feed.find_bad(used) == 0:
                    raise
                lines = [ln for ln in str(e).splitlines() if "Failed to decode" in ln] or [type(e).__name__]
                log.warning("DALI: %s in batch %d; retrying without the unreadable files", lines[0].strip(), b)

    def _pass(self, start: int, in_flight: dict[int, list]) -> Iterator[torch.Tensor]:
        """One pipeline from batch `start` to the end of the epoch; fills in_flight[b] with sample infos."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        epoch, B = self.epoch, self.cfg.batch_size
        indices = self.epoch_indices()  # [steps * B]
        flips_of: dict[int, list[bool]] = {}  # batch -> its flips, for the host-side finish on CPU

        def feed_fn(info):  # called by DALI, possibly ahead of consumption, with this pass's iteration
            b = start + info.iteration
            if b >= self.steps_per_epoch:
                raise StopIteration
            data, starts, shapes, flips, sample_infos = self._feed.batch(epoch, indices[b * B : (b + 1) * B])
            in_flight[b] = sample_infos
            if self._dali_finishes:
                return data, starts, shapes, flips
            flips_of[b] = [bool(f) for f in flips]
            return data, starts, shapes

        pipe = self._pipeline(feed_fn)
        try:
            for b in range(start, self.steps_per_epoch):
                (out,) = pipe.run()
                if not self._dali_finishes:
                    crops = [np.asarray(out[i]) for i in range(len(out))]  # B x [h_i, w_i, 3] uint8, DALI's buffers
                    yield resize_flip_normalize(crops, flips_of.pop(b), self.cfg.input_size)  # [B, 3, S, S]
                    continue
                dense = out.as_tensor()  # [B, 3, S, S] float32, in DALI's buffer (reused next run)
                if self.device_id is None:  # the GPU's graph run on the CPU (tests)
                    yield torch.from_numpy(np.array(dense))  # a copy: DALI reuses its buffer next run
                else:
                    imgs = torch.empty(dense.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
                    feed_ndarray(dense, imgs, cuda_stream=torch.cuda.current_stream(self.device_id))
                    yield imgs
        finally:
            del pipe

    def _count(self, sample_infos) -> None:
        for used, status, bad in sample_infos:
            for i, reason in bad:
                self._note_bad(i, self.source.describe(i), reason)
            if status == CONVERTED:
                self._note_converted(used)
