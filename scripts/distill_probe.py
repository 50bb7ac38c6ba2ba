#!/usr/bin/env python
"""CPU time of one distillation step against one training step of the same stage, to size a distillation.

Builds round 1 of ``cdm distill TEACHER`` (with the config and ``--set`` given) in a throw-away directory, runs
``--warmup`` steps, then times ``--steps`` steps with ``time.process_time`` (CPU seconds of this process: on a busy
machine the wall clock would count other jobs' time too) and ``time.perf_counter``; then the same for the teacher's
own training step (``cdm train``'s loss at the same batch). Run it with OMP_NUM_THREADS=1 for per-core numbers.

    OMP_NUM_THREADS=1 python scripts/distill_probe.py pretrained:fashion-mnist/base8 \
        --config configs/fashion-mnist/distill_base8.toml --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cascaded_diffusion.distill_config import (read_distill_file, resolve_settings, resolve_teacher,  # noqa: E402
                                               student_config)
from cascaded_diffusion.distillation import METHOD, DistillTrainer, RoundTeacher  # noqa: E402
from cascaded_diffusion.checkpoint import load_tensors  # noqa: E402
from cascaded_diffusion.hardware import device_name  # noqa: E402
from cascaded_diffusion.training import Trainer  # noqa: E402


def timed(trainer: Trainer, warmup: int, steps: int) -> dict:
    trainer._build()
    trainer.net.train()
    for _ in range(warmup):
        trainer.train_step()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.train_step()
    float(loss)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    trainer.loader.close()
    return {"cpu_s_per_step": cpu / steps, "wall_s_per_step": wall / steps, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="JSON result")
    args = p.parse_args()
    settings, student = resolve_settings(None, read_distill_file(args.config), args.set, {})
    ref, tconfig = resolve_teacher(args.teacher, settings.teacher_weights)
    config = student_config(tconfig, settings, student, 1, tconfig.sample.guidance)
    tensors = load_tensors(ref.path, ref.stem)
    record = {"method": METHOD, "teacher": ref.to_dict()}
    result = {"teacher": args.teacher, "device": device_name("cpu"), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "batch_size": config.train.batch_size, "crop": config.train.crop}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DistillTrainer(config, Path(tmp) / "d", teacher=RoundTeacher(tconfig, tensors, record),
                                 settings=settings, round_index=1, guidance=tconfig.sample.guidance, record=record,
                                 device="cpu")
        result["precision"] = trainer.precision.describe()
        result["distill"] = timed(trainer, args.warmup, args.steps)
        plain = Trainer(tconfig, Path(tmp) / "t", device="cpu", data=trainer.data)
        plain.config.train.batch_size = config.train.batch_size
        result["train"] = timed(plain, args.warmup, args.steps)
    result["ratio"] = result["distill"]["cpu_s_per_step"] / result["train"]["cpu_s_per_step"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
