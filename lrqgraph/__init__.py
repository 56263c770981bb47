"""lrqgraph: compiler-style rewriting of ONNX models into quantized low-rank subgraphs.

The package's layers, bottom up: ``numerics`` (pure numpy) <- core (model, config, methods, io,
passmanager) <- ``passes`` <- api / cli (this module imports them, which registers the built-in
passes whatever is imported first); ``runtime`` sits beside the core and imports only
``lrqgraph.errors``, ``lrqgraph.cache`` and the numerics (tests/test_structure.py).
"""
from .version import __version__
from . import runtime  # noqa: F401  (lrqgraph.runtime after a plain ``import lrqgraph``)
from .api import Result, optimize, optimize_folder, run
from .config import AllocateConfig, FactorizeConfig, OptimizeConfig, SelectConfig, VerifyConfig
from .errors import InternalError, LrqError, VerificationError
from .executor import ExecutorConfig
from .io import load_model, save_model
from .methods import (GPTQConfig, KashinConfig, KMeansConfig, LPLRConfig, Method, MethodConfig, QLRConfig, RTNConfig,
                      SVDConfig, register_method)
from .passmanager import Context, Pass, PassManager, PassResult, register_analysis, register_pass

__all__ = ["optimize", "optimize_folder", "run", "Result", "OptimizeConfig", "AllocateConfig", "FactorizeConfig", "SelectConfig",
           "VerifyConfig", "LrqError", "VerificationError", "InternalError", "load_model", "save_model", "Pass",
           "PassManager", "PassResult", "Context", "register_pass", "register_analysis", "Method", "MethodConfig",
           "register_method", "RTNConfig", "GPTQConfig", "SVDConfig", "LPLRConfig", "QLRConfig", "KMeansConfig",
           "KashinConfig", "ExecutorConfig", "runtime", "__version__"]
