"""Running rewritten models: onnxruntime sessions with lrqgraph's settings (``lrqgraph.runtime``)."""
from .session import session, session_options

__all__ = ["session", "session_options"]
