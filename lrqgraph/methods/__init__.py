"""Compression methods, one module each, found through the registry (see base.py)."""
from .base import (LOWERINGS, METHODS, GridConfig, Method, MethodConfig, configure, get_method, method_config,
                   method_of, register_method)
from . import rtn, gptq, svd, lplr, qlr, kmeans, kashin  # noqa: E402,F401  (the built-in methods register)
from .gptq import GPTQConfig
from .kashin import KashinConfig
from .kmeans import KMeansConfig
from .lowrank import LowRankConfig
from .lplr import LPLRConfig
from .qlr import QLRConfig
from .rtn import RTNConfig
from .svd import SVDConfig

__all__ = ["LOWERINGS", "METHODS", "Method", "MethodConfig", "GridConfig", "LowRankConfig", "configure",
           "get_method", "method_config", "method_of", "register_method", "RTNConfig", "GPTQConfig", "SVDConfig",
           "LPLRConfig", "QLRConfig", "KMeansConfig", "KashinConfig"]
