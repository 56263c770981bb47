"""Running rewritten models: onnxruntime sessions with lrqgraph's settings (``lrqgraph.runtime``).

Imports nothing of lrqgraph but ``lrqgraph.errors``, ``lrqgraph.cache`` and the numerics: the
runtime sits beside the core (tests/test_structure.py).
"""
from .native_ops import available, library_path
from .session import interleaved_latency_ms, register, session, session_options

__all__ = ["session", "register", "session_options", "interleaved_latency_ms", "library_path", "available"]
