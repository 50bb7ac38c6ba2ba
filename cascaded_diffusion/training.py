"""Training one cascade stage, on one CPU or many GPUs (``torchrun`` → DDP), resumable bit for bit: the run
(run directory, loop, logs, checkpoint cadence, stop signals). The step and the state it checkpoints are
:mod:`.stage_training`; the run directory's log and config files :mod:`.rundir`.

The hot loop has no host-device synchronisation: losses and gradient norms accumulate on the device and
are read only every ``log_every`` steps (that is also where a non-finite loss is detected; a checkpoint is
never written from non-finite weights, so the last checkpoint on disk is always a good one).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import clean_run_dir, latest_checkpoint, load_state, resolve_checkpoint
from .config import ConfigError, StageConfig
from .data.readers import ImageArray
from .distributed import join_process_group
from .errors import UserError, check_output_dir, naming
from .fileio import atomic_write_text
from .hardware import choose_precision, configure_cuda_backends, resolve_device
from .rundir import CONFIG_HEADER, RunLock, append_log_event, check_run_dir_is_ours, json_line
from .stage_training import StageTraining
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


# --- trainer ---------------------------------------------------------------------------------------------


class Trainer(StageTraining):
    """Trains a stage into a run directory: the lock, leftovers and resume, the loop with its logs, checkpoints,
    sample grids, KID and stop signals (the step itself: :class:`~.stage_training.StageTraining`)."""

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
        self.rank, self.world_size, self.local_rank, _ = join_process_group(device)
        self.is_main = self.rank == 0
        self.stop_after = stop_after
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
                check_output_dir(self.run_dir, "run_dir")
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
        """The newest valid checkpoint (None for a new run); newer corrupt ones (truncated safetensors, broken
        state.json) are renamed ``corrupt-step_*`` (kept for inspection) and the fallback is announced."""
        return resolve_checkpoint(self.run_dir, set_aside=True, required=False)[1]

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
            raise naming(ConfigError, "{run_dir} already holds a run with a different network ({diffs}). Use a new "
                         "{option} directory, or the original config to resume.", {"option": "run_dir"},
                         run_dir=self.run_dir, diffs="; ".join(diffs))
        if stored.parameterization() != self.config.parameterization():
            diffs = _dict_diff(stored.parameterization(), self.config.parameterization())
            raise naming(ConfigError, "{run_dir} was trained with another parameterization ({diffs}): its weights would "
                         "be read as the other one. Use a new {option} directory, or the original settings to resume.",
                         {"option": "run_dir"}, run_dir=self.run_dir, diffs="; ".join(diffs))
        return ckpt

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
            append_log_event(log_path, "resume" if self.step else "start", self.step)
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
                        f.write(json_line(record))
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
            f.write(json_line(result))
        if writer is not None:
            for key in ("kid", "kid_std", "eval_seconds"):
                writer.add_scalar(f"eval/{key}", result[key], self.step)

    def _stop_nonfinite(self, record: dict, log_path: Path, last_ckpt: Path | None) -> None:
        if self.is_main:
            with open(log_path, "a") as f:
                f.write(json_line({**record, "error": "non-finite loss"}))
        keep = f"the last good checkpoint is kept: {last_ckpt}" if last_ckpt else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"the loss became non-finite by step {record['step']}; training stopped and {keep}. "
            "Try a lower train.lr, train.grad_clip > 0, or train.precision = \"fp32\"."
        )


def train_stage(config: StageConfig, run_dir: str | Path, **kwargs) -> TrainSummary:
    trainer = Trainer(config, run_dir, **kwargs)
    return trainer.train()


# --- helpers ---------------------------------------------------------------------------------------------


def _all_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all())


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
