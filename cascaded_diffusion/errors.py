"""Errors a user can act on, and checks that output paths are writable before any compute starts.

The CLI turns a :class:`UserError` (and config, checkpoint and file-system errors) into one line,
``cdm COMMAND: error: ...``, exit status 2. A library error names the caller's settings by their Python names
(``device``, ``run_dir``); one made by :func:`naming` can be shown with other names for them (:func:`render`:
the CLI shows its options, ``--device``, ``--out``), so no library message names a command-line flag.

Every output path a command will write is checked first (:func:`check_output_file`, :func:`check_output_dir`),
so a read-only location, a directory given for a file or a path under a regular file is refused before minutes
of sampling or training, not after.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

E = TypeVar("E", bound=BaseException)


class UserError(ValueError):
    """Bad input or environment the user can fix (a path, an option, a missing package); the message says how."""


class RunLockedError(UserError):
    """Another process is training in this run directory."""


def naming(cls: type[E], template: str, settings: dict[str, str], /, **values) -> E:
    """``cls(message)`` where ``template`` names settings of the caller: ``settings`` maps each of its fields to a
    setting's name (``{"option": "device"}``), ``values`` fill the other fields. ``str(error)`` names the settings
    as they are called in Python; :func:`render` names them otherwise."""
    error = cls(template.format(**settings, **values))
    error.template, error.settings, error.values = template, dict(settings), values
    return error


def render(error: BaseException, name: Callable[[str], str]) -> str:
    """The message of ``error`` with every setting it names shown as ``name(setting)`` (``str(error)`` for an
    error not made by :func:`naming`)."""
    template = getattr(error, "template", None)
    if template is None:
        return str(error)
    return template.format(**{field: name(s) for field, s in error.settings.items()}, **error.values)


def describe_os_error(error: OSError) -> str:
    """``PATH: reason`` for an OSError that carries a path, else its own text."""
    if error.filename is not None and error.strerror:
        path = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{path}: {error.strerror}"
    return str(error)


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOTDIR:
        return "a parent of it is a regular file, not a directory"
    if error.errno == errno.EEXIST:
        return "it exists as a regular file, not a directory"
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    return error.strerror or str(error)


def _probe_writable(directory: Path, option: str, target: Path) -> None:
    """Create and remove an empty file in ``directory``: catches read-only file systems (even as root),
    permission errors and paths under regular files."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".cdm-write-check-")
    except OSError as e:
        raise naming(UserError, "{option} {target}: cannot write in {directory}: {reason}", {"option": option},
                     target=target, directory=directory, reason=_reason(e)) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:  # pragma: no cover - we just created it
        pass


def check_output_file(path: str | os.PathLike, option: str = "out") -> Path:
    """Make sure ``path`` can be written as a file (its directory is created if needed); return it. ``option``:
    the setting that named it, as errors show it."""
    target = Path(path)
    names = {"option": option}
    if target.is_dir():
        raise naming(UserError, "{option} {target}: is a directory; give a file path", names, target=target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise naming(UserError, "{option} {target}: cannot create the directory {parent}: {reason}", names,
                     target=target, parent=parent, reason=_reason(e)) from None
    if not parent.is_dir():
        raise naming(UserError, "{option} {target}: {parent} is not a directory", names, target=target, parent=parent)
    _probe_writable(parent, option, target)
    return target


def check_output_dir(path: str | os.PathLike, option: str = "out") -> Path:
    """Make sure ``path`` is (or can be created as) a writable directory; return it. ``option``: the setting that
    named it, as errors show it."""
    target = Path(path)
    names = {"option": option}
    if target.exists() and not target.is_dir():
        raise naming(UserError, "{option} {target}: is a file; give a directory", names, target=target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise naming(UserError, "{option} {target}: cannot create the directory: {reason}", names, target=target,
                     reason=_reason(e)) from None
    _probe_writable(target, option, target)
    return target


# A data or file spec's kinds that name a path (``npz:X``, ``classifier:X``, ...); a bare spec may be a path too.
_PATH_KINDS = ("npz", "imagefolder", "prepared", "classifier", "inception")


def spec_path(spec: str | os.PathLike | None) -> Path | None:
    """The file or directory a data/feature spec names (``npz:X`` -> X, a plain path -> itself), else None."""
    if spec is None:
        return None
    text = os.fspath(spec)
    kind, sep, rest = text.partition(":")
    if sep and kind.strip().lower() in _PATH_KINDS:
        return Path(os.path.expanduser(rest)) if rest else None
    text = os.path.expanduser(text)
    return Path(text) if os.path.exists(text) else None  # "fashion-mnist" is a data set, not a file


def check_distinct_paths(outputs: dict[str, str | os.PathLike | None],
                         inputs: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse, before any compute, an output that resolves (links followed) to one of the inputs or to another
    output: the later write would silently replace the input, or the earlier output. Keys are the options, as
    the message shows them; None values are skipped; inputs are specs (:func:`spec_path`)."""
    seen: dict[str, str] = {}
    for option, spec in (inputs or {}).items():
        path = spec_path(spec)
        if path is not None:
            seen.setdefault(os.path.realpath(path), f"the input {option} {spec}")
    for option, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"{option} {path} is the same file as {seen[real]}; it would be overwritten. "
                            "Give another path")
        seen[real] = f"{option} {path}"
