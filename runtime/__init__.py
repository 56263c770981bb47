"""Running rewritten models: onnxruntime sessions with lrqgraph's settings (``lrqgraph.runtime``)."""
from .native_ops import available, library_path
from .session import interleaved_latency_ms, session, session_options

__all__ = ["session", "session_options", "interleaved_latency_ms", "library_path", "available"]
