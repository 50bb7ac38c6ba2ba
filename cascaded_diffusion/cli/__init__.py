"""The ``cdm`` command line (:mod:`.main`): one module per group of commands, each a few lines over the Python API."""

from .main import main

__all__ = ["main"]
