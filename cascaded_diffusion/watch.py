"""Training you can watch (docs/training.md, "Watching training"): the loss by timestep quartile and a periodic
small-sample KID of the EMA weights, next to the trainer's scalars and sample grids.

Neither touches the training's random streams: the quartile sums are bookkeeping on losses already computed, and
the KID samples draw from their own generator, so a run with them is bit-identical to one without.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .augment import downsample
from .config import StageConfig
from .images import images_to_tensor, tensor_to_images
from .data.readers import ImageArray

QUARTILES = 4
EVAL_SEED = 4321  # the KID samples' own generator; the reference images are chosen with numpy's default_rng(0)


class LossByTimestep:
    """Per-example training losses summed by quarter of the timestep range, as guided-diffusion's
    ``loss_q0..q3``: q0 is the quarter nearest the data (small t), q3 the noisiest. Kept on the device; read
    only when the trainer logs, so the hot loop gains no host synchronisation."""

    def __init__(self, num_timesteps: int, device: torch.device):
        self.num_timesteps = num_timesteps
        self.sums = torch.zeros(2 * QUARTILES, device=device)  # [sum q0..q3, count q0..q3]

    def add(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        quarter = (t * QUARTILES) // self.num_timesteps
        self.sums.index_add_(0, quarter, losses.detach().float())
        self.sums.index_add_(0, quarter + QUARTILES, torch.ones_like(losses, dtype=torch.float32))

    def take(self) -> torch.Tensor:
        """The sums and counts since the last call (to be all-reduced with the trainer's own), then reset."""
        out = self.sums.clone()
        self.sums.zero_()
        return out

    @staticmethod
    def means(totals: list[float]) -> dict[str, float]:
        """``loss_qK`` for every quarter that saw a timestep in the window (a small batch may miss one)."""
        return {f"loss_q{k}": totals[k] / totals[k + QUARTILES] for k in range(QUARTILES) if totals[k + QUARTILES] > 0}


def keep_global_rng(device: torch.device):
    """Run a block without moving the global torch RNG the training's dropout draws from: building the feature
    network initialises a model (random init, then its weights are loaded), which would otherwise shift every later
    dropout mask and make a run with KID differ from one without."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class PeriodicKID:
    """KID of ``train.eval_num`` EMA samples against as many training images of the stage, with the feature
    network ``train.eval_features``. The reference images (and so their features, computed once) are fixed for the
    run; their labels are the samples' labels, so the class mix is the data's. An SR stage is fed those images'
    own low-resolution versions (real inputs, not a base model's samples): its KID measures the SR stage alone."""

    def __init__(self, config: StageConfig, data: ImageArray, device: torch.device, bf16: bool):
        from .evaluation.features import extract, get_feature_extractor

        t = config.train
        self.config, self.device, self.bf16 = config, device, bf16
        with keep_global_rng(device):
            self.extractor = get_feature_extractor(t.eval_features, device=device)
        num = min(t.eval_num, len(data.labels))
        if num < 2:
            raise ValueError(f"train.eval_num: the training data has {len(data.labels)} images; KID needs 2")
        picks = np.sort(np.random.default_rng(0).choice(len(data.labels), size=num, replace=False))
        self.real = np.asarray(data.images[picks])
        self.labels = torch.from_numpy(np.asarray(data.labels[picks], dtype=np.int64))
        with keep_global_rng(device):
            self.reference = extract(self.real, self.extractor)[0]

    def __call__(self, ema_model: torch.nn.Module, step: int, batch_size: int = 64) -> dict[str, Any]:
        with keep_global_rng(self.device), torch.no_grad():
            return self._evaluate(ema_model, step, batch_size)

    def _evaluate(self, ema_model: torch.nn.Module, step: int, batch_size: int) -> dict[str, Any]:
        from .evaluation.features import extract
        from .evaluation.metrics import kid
        from .stage import Stage

        started = time.perf_counter()
        cfg = self.config
        stage = Stage(cfg, ema_model, self.device, source="eval")
        generator = torch.Generator(self.device).manual_seed(EVAL_SEED)
        samples = []
        for lo in range(0, len(self.labels), batch_size):
            labels = self.labels[lo : lo + batch_size].to(self.device)
            low = None
            if cfg.is_sr:
                real = images_to_tensor(self.real[lo : lo + batch_size], device=self.device)
                low = downsample(real, cfg.stage.low_res)
            x = stage.sample(labels, low_res=low, steps=cfg.train.sample_steps, generator=generator, autocast=self.bf16)
            samples.append(tensor_to_images(x))
        features = extract(np.concatenate(samples), self.extractor)[0]
        n = len(self.labels)
        # half-size subsets: subsets of all n would all be the whole set, and their spread (kid_std) zero
        mean, std = kid(features, self.reference, num_subsets=100, subset_size=max(2, n // 2), seed=0)
        return {"step": step, "kid": mean, "kid_std": std, "eval_num": n, "eval_features": self.extractor.name,
                "eval_seconds": time.perf_counter() - started, "time": time.time()}
