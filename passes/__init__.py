"""The built-in passes, installed as ``lrqgraph.passes``; importing this package registers them."""
from . import calibrate, cleanup, discover, factorize, lower, verify  # noqa: F401
from .discover import Layer

__all__ = ["Layer"]
