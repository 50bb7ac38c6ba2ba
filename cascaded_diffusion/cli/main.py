"""``cdm``: the parser (one module per group of commands registers its own) and the one-line error report."""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

from ..checkpoint import CheckpointError
from ..errors import describe_os_error, render
from ..training import NonFiniteLossError, TrainingStopped
from . import demo, distill, evaluate, prepare, sample, share, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm", description="Cascaded Diffusion Models")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (train, distill, sample, share, prepare, evaluate, demo):  # train, export | distill | sample | ... | demo
        commands.add_commands(sub)
    return parser


# The library's names of the settings its errors name -> this command line's options, where they are not
# "--" + the name with "-" for "_" (device -> --device, batch_size -> --batch-size)
OPTIONS = {"run_dir": "--out", "class_labels": "--class-label", "overrides": "--set", "reference": "--ref"}


def cli_option(setting: str) -> str:
    """The command-line option of a setting a library error names (an option already is one)."""
    return setting if setting.startswith("-") else OPTIONS.get(setting, "--" + setting.replace("_", "-"))


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or "failed to allocate" in text
    )


def _out_of_memory_hint(args: argparse.Namespace) -> str:
    if args.command in ("train", "distill"):
        return ("lower train.batch_size (raise train.grad_accum to keep the same global batch), or set "
                "model.gradient_checkpointing = true")
    if getattr(args, "batch_size", None) is not None:
        return f"lower --batch-size (it is {args.batch_size})"
    return "use fewer images (--num) or free memory"


def user_error_message(error: BaseException, args: argparse.Namespace) -> str | None:
    """The one line to print for an error the user can act on; None for anything else (a bug: traceback)."""
    if _is_out_of_memory(error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"out of memory ({first[:200]}); {_out_of_memory_hint(args)}"
    if isinstance(error, OSError):
        return describe_os_error(error)
    if isinstance(error, zipfile.BadZipFile):
        return f"not a readable zip/.npz file ({error}); it is truncated or corrupt"
    if isinstance(error, (ValueError, CheckpointError, NonFiniteLossError)):  # ConfigError, UserError included
        return render(error, cli_option)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors the user can act on (bad config or option, unusable path, corrupt file, busy
    run directory, out of memory) are one line, ``cdm COMMAND: error: ...``, exit status 2; ``CDM_DEBUG=1``
    shows their traceback. Anything else is a bug and keeps its traceback."""
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--"]:  # `torchrun ... -m cascaded_diffusion.cli -- sample ...` (see docs/sampling.md)
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TrainingStopped as e:  # a checkpoint was saved: say where and how to resume; 128 + N as for the signal
        print(f"cdm {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"cdm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error_message(e, args)
        if message is None or os.environ.get("CDM_DEBUG"):
            raise
        print(f"cdm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
