"""Running rewritten models: onnxruntime sessions with lrqgraph's settings (``lrqgraph.runtime``)."""
from .native_ops import available, library_path
from .session import session, session_options

__all__ = ["session", "session_options", "library_path", "available"]
