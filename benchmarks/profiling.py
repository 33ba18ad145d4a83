"""What the generator benchmarks measure inside a pipeline: UNet FLOPs, the UNet work actually run, stage times.

* :func:`unet_flops_per_latent`: the model FLOPs of **one** UNet forward per latent, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on the eager UNet during the first forward of one pipeline call,
  which is then stopped (no full eager run per batch size). The UNet is batch-independent (every layer acts per
  sample), so the FLOPs of a forward over ``b`` latents are ``b`` times that.
* :class:`ModuleClock`: counts every forward of named modules (the UNet, the VAE encoder and decoder, the text
  encoder) and the latents each one received, and times them (CUDA events on a GPU, so nothing is synchronised
  inside the pipeline; ``perf_counter`` on a CPU). UNet FLOPs run = FLOPs per latent x latents fed to the UNet:
  classifier-free guidance (InstructPix2Pix feeds 3 copies of each latent, text2img/img2img 2), img2img's
  ``int(steps x strength)`` schedule, the padded rows of strength buckets and schedulers that run an extra step
  are all included because they are observed, not predicted.
* :class:`Stages`: wall time per named stage of a loop (synchronising the device at each boundary).

MFU = UNet FLOPs run / seconds / the device's dense fp16/bf16 peak (``common.PEAK_DENSE_FP16_FLOPS``).
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable, Mapping

import torch

from benchmarks import common


class _FirstForwardCounted(Exception):
    """Raised from the UNet's forward hook to stop a pipeline call once its first forward is counted."""


def eager_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), or the module itself."""
    return getattr(module, "_orig_mod", module)


def unet_flops_per_latent(pipe, call: Callable[[], object]) -> dict:
    """FLOPs of one UNet forward per latent, from the first UNet forward of ``call()`` on the eager UNet.

    ``call`` runs one pipeline call on ``pipe`` (any task, batch or step count); it is interrupted right after
    the UNet's first forward, so the cost is the text encoding, the VAE encoding of a source image, and one
    UNet forward, counted without compilation (the compiled graph computes the same ops). Returns
    ``{"unet_flops_per_latent", "unet_batch_counted", "unet_flops_counted"}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    compiled, eager = pipe.unet, eager_module(pipe.unet)
    counted: dict = {}
    mode = FlopCounterMode(display=False)

    def pre(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        counted["batch"] = int(sample.shape[0])
        mode.__enter__()

    def post(module, args, kwargs, output):
        mode.__exit__(None, None, None)
        counted["flops"] = int(mode.get_total_flops())
        raise _FirstForwardCounted

    handles = [eager.register_forward_pre_hook(pre, with_kwargs=True),
               eager.register_forward_hook(post, with_kwargs=True)]
    pipe.unet = eager
    try:
        with torch.inference_mode():
            call()
    except _FirstForwardCounted:
        pass
    finally:
        pipe.unet = compiled
        for handle in handles:
            handle.remove()
    if "flops" not in counted:
        raise RuntimeError("the pipeline call ran no UNet forward, so no FLOPs were counted; check the call's "
                           "num_inference_steps (and strength for img2img)")
    return {"unet_flops_per_latent": counted["flops"] / counted["batch"], "unet_batch_counted": counted["batch"],
            "unet_flops_counted": counted["flops"]}


def pipeline_modules(pipe) -> dict[str, torch.nn.Module]:
    """The modules of a Stable Diffusion pipeline worth timing, by name (those the pipeline has)."""
    modules = {"unet": getattr(pipe, "unet", None), "text_encoder": getattr(pipe, "text_encoder", None),
               "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        modules["vae_encoder"] = getattr(vae, "encoder", None)
        modules["vae_decoder"] = getattr(vae, "decoder", None)
    return {name: module for name, module in modules.items() if isinstance(module, torch.nn.Module)}


class ModuleClock:
    """Count and time every forward of ``modules`` (name -> module) while attached.

    Hooks go on the modules as the pipeline holds them (a compiled UNet's ``OptimizedModule`` wrapper), outside
    any compiled region, so they do not change what is compiled. On CUDA each forward records two events and
    :meth:`totals` synchronises once to read them; on a CPU forwards are timed with ``perf_counter``.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._handles = []
        self._open: dict[str, list] = collections.defaultdict(list)
        self._spans: dict[str, list] = collections.defaultdict(list)
        self.calls: collections.Counter = collections.Counter()
        self.latents: collections.Counter = collections.Counter()  # samples fed to each module, summed
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name), with_kwargs=True))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            self.calls[name] += 1
            if isinstance(first, torch.Tensor) and first.dim() > 0:
                self.latents[name] += int(first.shape[0])
            self._open[name].append(self._now())
        return hook

    def _post(self, name: str):
        def hook(module, args, kwargs, output):
            self._spans[name].append((self._open[name].pop(), self._now()))
        return hook

    def reset(self) -> None:
        self._spans.clear()
        self._open.clear()
        self.calls.clear()
        self.latents.clear()

    def seconds(self) -> dict[str, float]:
        """Seconds spent in each module's forwards since the last :meth:`reset` (synchronises on CUDA)."""
        if self.cuda and self._spans:
            torch.cuda.synchronize(self.device)
        totals = {}
        for name, spans in self._spans.items():
            if self.cuda:
                totals[name] = sum(start.elapsed_time(end) for start, end in spans) / 1e3
            else:
                totals[name] = sum(end - start for start, end in spans)
        return totals

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ModuleClock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Stages:
    """Wall seconds per named stage, accumulated over a loop: ``with stages("decode"): ...``.

    The device is synchronised when a stage starts and ends, so a stage's time is the work it queued. In a
    producer every stage already ends in a host-device copy (the source upload, the results' download), so the
    synchronisations add nothing the loop did not already wait for.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        common.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            common.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()


def mfu(flops: float | None, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops / seconds / peak`` (None without a peak or FLOPs)."""
    if not flops or not peak or not seconds or seconds <= 0:
        return None
    return flops / seconds / peak
