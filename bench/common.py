"""Shared helpers for benchmarks: timing onnxruntime sessions, stored weight bytes, random factors."""
from __future__ import annotations

import numpy as np
import onnx

from lrqgraph.io import tensor_bytes
from lrqgraph.numerics import QuantizedTensor


def rewritten_bpw(model_path, fp32_path, weight_names: list[str]) -> float:
    """Bits per weight of the layers a tool rewrote, counting every byte they now store.

    Everything else in the model is untouched, so the layers' bytes are the model's initializer
    bytes minus those of the fp32 model without the rewritten weights.
    """
    fp32 = onnx.load(str(fp32_path))
    sizes = {t.name: int(np.prod(t.dims)) for t in fp32.graph.initializer}
    params = sum(sizes[n] for n in weight_names)
    untouched = tensor_bytes(fp32) - 4 * params
    return (tensor_bytes(onnx.load(str(model_path))) - untouched) * 8 / params


def random_factor(k: int, n: int, bits: int, block: int, rng: np.random.Generator) -> QuantizedTensor:
    """A quantized [k, n] factor with random codes and float16 scales (for latency only)."""
    return QuantizedTensor(codes=rng.integers(0, 1 << bits, (k, n), dtype=np.uint8),
                           scales=(rng.random((-(-k // block), n)) * 0.01).astype(np.float16), zero_points=None,
                           bits=bits, block_size=block)
