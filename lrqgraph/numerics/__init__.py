"""Pure-numpy numerics: quantizers, packing, low-rank factorizations, storage accounting.

Nothing in this package knows about ONNX; passes call into it.
"""
from .quant import QuantSpec, QuantizedTensor, quantize, dequantize
from .pack import pack_bits, unpack_bits
from .representation import Representation, relative_error
from .lowrank import (svd_factorize, lplr_factorize, rtn_factorize, gptq_factorize, rank_for_bpw,
                      truncated_svd)
from .gptq import HessianInfo, gptq_quantize, activation_error
from .qlr import qlr_factorize
from .codebook import codebook_quantize

__all__ = [
    "QuantSpec", "QuantizedTensor", "quantize", "dequantize", "pack_bits", "unpack_bits",
    "Representation", "relative_error", "svd_factorize", "lplr_factorize", "rtn_factorize",
    "rank_for_bpw", "truncated_svd", "gptq_factorize", "HessianInfo", "gptq_quantize",
    "activation_error", "qlr_factorize", "codebook_quantize",
]
