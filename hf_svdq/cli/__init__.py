"""The ``hf-svdq`` command line: ``main`` dispatches to one module per command group."""

from .main import main

__all__ = ["main"]
