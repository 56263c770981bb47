"""lrqgraph: compiler-style rewriting of ONNX models into quantized low-rank subgraphs."""
__version__ = "0.1.0"

from .api import Result, optimize, run  # noqa: E402
from .config import AllocateConfig, FactorizeConfig, OptimizeConfig, SelectConfig, VerifyConfig  # noqa: E402
from .errors import LrqError  # noqa: E402
from .io import load_model, save_model  # noqa: E402
from .passmanager import Context, Pass, PassManager, PassResult, register_analysis, register_pass  # noqa: E402

__all__ = ["optimize", "run", "Result", "OptimizeConfig", "AllocateConfig", "FactorizeConfig", "SelectConfig", "VerifyConfig",
           "LrqError", "load_model", "save_model", "Pass", "PassManager", "PassResult", "Context",
           "register_pass", "register_analysis", "__version__"]
