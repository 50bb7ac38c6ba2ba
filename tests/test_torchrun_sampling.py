"""`cdm sample` under torchrun: the documented command lines parse in torchrun's parser and in ours, and two
processes write the same bytes as one."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from cascaded_diffusion.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def documented_torchrun_commands() -> list[str]:
    text = "\n".join((ROOT / "docs" / name).read_text() for name in ("sampling.md", "evaluation.md", "training.md"))
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    return [line.strip() for line in text.splitlines() if re.match(r"\s*torchrun ", line)]


def parse_like_torchrun(command: str):
    """(torchrun's arguments, the argv our module receives) for a documented command line."""
    words = shlex.split(command, comments=True)  # as bash: a trailing "# ..." is not an argument
    assert words[0] == "torchrun"
    parsed = get_args_parser().parse_args(words[1:])
    assert parsed.module and parsed.training_script == "cascaded_diffusion.cli"
    return parsed, list(parsed.training_script_args)


def test_documented_commands_parse_in_torchrun_and_in_cdm():
    commands = documented_torchrun_commands()
    assert len(commands) >= 6
    seen = set()
    for command in commands:
        parsed, argv = parse_like_torchrun(command)
        assert parsed.nproc_per_node
        if argv[:1] == ["--"]:  # kept by some Python versions; cdm's main() drops it
            argv = argv[1:]
        args = build_parser().parse_args(argv)
        seen.add(args.command)
        if args.command == "sample":
            assert args.num in (1000, 50000) and args.out.endswith(".npz")
    assert seen == {"sample", "stats", "eval", "sweep", "train"}


def test_without_the_separator_torchrun_takes_num_for_its_own_option(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(shlex.split("--nproc_per_node 2 -m cascaded_diffusion.cli sample --num 8 --out s.npz"))
    assert "ambiguous option: --num" in capsys.readouterr().err


def test_leading_separator_is_accepted(tmp_path):
    # `python -m cascaded_diffusion.cli -- sample ...` (what torchrun runs if it passes the `--` on)
    assert main(["--", "sample", "--pretrained", "fashion-mnist", "--num", "2", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0


def test_two_torchrun_processes_write_the_bytes_of_one(tmp_path):
    # fp32 and batch shapes that made oneDNN sum in another order before the networks ran on fixed micro-batches
    # (on a CPU the networks run on fixed micro-batches); both sides have one thread per process, as the guarantee requires
    common = ["sample", "--pretrained", "fashion-mnist", "--num", "12", "--steps", "2", "--device", "cpu", "--quiet",
              "--precision", "fp32"]
    one = tmp_path / "one.npz"
    assert main(common + ["--batch-size", "12", "--out", str(one)]) == 0
    two = tmp_path / "two.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "cascaded_diffusion.cli", "--", *common, "--batch-size", "3", "--out", str(two)]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    assert "on 2 processes" in proc.stdout and proc.stdout.count("wrote 12 samples") == 1
