"""A cascade stage: its config, network and diffusion, and how to call the network from the samplers.

``Stage.load`` accepts a training run directory (latest checkpoint, EMA weights by default) or an
exported stage directory (``model.safetensors`` + ``stage.json``), so sampling code never cares which.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from .augment import BlurAugmentation, NoAugmentation, NoiseAugmentation
from .checkpoint import STAGE_FILE, is_exported_stage, load_state, load_tensors, load_weights_into, resolve_checkpoint
from .config import StageConfig
from .diffusion import GaussianDiffusion, make_beta_schedule
from .errors import UserError
from .hardware import bf16_autocast, choose_precision
from .rng import Generator
from .samplers import StepCallback, make_cfg_model_fn, sample
from .unet import UNet


def build_network(config: StageConfig, device: str | torch.device = "cpu") -> UNet:
    with torch.device(device):
        return UNet(config.unet_config())


def build_diffusion(config: StageConfig) -> GaussianDiffusion:
    d = config.diffusion
    return GaussianDiffusion(
        make_beta_schedule(d.schedule, d.timesteps),
        prediction=d.prediction,
        learn_sigma=d.learn_sigma,
        loss=d.loss,
        vlb_weight=d.vlb_weight,
        loss_weighting=d.loss_weighting,
        min_snr_gamma=d.min_snr_gamma,
    )


def build_augmentation(config: StageConfig):
    """The conditioning augmentation of an SR stage (``None`` for a base stage)."""
    if not config.is_sr:
        return None
    c = config.conditioning
    if c.augmentation == "noise":
        prev = GaussianDiffusion(make_beta_schedule(c.noise_schedule, c.noise_timesteps))
        return NoiseAugmentation(
            prev.alphas_cumprod, c.s_min, c.s_max, fixed_s=c.fixed_s if c.fixed_s >= 0 else None
        )
    if c.augmentation == "blur":
        return BlurAugmentation(c.blur_kernel, c.blur_sigma_min, c.blur_sigma_max, c.blur_prob)
    return NoAugmentation()


def network_call(net: Callable[..., torch.Tensor], device: str | torch.device, *, autocast,
                 channels_last: bool = False, cuda_graphs: bool = False) -> Callable[..., torch.Tensor]:
    """The one way the library calls a U-Net, in sampling and in training: ``call(x, t_scaled, labels, aug_level,
    low_res)`` with ``x`` in channels_last where asked, under :func:`~.hardware.bf16_autocast` (``autocast``: a
    bool or a :class:`~.hardware.Precision`), returning fp32 (copied out of the graph's memory when the network
    replays CUDA graphs, before the next replay can overwrite it)."""

    def call(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, aug_level: torch.Tensor | None = None,
             low_res: torch.Tensor | None = None) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with bf16_autocast(device, autocast):
            out = net(x, t, y=labels, aug_level=aug_level, low_res=low_res)
        return out.float().clone() if cuda_graphs and out.dtype == torch.float32 else out.float()

    return call


# 16: the README command (64 Fashion-MNIST samples) samples in 5.6 s at 16, 8.2 s at 8, 4.5 s at 64, while a small
# request pays for at most 15 padded samples (16 emoji samples: 5.0 s at 16, 18.8 s at 64); measured on a 2-core
# AVX-512-BF16 EPYC, bf16
CPU_NETWORK_BATCH = 16


def _in_micro_batches(call: Callable[..., torch.Tensor], size: int, x: torch.Tensor, t: torch.Tensor,
                      *rows: torch.Tensor | None) -> torch.Tensor:
    """``call(x, t, *rows)`` on consecutive slices of exactly ``size`` rows (the last padded with copies of its
    last row, whose outputs are dropped), concatenated: the network always sees the same shape."""
    n, outputs = x.shape[0], []
    per_row = [x, t if t.ndim and t.shape[0] == n else None, *rows]
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        pad = size - (hi - lo)

        def cut(a: torch.Tensor | None) -> torch.Tensor | None:
            if a is None:
                return None
            part = a[lo:hi]
            return part if pad == 0 else torch.cat([part, part[-1:].expand(pad, *part.shape[1:])])

        parts = [cut(a) for a in per_row]
        if parts[1] is None:
            parts[1] = t
        outputs.append(call(*parts)[: hi - lo])
    return torch.cat(outputs)


class Stage:
    """A trained (or training) stage ready to sample."""

    def __init__(self, config: StageConfig, net: UNet, device: str | torch.device = "cpu", source: str = ""):
        self.config = config
        self.net = net
        self.device = torch.device(device)
        self.diffusion = build_diffusion(config)
        self.augmentation = build_augmentation(config)
        self.source = source
        self.step: int | None = None
        self._sampling_net: Callable[..., torch.Tensor] = net
        self._cuda_graphs = False
        # As in training, channels_last sampling (GPUs only) needs the weights in channels_last too: a
        # one-channel input (grayscale) is contiguous in both formats, so converting it alone leaves the
        # convolutions in NCHW.
        self._channels_last = config.train.channels_last and self.device.type == "cuda"
        if self._channels_last:
            net.to(memory_format=torch.channels_last)
        # On a CPU the network runs on micro-batches of exactly CPU_NETWORK_BATCH samples (the last one padded):
        # oneDNN picks its kernels by shape, and a 1x1 convolution (a GEMM over N*H*W rows) or a Linear layer sums
        # in another order at another batch size, so without this a sample's bytes would depend on --batch-size
        # and on a torchrun rank's share. At a fixed shape a sample's output depends on it alone, not on its
        # position or neighbours (tests/test_reliability3.py). None: the network sees the sampler's batch.
        self.network_batch: int | None = CPU_NETWORK_BATCH if self.device.type == "cpu" else None

    def compile(self, mode: str | None = None, backend: str = "inductor") -> "Stage":
        """Sample through ``torch.compile(self.net)``. The first batch of each new shape pays the compilation
        (minutes for a large network on a CPU), so this pays off for long sampling runs, not for a few images.
        ``mode="reduce-overhead"`` adds CUDA graphs on GPUs, which removes the kernel-launch cost that
        dominates small networks at small batches; each network call then starts a new graph step and its
        output is copied out of the graph's memory before the next replay can overwrite it."""
        self._sampling_net = torch.compile(self.net, mode=mode, backend=backend)
        self._cuda_graphs = mode == "reduce-overhead" and self.device.type == "cuda"
        return self

    # --- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> "Stage":
        path = Path(path)
        if is_exported_stage(path):
            meta = json.loads((path / STAGE_FILE).read_text())
            config = StageConfig.from_dict(meta["config"], source=str(path / STAGE_FILE))
            tensors, step = load_tensors(path, "model"), meta.get("step")
            ckpt_dir = path
        else:
            if (path / STAGE_FILE).is_file():  # an export into a run dir (refused since): the newest weights win
                warnings.warn(f"{path} holds both an exported stage ({STAGE_FILE}) and training checkpoints; using "
                              "the newest checkpoint (export elsewhere to sample the export)", stacklevel=2)
            # a run directory (its newest readable checkpoint) or one checkpoint directory (checkpoints/step_*)
            (state, tensors), ckpt_dir = resolve_checkpoint(
                path, lambda ckpt: (load_state(ckpt), load_tensors(ckpt, weights)), stems=(weights,),
                expected="a run directory written by `cdm train` (with checkpoints/step_*/) or an exported stage "
                         f"(with {STAGE_FILE})")
            config = StageConfig.from_dict(state["config"], source=str(ckpt_dir / "state.json"))
            step = state["step"]
        net = build_network(config, "cpu")
        load_weights_into(net, tensors, source=str(ckpt_dir))
        net.to(device).eval().requires_grad_(False)
        stage = cls(config, net, device, source=str(path))
        stage.step = step
        return stage

    # --- properties used to validate a cascade ---------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.config.stage.resolution

    @property
    def channels(self) -> int:
        return self.config.stage.channels

    @property
    def num_classes(self) -> int:
        return self.config.stage.num_classes

    @property
    def is_sr(self) -> bool:
        return self.config.is_sr

    @property
    def low_res(self) -> int:
        return self.config.stage.low_res

    @property
    def uses_noise_augmentation(self) -> bool:
        return isinstance(self.augmentation, NoiseAugmentation)

    def check_guidance(self, guidance: float) -> None:
        """Classifier-free guidance other than 1 mixes in the null-class prediction, which only a stage trained with
        label dropout has learnt: refuse it for any other stage."""
        if guidance != 1.0 and self.config.model.label_dropout <= 0:
            raise UserError(
                f"classifier-free guidance {guidance:g} needs a stage trained with label dropout (model.label_dropout "
                f"> 0); stage {self.source or self.config.stage.name} was trained without it, so its null class is "
                "untrained. Use guidance 1"
            )

    # --- the closure the samplers call -----------------------------------------------------------------
    def model_fn(
        self,
        y: torch.Tensor,
        low_res: torch.Tensor | None = None,
        aug_level: torch.Tensor | None = None,
        guidance: float = 1.0,
        autocast: bool | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Build ``model_fn(x_t, t_scaled)`` for labels ``y`` (and, for SR stages, the low-res input and
        the integer augmentation level ``aug_level``). ``guidance`` 1.0 is plain conditional sampling.
        ``autocast``: True = bf16 autocast, False = fp32, None = what :func:`~.hardware.choose_precision` picks
        for this stage's device (bf16 only where the hardware does it natively)."""
        if autocast is None:
            autocast = choose_precision("auto", self.device).bf16
        if self.is_sr and low_res is None:
            raise ValueError(f"stage {self.source or self.config.stage.name} is an SR stage: it needs low_res")
        self.check_guidance(guidance)
        scaled_aug = None
        if self.uses_noise_augmentation:
            if aug_level is None:
                aug_level = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
            scaled_aug = self.augmentation.scaled_level(aug_level)
        one_call = network_call(self._sampling_net, self.device, autocast=autocast, channels_last=self._channels_last,
                                cuda_graphs=self._cuda_graphs)
        micro = self.network_batch

        def net_call(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            repeat = x.shape[0] // y.shape[0]  # classifier-free guidance batches cond + uncond together
            lr = low_res if low_res is None or repeat == 1 else low_res.repeat(repeat, 1, 1, 1)
            aug = scaled_aug if scaled_aug is None or repeat == 1 else scaled_aug.repeat(repeat)
            if micro and x.shape[0] != micro:
                return _in_micro_batches(one_call, micro, x, t, labels, aug, lr)
            return one_call(x, t, labels, aug, lr)

        return make_cfg_model_fn(net_call, y, self.num_classes, guidance, self.config.diffusion.learn_sigma)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        *,
        low_res: torch.Tensor | None = None,
        aug_level: torch.Tensor | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        variance: str | None = None,
        guidance: float | None = None,
        generator: Generator = None,
        stop_t: int = -1,
        start_t: int | None = None,
        x_start: torch.Tensor | None = None,
        autocast: bool | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Sample ``len(labels)`` images in [-1, 1] (or a noisy x_{stop_t} when ``stop_t >= 0``).
        ``autocast``: True = bf16, False = fp32, None (default) = the hardware's choice (see :meth:`model_fn`).
        ``callback``: called after every sampler step (:class:`~cascaded_diffusion.samplers.SamplerStep`)."""
        defaults = self.config.sample
        sampler = sampler or defaults.sampler
        steps = defaults.steps if steps is None else steps
        variance = variance or defaults.variance  # "auto" is decided by the sampler
        labels = labels.to(self.device)
        if low_res is not None:
            low_res = low_res.to(self.device)
        if aug_level is not None:
            aug_level = aug_level.to(self.device)
        fn = self.model_fn(
            labels, low_res, aug_level, guidance=defaults.guidance if guidance is None else guidance, autocast=autocast
        )
        c, r = self.channels, self.resolution
        return sample(
            self.diffusion,
            fn,
            (labels.shape[0], c, r, r),
            sampler=sampler,
            steps=steps or None,
            spacing=defaults.spacing,  # a distilled stage's grid ("trailing") whatever the steps
            eta=defaults.eta if eta is None else eta,
            variance=variance,
            x_start=x_start,
            start_t=start_t,
            stop_t=stop_t,
            clip_denoised=defaults.clip_denoised,
            generator=generator,
            device=self.device,
            progress=progress,
            callback=callback,
        )
