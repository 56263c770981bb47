"""The built-in passes, installed as ``lrqgraph.passes``; importing this package registers them."""
from . import allocate, calibrate, cleanup, discover, factorize, lower, relower, tolerance, verify  # noqa: F401
from .discover import Layer

__all__ = ["Layer"]
