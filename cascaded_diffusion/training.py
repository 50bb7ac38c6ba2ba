"""Training one cascade stage, on one CPU or many GPUs (``torchrun`` → DDP), resumable bit for bit.

Everything random in a step (data order, flips, timesteps, noise, label dropout, augmentation levels) comes
from one seeded generator per process, and dropout from the seeded global RNG; both are stored in every
checkpoint together with the model, EMA, optimizer, step and data position, so an interrupted run resumed
from its last checkpoint produces the same weights as one that never stopped.

The hot loop has no host-device synchronisation: losses and gradient norms accumulate on the device and
are read only every ``log_every`` steps (that is also where a non-finite loss is detected; a checkpoint is
never written from non-finite weights, so the last checkpoint on disk is always a good one).
"""

# Longer than ~400 lines: the Trainer is one object whose setup, step, EMA, checkpoint and resume share the
# invariants that make a resumed run bit-identical to an uninterrupted one; split, they would have to be re-checked
# across modules. The batch stream and loader (loader.py), devices (hardware.py) and files (fileio.py) live apart.

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import __version__
from .augment import downsample
from .checkpoint import (
    CheckpointError,
    LOCK_FILE,
    RunLock,
    clean_run_dir,
    latest_checkpoint,
    latest_valid_checkpoint,
    load_state,
    load_tensors,
    load_weights_into,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_checkpoint,
    set_aside_checkpoint,
)
from .config import ConfigError, StageConfig
from .data import load_images
from .fileio import atomic_write_text, grid_by_class, images_to_tensor, save_grid, tensor_to_images
from .errors import UserError, check_output_dir
from .loader import BatchStream, PrefetchLoader
from .mirror import flip_warning
from .readers import ImageArray, ResolutionMismatch
from .hardware import bf16_autocast, choose_precision, configure_cuda_backends, resolve_device
from .stage import Stage, build_augmentation, build_diffusion, build_network
from .watch import LossByTimestep, PeriodicKID


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run stopped and the last good checkpoint is kept."""


# steps between the ranks' agreement on a stop signal under torchrun (see Trainer._stop_requested)
STOP_SYNC_EVERY = 10


class TrainingStopped(Exception):
    """Training was asked to stop (SIGTERM from a scheduler, SIGINT from Ctrl-C): the step under way was
    finished and saved as a checkpoint, so rerunning the same command resumes exactly there."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def _stop_requests():
    """Record SIGTERM and SIGINT instead of dying at once: a batch scheduler's SIGTERM before its SIGKILL
    is a grace period meant for saving, and Ctrl-C loses up to ``ckpt_every`` steps otherwise. Yields a list
    that receives the signal number; a second signal stops at once (KeyboardInterrupt; the checkpoint writes
    are atomic, so that is safe too). Only the main thread can take signals: elsewhere nothing changes."""
    requested: list[int] = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print(f"received {signal.Signals(signum).name}: finishing this step and saving a checkpoint (send it "
              "again to stop at once)", file=sys.stderr, flush=True)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    checkpoint: Path | None
    last_loss: float | None


# --- distributed setup -----------------------------------------------------------------------------------


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# --- EMA -------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers (fp32 copy)."""

    def __init__(self, model: torch.nn.Module, rate: float, warmup: bool):
        self.rate = rate
        self.warmup = warmup
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._src = [p for p in model.parameters()]
        self._dst = [p for p in self.model.parameters()]

    def rate_at(self, num_updates: int) -> float:
        if self.warmup:
            return min(self.rate, (1 + num_updates) / (10 + num_updates))
        return self.rate

    @torch.no_grad()
    def update(self, num_updates: int) -> None:
        weight = 1.0 - self.rate_at(num_updates)
        torch._foreach_lerp_(self._dst, [p.detach().float() for p in self._src], weight)


# --- trainer ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        config: StageConfig,
        run_dir: str | Path,
        *,
        device: str | None = None,
        data: ImageArray | None = None,
        stop_after: int | None = None,
        config_path: str | Path | None = None,
    ):
        """``stop_after``: return after this many optimizer steps in this invocation (used to simulate an
        interruption in tests); the run's total length stays ``config.train.steps``. ``config_path``: the file the
        config was read from; it may lie in a new run directory (it is then the user's and kept)."""
        d = config.diffusion
        if d.learn_sigma and d.loss == "simple":
            raise ConfigError(
                "diffusion.learn_sigma = true with diffusion.loss = \"simple\" would leave the variance head untrained "
                "while sampling uses it: set diffusion.loss = \"hybrid\" (Improved DDPM's L_simple + VLB), or "
                "learn_sigma = false"
            )
        self.config = config
        self.run_dir = Path(run_dir)
        self.rank, self.world_size, self.local_rank = distributed_env()
        self.is_main = self.rank == 0
        self.stop_after = stop_after
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if (device or "auto") != "cpu" and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.device = resolve_device(device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            configure_cuda_backends(config.train.cudnn_benchmark)
        # train.precision "auto" is decided here, per machine: a run resumed on another kind of CPU or GPU
        # takes the precision that is fast there (the config keeps "auto")
        self.precision = choose_precision(config.train.precision, self.device)
        self._data = data
        self._config_path = Path(config_path) if config_path is not None else None

    # --- setup -----------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> Path | None:
        """Lock the run directory, clean what an interrupted run left, and pick the checkpoint to resume from
        (rank 0 decides, every rank follows). Nothing here computes, so a refusal costs nothing."""
        if self.config.train.tensorboard and self.is_main:
            _check_tensorboard()
        error: BaseException | None = None
        ckpt: Path | None = None
        if self.is_main:
            try:
                check_run_dir_is_ours(self.run_dir, self._config_path)  # before anything is created or cleaned
                check_output_dir(self.run_dir, "--out")
                self._lock = RunLock(self.run_dir).acquire()
                removed = clean_run_dir(self.run_dir)
                if removed:
                    print(f"removed {len(removed)} leftover(s) of an interrupted run: "
                          + ", ".join(p.name for p in removed), file=sys.stderr, flush=True)
                ckpt = self._select_checkpoint()
            except BaseException as e:  # handed to the other ranks below, then raised here
                error = e
        if self.world_size > 1:
            payload = [None if error is None else f"{type(error).__name__}: {error}", None if ckpt is None else str(ckpt)]
            dist.broadcast_object_list(payload, src=0)
            if error is None and payload[0] is not None:
                raise UserError(f"rank 0 refused {self.run_dir}: {payload[0]}")
            ckpt = Path(payload[1]) if payload[1] else None
        if error is not None:
            raise error
        return self._check_run_dir(ckpt)

    def _select_checkpoint(self) -> Path | None:
        """The newest valid checkpoint; newer corrupt ones (truncated safetensors, broken state.json) are renamed
        ``corrupt-step_*`` (kept for inspection) and the fallback is announced."""
        ckpt, corrupt = latest_valid_checkpoint(self.run_dir)
        if corrupt and ckpt is None:
            raise CheckpointError(
                f"{self.run_dir} holds no valid checkpoint: " + "; ".join(reason for _, reason in corrupt)
                + ". Nothing was changed; move the run directory away to start over."
            )
        for path, reason in corrupt:
            aside = set_aside_checkpoint(path)
            print(f"warning: {reason}; renamed {path.name} to {aside.name} and resuming from the newest valid "
                  f"checkpoint, {ckpt.name}", file=sys.stderr, flush=True)
        return ckpt

    def _release_lock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    def _check_run_dir(self, ckpt: Path | None) -> Path | None:
        """Return the checkpoint to resume from, refusing a run dir whose network differs from the config."""
        if ckpt is None:
            return None
        state = load_state(ckpt)
        stored = StageConfig.from_dict(state["config"], source=str(ckpt / "state.json"))
        if stored.architecture() != self.config.architecture():
            diffs = _dict_diff(stored.architecture(), self.config.architecture())
            raise ConfigError(
                f"{self.run_dir} already holds a run with a different network ({'; '.join(diffs)}). "
                "Use a new --out directory, or the original config to resume."
            )
        if stored.parameterization() != self.config.parameterization():
            diffs = _dict_diff(stored.parameterization(), self.config.parameterization())
            raise ConfigError(
                f"{self.run_dir} was trained with another parameterization ({'; '.join(diffs)}): its weights would "
                "be read as the other one. Use a new --out directory, or the original settings to resume."
            )
        return ckpt

    def _load_data(self) -> ImageArray:
        if self._data is not None:
            data = self._data
        else:
            d, s = self.config.data, self.config.stage

            def load() -> ImageArray:
                try:
                    return load_images(
                        d.source,
                        s.resolution,
                        channels=s.channels,
                        root=d.root or None,
                        cache_dir=d.cache_dir or None,
                        on_corrupt=d.on_corrupt,
                        progress=self.is_main,
                        resize="down",  # upsampled npz images would pass for real training targets
                    )
                except ResolutionMismatch as e:
                    raise ConfigError(f"data.source: {e}; this {s.resolution}px stage needs data at "
                                      f"{s.resolution} px or more") from None

            # rank 0 builds a folder's resize cache once; the other ranks then read it
            if self.world_size > 1 and not self.is_main:
                dist.barrier()
            data = load()
            if self.world_size > 1 and self.is_main:
                dist.barrier()
        s = self.config.stage
        if data.images.shape[1:] != (s.resolution, s.resolution, s.channels):
            raise ValueError(
                f"data {data.source!r} has images of shape {data.images.shape[1:]}, the stage needs "
                f"{(s.resolution, s.resolution, s.channels)}"
            )
        if len(data.labels) and int(data.labels.max()) >= s.num_classes:
            raise ConfigError(
                f"stage.num_classes = {s.num_classes} but the data {data.source!r} has label {int(data.labels.max())}"
            )
        if len(data.images) < self.config.train.batch_size:
            raise ValueError(
                f"data {data.source!r} has {len(data.images)} images, fewer than train.batch_size = "
                f"{self.config.train.batch_size}"
            )
        return data

    def _build(self) -> None:
        cfg = self.config
        t = cfg.train
        torch.manual_seed(t.seed + self.rank)
        self.generator = torch.Generator(self.device).manual_seed(t.seed * 1000 + self.rank)
        self.net = build_network(cfg, self.device)
        if t.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = EMA(self.net, t.ema_rate, t.ema_warmup)
        self.diffusion = build_diffusion(cfg)
        self.loss_by_t = LossByTimestep(self.diffusion.num_timesteps, self.device)
        self.augmentation = build_augmentation(cfg)
        opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        opt_kwargs: dict[str, Any] = dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        if self.device.type in ("cuda", "cpu"):
            # One fused kernel over all parameters; on CPU 3x faster than the default per-tensor loop
            # (7 against 25 ms per step for 7.7M parameters, 2 cores).
            opt_kwargs["fused"] = True
        self.optimizer = opt_cls(self.net.parameters(), **opt_kwargs)
        self.train_net: torch.nn.Module = self.net
        if self.world_size > 1:
            self.train_net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if t.compile:
            self.train_net = torch.compile(self.train_net)
        self.data = self._load_data()
        # only a base stage decides which way its images face; an SR stage follows its (flipped alike) input
        if cfg.data.flip and cfg.stage.kind == "base" and self.is_main and len(self.data.labels):
            warning = flip_warning(self.data.images, self.data.labels, self.data.class_names)
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.stream = BatchStream(len(self.data.images), t.batch_size, t.seed, self.rank, self.world_size)
        # reads the stream's next batches ahead in a thread; the stream alone decides what batch k holds
        self.loader = PrefetchLoader(self.data.images, self.data.labels, self.stream, depth=cfg.data.prefetch,
                                     pin_memory=self.device.type == "cuda")
        self.step = 0

    # --- checkpointing ---------------------------------------------------------------------------------
    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors

    def checkpoint_state(self) -> dict[str, Any]:
        """More JSON for every checkpoint's state.json (a subclass's own record: the distiller's teacher and round)."""
        return {}

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0); every rank's RNG goes in as ``rng_rank{r}``."""
        rng_all = {f"rank{self.rank}.{k}": v.cpu() for k, v in self._rng_tensors().items()}
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng_all)
            rng_all = {k: v for g in gathered for k, v in g.items()}
        path = None
        if self.is_main:
            opt_tensors, opt_meta = optimizer_state_to_flat(self.optimizer.state_dict())
            state = {
                "config": self.config.to_dict(),
                "optimizer": opt_meta,
                "data_stream": self.stream.state_dict(),  # global: the same on every rank
                "world_size": self.world_size,
                "version": __version__,
                "torch": torch.__version__,
                **self.checkpoint_state(),
            }
            path = save_checkpoint(
                self.run_dir,
                self.step,
                {
                    "model": self.net.state_dict(),
                    "ema": self.ema.model.state_dict(),
                    "optimizer": opt_tensors,
                    "rng": rng_all,
                },
                state,
                keep_last=self.config.train.keep_last,
                keep_steps=self.config.train.keep_steps,
            )
        if self.world_size > 1:
            dist.barrier()
        return path

    def resume(self, ckpt: Path) -> None:
        state = load_state(ckpt)
        load_weights_into(self.net, load_tensors(ckpt, "model", self.device), source=str(ckpt))
        load_weights_into(self.ema.model, load_tensors(ckpt, "ema", self.device), source=str(ckpt))
        opt_tensors = load_tensors(ckpt, "optimizer", self.device)
        self.optimizer.load_state_dict(optimizer_state_from_flat(opt_tensors, state["optimizer"]))
        for group in self.optimizer.param_groups:  # the config may change lr between runs
            group["initial_lr"] = self.config.train.lr
        rng = load_tensors(ckpt, "rng")
        prefix = f"rank{self.rank}."
        if prefix + "generator" in rng and state.get("world_size", 1) == self.world_size:
            self.generator.set_state(rng[prefix + "generator"].to(torch.uint8))
            torch.set_rng_state(rng[prefix + "torch_cpu"].to(torch.uint8))
            if self.device.type == "cuda" and prefix + "torch_cuda" in rng:
                torch.cuda.set_rng_state(rng[prefix + "torch_cuda"].to(torch.uint8), self.device)
        else:  # a different world size: keep going with fresh per-rank randomness
            self.generator.manual_seed(self.config.train.seed * 1000 + self.rank + 7919 * state["step"])
        self.stream.load_state_dict(state["data_stream"])
        self.step = int(state["step"])

    # --- one step --------------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.loader.next()  # the stream's next batch (sorted indices), read ahead by a thread
        flip = None
        if self.config.data.flip:
            flip = torch.rand(len(labels), generator=self.generator, device=self.device) < 0.5
        x0 = images_to_tensor(images, device=self.device, flip_mask=flip)
        return x0, labels.to(self.device, non_blocking=True)

    def _loss(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x0.shape[0]
        gen = self.generator
        if cfg.model.label_dropout > 0:
            drop = torch.rand(n, generator=gen, device=self.device) < cfg.model.label_dropout
            y = torch.where(drop, torch.full_like(y, cfg.stage.num_classes), y)
        low_res = aug_level = None
        if cfg.is_sr:
            low_res = downsample(x0, cfg.stage.low_res)
            low_res, level = self.augmentation(low_res, gen)
            if level is not None:
                aug_level = self.augmentation.scaled_level(level)
            if cfg.train.crop:
                x0, low_res = self._crop(x0, low_res)
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        channels_last = cfg.train.channels_last
        net = self.train_net

        def model_fn(x_t: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
            if channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            with bf16_autocast(self.device, self.precision):
                out = net(x_t, t_scaled, y=y, aug_level=aug_level, low_res=low_res)
            return out.float()

        losses = self.diffusion.training_losses(model_fn, x0, t, noise=noise)["loss"]
        self.loss_by_t.add(t, losses)  # bookkeeping only: the loss trained on is the same mean as before
        return losses.mean()

    def _crop(self, x0: torch.Tensor, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned random crops of the high-res images and of their conditioning images, one per example.

        The (augmented) low-res image is upsampled to full size exactly as the network would, *then* cropped,
        so a crop sees the same conditioning pixels as the same region of a full-size input (cropping the low-res
        image first would change the interpolation at the crop's border). Offsets are multiples of the network's
        downsampling factor and of the resolution ratio, so every crop has the same pixel phase as whole images.
        """
        cfg = self.config
        size, res = cfg.train.crop, cfg.stage.resolution
        cond = self.net.upsample_low_res(low_res, x0.shape[-2:])
        unit = math.lcm(2 ** (len(cfg.model.channel_mult) - 1), res // cfg.stage.low_res)
        positions = (res - size) // unit + 1
        n = x0.shape[0]
        offsets = torch.randint(0, positions, (2, n), generator=self.generator, device=self.device) * unit
        span = torch.arange(size, device=self.device)
        rows = (offsets[0][:, None] + span)[:, :, None]  # (N, size, 1)
        cols = (offsets[1][:, None] + span)[:, None, :]  # (N, 1, size)
        batch = torch.arange(n, device=self.device)[:, None, None]

        def take(images: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, size, size)
            return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()

        return take(x0), take(cond)

    def _lr_at(self, step: int) -> float:
        t = self.config.train
        if t.warmup_steps > 0:
            return t.lr * min(1.0, (step + 1) / t.warmup_steps)
        return t.lr

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            x0, y = self._batch()
            sync = micro == t.grad_accum - 1 or self.world_size == 1
            ctx = self.train_net.no_sync() if not sync and hasattr(self.train_net, "no_sync") else contextlib.nullcontext()
            with ctx:
                loss = self._loss(x0, y) / t.grad_accum
                loss.backward()
            total += loss.detach()
        if t.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self.net.parameters() if p.grad is not None])
            )
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.step - 1)
        return total, grad_norm

    # --- sample grid -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: Path, per_class: int = 8) -> np.ndarray:
        """Write the grid of EMA samples (one row per class) to ``path`` and return it (uint8 H x W x C)."""
        cfg = self.config
        stage = Stage(cfg, self.ema.model, self.device, source=str(self.run_dir))
        k = cfg.stage.num_classes
        rows = min(k, 10)
        labels = torch.arange(rows, device=self.device).repeat_interleave(per_class)
        gen = torch.Generator(self.device).manual_seed(1234)
        low = None
        columns: list[np.ndarray] = []
        if cfg.is_sr:
            picks = []
            for c in range(rows):
                where = np.flatnonzero(np.asarray(self.data.labels) == c)[:per_class]
                picks.append(np.resize(where, per_class) if len(where) else np.zeros(per_class, np.int64))
            real = images_to_tensor(np.asarray(self.data.images[np.concatenate(picks)]), device=self.device)
            low = downsample(real, cfg.stage.low_res)
            columns.append(tensor_to_images(low.clamp(-1, 1)))
        x = stage.sample(labels, low_res=low, steps=cfg.train.sample_steps, generator=gen, autocast=self.precision.bf16)
        columns.append(tensor_to_images(x))
        if cfg.is_sr:
            columns.append(tensor_to_images(real))
        # one row per class; for SR each sample shows low-res | sample | real
        grid = grid_by_class(columns, labels.cpu().numpy(), per_class=per_class)
        save_grid(grid[None], path, nrow=1, padding=0)
        return grid

    # --- the loop --------------------------------------------------------------------------------------
    def train(self) -> TrainSummary:
        """Train to ``train.steps`` (resuming from the run directory's newest valid checkpoint), holding the
        run directory's lock throughout."""
        try:
            return self._train(self._prepare_run_dir())
        finally:
            if getattr(self, "loader", None) is not None:
                self.loader.close()
            self._release_lock()

    def _write_config(self) -> None:
        """``RUN/config.toml``: the resolved config, rewritten on each start; a config.toml that is not ours
        (e.g. the user's own, commented file trained with ``--out`` its own directory) is never overwritten:
        ours then goes to ``config.resolved.toml``."""
        path = self.run_dir / "config.toml"
        try:
            foreign = path.exists() and not path.read_text(errors="replace").startswith(CONFIG_HEADER)
        except OSError:
            foreign = True
        if foreign:
            path = self.run_dir / "config.resolved.toml"
        atomic_write_text(path, CONFIG_HEADER + "\n" + self.config.to_toml())

    def _train(self, ckpt: Path | None) -> TrainSummary:
        cfg = self.config
        t = cfg.train
        self._build()
        if ckpt is not None:
            self.resume(ckpt)
            if self.is_main:
                print(f"resumed from {ckpt} at step {self.step}", flush=True)
        if self.is_main:
            print(f"train.precision = {t.precision!r}: {self.precision.describe()}", flush=True)
        log_path = self.run_dir / "log.jsonl"
        if self.is_main:  # the run is accepted: only now touch its files
            self._write_config()
            _append_log_event(log_path, "resume" if self.step else "start", self.step)
        writer = _tensorboard(self.run_dir) if (t.tensorboard and self.is_main) else None
        # built before the first step: a bad feature network is refused now, not after eval_every steps
        evaluator = PeriodicKID(cfg, self.data, self.device, self.precision.bf16) if (t.eval_every and self.is_main) \
            else None
        start_step = self.step
        end_step = t.steps if self.stop_after is None else min(t.steps, start_step + self.stop_after)
        bar = None
        if t.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc=cfg.stage.name, dynamic_ncols=True)
        self.net.train()
        try:
            with _stop_requests() as stop:
                self._loop(end_step, start_step, stop, log_path, writer, bar, ckpt, evaluator)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return TrainSummary(self.run_dir, self.step, latest_checkpoint(self.run_dir), self._last_loss)

    def _stop_requested(self, stop: list[int]) -> int:
        """The signal that asked this run to stop (0: none). Under torchrun every rank must stop after the same
        step (saving is collective), so the ranks agree on it with a one-number all-reduce -- only every
        ``STOP_SYNC_EVERY`` steps, since reading its result waits for the device: a stop is taken at most that
        many steps late, well inside a scheduler's grace period."""
        signum = stop[0] if stop else 0
        if self.world_size > 1:
            if self.step % STOP_SYNC_EVERY:
                return 0
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _loop(self, end_step: int, start_step: int, stop: list[int], log_path: Path, writer, bar,
              last_ckpt: Path | None, evaluator: PeriodicKID | None) -> None:
        cfg = self.config
        t = cfg.train
        loss_sum = torch.zeros((), device=self.device)
        norm_sum = torch.zeros((), device=self.device)
        count = 0
        self._last_loss = last_loss = None
        tick = time.perf_counter()
        images_per_step = t.batch_size * t.grad_accum * self.world_size
        while self.step < end_step:
            loss, grad_norm = self.train_step()
            loss_sum += loss
            norm_sum += grad_norm
            count += 1
            at_end = self.step == end_step
            if self.step % t.log_every == 0 or at_end:
                stats = torch.cat([torch.stack([loss_sum, norm_sum]), self.loss_by_t.take()])
                if self.world_size > 1:
                    dist.all_reduce(stats)
                    stats /= self.world_size  # the quartile means are ratios: the same scale on sums and counts
                mean_loss, mean_norm = (stats[:2] / count).tolist()
                elapsed = time.perf_counter() - tick
                record = {
                    "step": self.step,
                    "loss": mean_loss,
                    "grad_norm": mean_norm,
                    "lr": self._lr_at(self.step - 1),
                    "img_per_s": count * images_per_step / max(elapsed, 1e-9),
                    # the EMA decay used at this step: below ema_rate while train.ema_warmup ramps it up
                    "ema_rate": self.ema.rate_at(self.step - 1),
                    **LossByTimestep.means(stats[2:].tolist()),
                    "time": time.time(),
                }
                if not math.isfinite(mean_loss):
                    self._stop_nonfinite(record, log_path, last_ckpt)
                self._last_loss = last_loss = mean_loss
                if self.is_main:
                    with open(log_path, "a") as f:
                        f.write(_json_line(record))
                    if writer is not None:
                        for key, value in record.items():
                            if key not in ("step", "time"):
                                writer.add_scalar(f"train/{key}", value, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['img_per_s']:.0f}")
                loss_sum.zero_()
                norm_sum.zero_()
                count = 0
                tick = time.perf_counter()
            if bar is not None:
                bar.update(1)
            signum = self._stop_requested(stop)
            if self.step % t.ckpt_every == 0 or at_end or self.step in t.keep_steps or signum:
                if not _all_finite(self.net):
                    self._stop_nonfinite({"step": self.step, "loss": float("nan")}, log_path, last_ckpt)
                last_ckpt = self.save() or last_ckpt
            if signum:
                name = signal.Signals(signum).name
                raise TrainingStopped(
                    f"stopped by {name} at step {self.step} of {t.steps}; saved the checkpoint {last_ckpt}. "
                    "Rerun the same `cdm train` command to resume from it", signum)
            if self.is_main and ((t.sample_every and self.step % t.sample_every == 0) or self.step == t.steps):
                if self.step != start_step:
                    grid = self.sample_grid(self.run_dir / "samples" / f"step_{self.step:08d}.png")
                    if writer is not None:  # the same grid as the PNG, in the tracker
                        writer.add_image("samples", grid, self.step, dataformats="HWC")
            if evaluator is not None and (self.step % t.eval_every == 0 or self.step == t.steps):
                if self.step != start_step:
                    self._evaluate(evaluator, log_path, writer)

    def _evaluate(self, evaluator: PeriodicKID, log_path: Path, writer) -> None:
        """KID of the EMA weights now: its own line in log.jsonl (``"kid"``; no ``"loss"``) and eval/ scalars."""
        result = evaluator(self.ema.model, self.step)
        with open(log_path, "a") as f:
            f.write(_json_line(result))
        if writer is not None:
            for key in ("kid", "kid_std", "eval_seconds"):
                writer.add_scalar(f"eval/{key}", result[key], self.step)

    def _stop_nonfinite(self, record: dict, log_path: Path, last_ckpt: Path | None) -> None:
        if self.is_main:
            with open(log_path, "a") as f:
                f.write(_json_line({**record, "error": "non-finite loss"}))
        keep = f"the last good checkpoint is kept: {last_ckpt}" if last_ckpt else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"the loss became non-finite by step {record['step']}; training stopped and {keep}. "
            "Try a lower train.lr, train.grad_clip > 0, or train.precision = \"fp32\"."
        )


def train_stage(config: StageConfig, run_dir: str | Path, **kwargs) -> TrainSummary:
    trainer = Trainer(config, run_dir, **kwargs)
    return trainer.train()


# --- helpers ---------------------------------------------------------------------------------------------


def _json_line(record: dict) -> str:
    """One log line of strict JSON: a non-finite number (a diverged loss) becomes null, since the bare NaN that
    json.dumps writes is not JSON and breaks every other reader of the log."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _all_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all())


CONFIG_HEADER = "# Written by `cdm train`: the resolved config of this run, rewritten on every start."


def is_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` is recognisably a run of this library: a ``.lock`` holding a trainer's record, a
    complete (or set-aside) checkpoint, or a ``config.toml`` / ``config.resolved.toml`` we wrote."""
    try:
        lock = run_dir / LOCK_FILE
        if lock.is_file() and not lock.is_symlink():
            record = json.loads(lock.read_text() or "{}")
            if isinstance(record, dict) and {"pid", "host"} <= set(record):
                return True
        checkpoints = run_dir / "checkpoints"
        if checkpoints.is_dir() and any(p.name.startswith("corrupt-step_") or (p / "state.json").is_file()
                                        for p in checkpoints.iterdir()):
            return True
        for name in ("config.toml", "config.resolved.toml"):
            path = run_dir / name
            if path.is_file():
                with open(path, "rb") as f:
                    if f.read(len(CONFIG_HEADER)).decode(errors="replace") == CONFIG_HEADER:
                        return True
    except (OSError, ValueError):
        pass
    return False


def check_run_dir_is_ours(run_dir: Path, config_path: Path | None = None) -> None:
    """Refuse a non-empty directory that is not a run of this library, as ``cdm prepare`` does: cleaning an
    interrupted run's leftovers (``checkpoints/step_*`` without ``state.json``, ``.NAME.tmp-*``) must never delete
    another tool's files. A new directory may already hold the user's config file and a ``log.jsonl`` (ours
    is only ever appended to it)."""
    if not run_dir.is_dir() or is_run_dir(run_dir):
        return
    allowed = {LOCK_FILE, "log.jsonl"}  # a planted .lock is refused by the lock itself, naming the problem
    if config_path is not None and config_path.parent.resolve() == run_dir.resolve():
        allowed.add(config_path.name)
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in allowed)
    if foreign:
        raise UserError(
            f"--out {run_dir} is not empty and is not a run directory of `cdm train` (it holds "
            f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); give a new or empty directory"
        )


def _append_log_event(path: Path, event: str, step: int) -> None:
    """Append ``{"event": "start"|"resume", "step": N, ...}`` to the log. The log is only ever appended to:
    records of steps after N written before this line belong to work lost to an interruption, and
    :func:`read_log` drops them; nothing is deleted from the file."""
    record = {"event": event, "step": step, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    with open(path, "ab") as f:
        if f.tell() > 0:  # a line cut by a kill must not swallow this one
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged records of a run (``RUN/log.jsonl``, or the path of a log itself) as they stand after every
    resume: an ``{"event": "start"|"resume", "step": N}`` line voids the records above it with a step after N
    (work lost to an interruption and redone after it), so each step keeps its last record. Event lines are
    not returned; a line cut by a kill is skipped."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "log.jsonl"
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if "event" in record:
            step = record.get("step", 0)
            records = [r for r in records if r.get("step", 0) <= step]
        else:
            records.append(record)
    return records


def _check_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "train.tensorboard = true needs the tensorboard package: pip install 'cascaded-diffusion[tensorboard]' "
            "(or set train.tensorboard = false)"
        ) from None


def _tensorboard(run_dir: Path):
    _check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: run has {va!r}, config has {vb!r}")
    return out
